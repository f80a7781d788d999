"""DispatchAddRMSNorm: FuseAddRMSNorm's kernel on one row -> the extern.

On modules as FuseAddRMSNorm leaves them: one row becomes the extern (whether the residual
stream is read after or not at all); two rows, a row past `max_k` and float32 stay; and on the
CPU, with a NumPy function registered under the extern's name, the dispatched module gives the
numbers of the original one (whose add and norm are Kiln's compiled kernel)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax
from tvm.runtime import vm as tvm_vm

from kiln.passes.dispatch_add_rms_norm import DispatchAddRMSNorm
from kiln.passes.fuse_add_rms_norm import FuseAddRMSNorm

K, EPS = 64, 1e-5
EXTERN = "kiln.test.add_rms_norm"


def _module(rows: int = 1, reads_sum: bool = True, dtype: str = "float16") -> tvm.IRModule:
    """main(x, r (rows, 1, K), w (K,)) -> (x + r, rms_norm(x + r, w) * 2), or the second only."""
    bb = relax.BlockBuilder()
    x, r = (relax.Var(n, relax.TensorType([rows, 1, K], dtype)) for n in "xr")
    w = relax.Var("w", relax.TensorType([K], dtype))
    with bb.function("main", [x, r, w]):
        with bb.dataflow():
            s = bb.emit(relax.op.add(x, r))
            y = bb.emit(relax.op.nn.rms_norm(s, w, axes=[-1], epsilon=EPS))
            twice = bb.emit(relax.op.add(y, y))
            result = bb.emit_output(relax.Tuple([s, twice] if reads_sum else [twice]))
        bb.emit_func_output(result)
    return FuseAddRMSNorm()(bb.get())


@pytest.mark.parametrize("reads_sum", [True, False])
def test_one_row_becomes_the_extern(reads_sum):
    after = DispatchAddRMSNorm(EXTERN, 4096)(_module(reads_sum=reads_sum))
    main = after["main"].script()
    assert f'R.call_dps_packed("{EXTERN}", (x, r, w, T.float32(' in main
    assert not any(isinstance(f, tvm.tirx.PrimFunc) for f in after.functions.values())


@pytest.mark.parametrize("rows,max_k,dtype", [(2, 4096, "float16"), (1, 32, "float16"),
                                              (1, 4096, "float32")])  # fmt: skip
def test_a_batch_a_long_row_or_another_dtype_stays(rows, max_k, dtype):
    before = _module(rows, dtype=dtype)
    after = DispatchAddRMSNorm(EXTERN, max_k)(before)
    assert tvm_ffi.structural_equal(after, before), after.script()


def test_the_extern_gives_the_kernels_numbers_on_the_cpu():
    def add_rms_norm(x, r, w, epsilon, s, y):
        total = (x.numpy().astype(np.float32) + r.numpy().astype(np.float32)).astype("float16")
        t = total.astype(np.float64)
        inv = 1 / np.sqrt((t * t).mean(axis=-1, keepdims=True) + epsilon)
        s.copyfrom(total)
        y.copyfrom((inv * t * w.numpy().astype(np.float64)).astype("float16"))

    tvm_ffi.register_global_func(EXTERN, add_rms_norm, override=True)
    rng = np.random.default_rng(0)
    args = [*(rng.standard_normal((1, 1, K)).astype("float16") for _ in range(2))]
    args.append(rng.uniform(0.5, 1.5, K).astype("float16"))
    before = _module()
    after = DispatchAddRMSNorm(EXTERN, 4096)(before)
    assert EXTERN in after.script()

    def run(mod):
        vm = tvm_vm.VirtualMachine(tvm.compile(mod, tvm.target.Target("llvm")), tvm.cpu())
        out = vm["main"](*(tvm.runtime.tensor(a) for a in args))
        return [o.numpy().astype(np.float64) for o in out]

    (s_want, y_want), (s_got, y_got) = run(before), run(after)
    np.testing.assert_array_equal(s_got, s_want)
    # the kernel's float32 against float64: one fp16 rounding apart at most
    ulp = np.spacing(np.abs(y_want).astype(np.float16)).astype(np.float64)
    assert np.all(np.abs(y_got - y_want) <= 2 * ulp)
