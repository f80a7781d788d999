"""kiln.passes.bound_dynamic_storage: a bounded function's dynamic allocations (what it returns)
sized for its bound, through the CPU pipeline (the CUDA one runs it the same way), against
NumPy; other functions, and sizes with an unbounded variable, left as they were."""

from __future__ import annotations

import re

import numpy as np
import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu
from tvm.script import ir as I
from tvm.script import relax as R

from kiln.passes.bound_dynamic_storage import BoundDynamicStorage

BOUND = 16


@I.ir_module
class Module:
    @R.function
    def bounded(x: R.Tensor(("n", 4), "float32")) -> R.Tensor(("n", 4), "float32"):
        R.func_attr({"tir_var_upper_bound": {"n": BOUND}})
        with R.dataflow():
            y = R.add(x, x)
            z = R.multiply(y, x)
            R.output(z)
        return z

    @R.function
    def mixed(
        x: R.Tensor(("n", "m"), "float32"),
    ) -> R.Tensor(("n", "m"), "float32"):
        R.func_attr({"tir_var_upper_bound": {"n": BOUND}})
        with R.dataflow():
            y = R.add(x, x)
            R.output(y)
        return y

    @R.function
    def unbounded(x: R.Tensor(("n", 4), "float32")) -> R.Tensor(("n", 4), "float32"):
        with R.dataflow():
            y = R.add(x, x)
            R.output(y)
        return y


def _pipeline(target: tvm.target.Target, dump: dict[str, str]) -> tvm.transform.Pass:
    finalize = []
    for p in cpu.finalize_passes(target):
        finalize.append(p)
        if p.info.name == "LowerAllocTensor":
            finalize.append(BoundDynamicStorage)

    @tvm.transform.module_pass(opt_level=0, name="Dump")
    def keep(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        dump["script"] = mod.script()
        return mod

    return tvm.transform.Sequential(
        [
            *cpu.library_dispatch_passes(target),
            *cpu.legalize_passes(target),
            *cpu.dataflow_lower_passes(target),
            *finalize,
            keep,
        ]
    )


def _storage_sizes(script: str, function: str) -> list[str]:
    body = script.split(f"def {function}(", 1)[1].split("\n    @", 1)[0]
    return re.findall(r"alloc_storage\((R\.shape\(\[[^\]]*\]\)|\w+)", body)


def test_a_bounded_functions_output_is_stored_at_its_bound():
    target = tvm.target.Target("llvm")
    dump: dict[str, str] = {}
    executable = tvm.compile(Module, target, relax_pipeline=_pipeline(target, dump))
    # n x 4 float32 at n = 16: 256 bytes, whatever n a call has
    assert _storage_sizes(dump["script"], "bounded") == [f"R.shape([{BOUND * 4 * 4}])"]
    # with an unbounded m, or no bound at all: sized at each call, as before
    assert all(not s.startswith("R.shape") for s in _storage_sizes(dump["script"], "mixed"))
    assert all(not s.startswith("R.shape") for s in _storage_sizes(dump["script"], "unbounded"))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    rng = np.random.default_rng(0)
    for n in (3, BOUND, 1, 7):
        x = rng.standard_normal((n, 4)).astype("float32")
        got = vm["bounded"](tvm.runtime.tensor(x)).numpy()
        assert got.shape == (n, 4)
        np.testing.assert_allclose(got, 2 * x * x, rtol=1e-6)
    x = rng.standard_normal((5, 3)).astype("float32")
    np.testing.assert_allclose(vm["mixed"](tvm.runtime.tensor(x)).numpy(), 2 * x, rtol=1e-6)
