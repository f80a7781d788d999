"""SinkParamUnpack: each field of a tuple parameter bound just before its block's first reader.

Structure against a hand-written Expected module (fields read late move down, a field nobody in
its block reads goes to the block's end, a dataflow block stays one, the other bindings keep
their order), a module with nothing to move comes back as it was, and the moved function
computes what it did on the CPU.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.runtime import vm as tvm_vm
from tvm.script import ir as I
from tvm.script import relax as R

from kiln.passes.sink_param_unpack import SinkParamUnpack

Params = R.Tuple(R.Tensor((4,), "float32"), R.Tensor((4,), "float32"), R.Tensor((4,), "float32"))


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((4,), "float32"), params: Params):
        a = params[0]
        b = params[1]
        c = params[2]  # noqa: F841 (no binding reads it: it goes to the block's end)
        y = R.add(x, a)
        z = R.multiply(y, b)
        with R.dataflow():
            d = params[0]
            e = R.exp(z)
            f = R.add(e, d)
            R.output(f)
        return f


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((4,), "float32"), params: Params):
        a = params[0]
        y = R.add(x, a)
        b = params[1]
        z = R.multiply(y, b)
        c = params[2]  # noqa: F841 (no binding reads it: it goes to the block's end)
        with R.dataflow():
            e = R.exp(z)
            d = params[0]
            f = R.add(e, d)
            R.output(f)
        return f


def test_fields_move_to_their_first_reader():
    before = Before["main"]
    tvm.ir.assert_structural_equal(SinkParamUnpack(Before), Expected)
    assert Before["main"].same_as(before)  # the input module is left as it was


def test_a_function_with_nothing_to_move_is_unchanged():
    after = SinkParamUnpack(Expected)
    tvm.ir.assert_structural_equal(after, Expected)
    assert after["main"].same_as(Expected["main"])


def test_the_moved_function_computes_the_same():
    rng = np.random.default_rng(0)
    x, *params = (rng.standard_normal(4).astype("float32") for _ in range(4))
    outs = []
    for mod in (Before, SinkParamUnpack(Before)):
        machine = tvm_vm.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
        args = [tvm.runtime.tensor(x), [tvm.runtime.tensor(p) for p in params]]
        outs.append(machine["main"](*args).numpy())
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_allclose(outs[0], np.exp((x + params[0]) * params[1]) + params[0], rtol=1e-6)
    relax.analysis.well_formed(SinkParamUnpack(Before))  # raises on the first violation
