"""FuseAddRMSNorm: `s = x + r; y = rms_norm(s, w)` -> one call_tir writing s and y.

Structure against a hand-written Expected module; modules without the pattern come back
unchanged; the fused kernel gives the numbers of the unfused add and rms_norm on the CPU; and
Kiln's CUDA schedule makes it one GPU kernel (one thread block per row). DispatchAddRMSNorm
then sends the kernels of a dtype and size to an extern: which calls it takes, and on the CPU,
with a NumPy function registered under the extern's name, the numbers of the unfused graph.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax
from tvm.runtime import vm as tvm_vm
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from kiln.passes.fuse_add_rms_norm import DispatchAddRMSNorm, FuseAddRMSNorm


@I.ir_module
class Before:
    @R.function
    def main(
        x: R.Tensor(("n", 1, 8), "float16"),
        r: R.Tensor(("n", 1, 8), "float16"),
        w: R.Tensor((8,), "float16"),
    ):
        n = T.int64()
        with R.dataflow():
            s: R.Tensor((n, 1, 8), "float16") = R.add(x, r)
            y: R.Tensor((n, 1, 8), "float16") = R.nn.rms_norm(s, w, axes=[-1], epsilon=1e-5)
            o: R.Tensor((n, 1, 8), "float16") = R.add(s, y)  # the next residual add reads s
            R.output(o)
        return o


@I.ir_module
class Expected:
    @T.prim_func(private=True, s_tir=True)
    def add_rms_norm(
        var_x: T.handle,
        var_r: T.handle,
        w: T.Buffer((T.int64(8),), "float16"),
        var_s: T.handle,
        var_y: T.handle,
    ):
        T.func_attr({"tirx.noalias": True, "kiln.add_rms_norm_epsilon": T.float32(1e-5)})
        a, b = T.int64(), T.int64()
        x = T.match_buffer(var_x, (a, b, T.int64(8)), "float16")
        r = T.match_buffer(var_r, (a, b, T.int64(8)), "float16")
        s = T.match_buffer(var_s, (a, b, T.int64(8)), "float16")
        y = T.match_buffer(var_y, (a, b, T.int64(8)), "float16")
        sum_sq = T.sblock_alloc_buffer((a, b), "float32")
        for i, j, k in T.grid(a, b, T.int64(8)):
            with T.sblock("sum_sq"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                with T.init():
                    sum_sq[vi, vj] = T.float32(0)
                sum_sq[vi, vj] = sum_sq[vi, vj] + T.Cast(
                    "float32", x[vi, vj, vk] + r[vi, vj, vk]
                ) * T.Cast("float32", x[vi, vj, vk] + r[vi, vj, vk])
        for i, j, k in T.grid(a, b, T.int64(8)):
            with T.sblock("add_rms_norm"):
                vi, vj, vk = T.axis.remap("SSS", [i, j, k])
                s[vi, vj, vk] = x[vi, vj, vk] + r[vi, vj, vk]
                y[vi, vj, vk] = T.Cast(
                    "float16",
                    T.rsqrt(sum_sq[vi, vj] / T.float32(8) + T.float32(1e-5))
                    * T.Cast("float32", x[vi, vj, vk] + r[vi, vj, vk])
                    * T.Cast("float32", w[vk]),
                )

    @R.function
    def main(
        x: R.Tensor(("n", 1, 8), "float16"),
        r: R.Tensor(("n", 1, 8), "float16"),
        w: R.Tensor((8,), "float16"),
    ):
        n = T.int64()
        cls = Expected
        with R.dataflow():
            t = R.call_tir(
                cls.add_rms_norm,
                (x, r, w),
                out_ty=[R.Tensor((n, 1, 8), "float16"), R.Tensor((n, 1, 8), "float16")],
            )
            s: R.Tensor((n, 1, 8), "float16") = t[0]
            y: R.Tensor((n, 1, 8), "float16") = t[1]
            o: R.Tensor((n, 1, 8), "float16") = R.add(s, y)
            R.output(o)
        return o


def test_add_then_rms_norm_becomes_one_call():
    tvm.ir.assert_structural_equal(FuseAddRMSNorm()(Before), Expected)


@I.ir_module
class NoMatch:
    @R.function
    def main(
        x: R.Tensor((2, 3, 8), "float32"),
        r: R.Tensor((8,), "float32"),
        w: R.Tensor((8,), "float32"),
        v: R.Tensor((2, 8, 3), "float32"),
    ):
        with R.dataflow():
            b = R.add(x, r)  # broadcast add
            y1 = R.nn.rms_norm(b, w, axes=[-1], epsilon=1e-5)
            y2 = R.nn.rms_norm(x, w, axes=[-1], epsilon=1e-5)  # no add
            s = R.add(v, v)
            y3 = R.nn.rms_norm(s, w, axes=[1], epsilon=1e-5)  # not the last axis
            s2 = R.multiply(x, x)
            y4 = R.nn.rms_norm(s2, w, axes=[-1], epsilon=1e-5)  # not an add
            R.output(y1, y2, y3, y4)
        return (y1, y2, y3, y4)


def test_module_without_the_pattern_is_unchanged():
    assert FuseAddRMSNorm()(NoMatch).same_as(NoMatch)


def _layer(dtype: str, hidden: int) -> tvm.IRModule:
    """Two residual adds, each followed by its RMSNorm, as in a transformer block; the second
    norm's weight is defined after the first add (the pass must still place it correctly)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([tvm.tirx.Var("n", "int64"), 3, hidden], dtype))
    seq = x.ty.shape
    r1 = relax.Var("r1", relax.TensorType(seq, dtype))
    r2 = relax.Var("r2", relax.TensorType(seq, dtype))
    w1 = relax.Var("w1", relax.TensorType([hidden], dtype))
    w2 = relax.Var("w2", relax.TensorType([hidden], dtype))
    with bb.function("main", [x, r1, r2, w1, w2]):
        with bb.dataflow():
            s1 = bb.emit(relax.op.add(x, r1))
            y1 = bb.emit(relax.op.nn.rms_norm(s1, w1, axes=[-1], epsilon=1e-6))
            s2 = bb.emit(relax.op.add(s1, relax.op.multiply(y1, r2)))
            y2 = bb.emit(relax.op.nn.rms_norm(s2, w2, axes=[-1], epsilon=1e-5))
            out = bb.emit_output(relax.Tuple([s2, y2]))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod: tvm.IRModule, args: list[np.ndarray]) -> list[np.ndarray]:
    target = tvm.target.Target("llvm")
    vm = tvm_vm.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in args])
    return [o.numpy() for o in out]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_fused_kernel_gives_the_unfused_numbers(dtype):
    hidden = 96
    before = _layer(dtype, hidden)
    after = FuseAddRMSNorm()(before)
    calls = [
        b.value.args[0].name_hint[: len("add_rms_norm")]
        for b in after["main"].body.blocks[0].bindings
        if isinstance(b.value, relax.Call) and b.value.op.name == "relax.call_tir"
    ]
    assert calls == ["add_rms_norm", "add_rms_norm"]  # two epsilons: two kernels
    rng = np.random.default_rng(0)
    args = [rng.normal(0, 2, (5, 3, hidden)).astype(dtype) for _ in range(3)]
    args += [rng.normal(1, 0.5, hidden).astype(dtype) for _ in range(2)]
    expect, got = _run(before, args), _run(after, args)
    for e, g in zip(expect, got, strict=True):
        assert np.isfinite(g).all()
        # Same operations in the same order; float32 sums may only differ in their last bit.
        np.testing.assert_allclose(g.astype("float64"), e.astype("float64"), rtol=1e-6, atol=0)


def test_cuda_schedule_makes_one_kernel():
    """dlight (Kiln's CUDA schedule phase) gives the kernel one grid: a thread block per row,
    the reduction and both outputs under it."""
    from kiln.targets import get_target

    spec = get_target("cuda")
    target = spec.target(None)
    mod = FuseAddRMSNorm()(_layer("float16", 4096))
    kernel = tvm.IRModule({"main": mod["add_rms_norm"].with_attr("global_symbol", "main")})
    with target:
        scheduled = tvm.transform.Sequential(spec.schedule(target))(kernel)["main"]
    assert scheduled.attrs["tirx.is_scheduled"]
    grids: list[str] = []

    def _loop(loop: tvm.tirx.For) -> None:
        binding = loop.thread_binding
        if binding is not None and binding.thread_tag.startswith("blockIdx"):
            grids.append(binding.thread_tag)

    tvm_ffi.structural_walk(scheduled.body, (tvm.tirx.For, _loop), order="post")
    assert grids == ["blockIdx.x"]
    body = scheduled.body.block.body  # the root block's body: one loop, the grid
    assert isinstance(body, tvm.tirx.For) and body.thread_binding.thread_tag == "blockIdx.x"


def _numpy_add_rms_norm(x, r, w, epsilon, s, y):
    """The extern's contract in NumPy: s = x + r in x's dtype, y = rms_norm(s) w from fp32."""
    total = x.numpy() + r.numpy()
    f = total.astype(np.float32)
    inv = 1 / np.sqrt((f * f).mean(-1, keepdims=True) + np.float32(epsilon))
    s.copyfrom(total)
    y.copyfrom((inv * f * w.numpy().astype(np.float32)).astype(total.dtype))


def test_dispatch_takes_the_kernels_of_its_dtype_and_sizes():
    fused16 = FuseAddRMSNorm()(_layer("float16", 96))
    after = DispatchAddRMSNorm("kiln.test.add_rms_norm", "float16", 8, 4096)(fused16)
    bindings = after["main"].body.blocks[0].bindings
    calls = [b.value for b in bindings if isinstance(b.value, relax.Call)]
    calls = [c for c in calls if c.op.name == "relax.call_dps_packed"]
    assert [c.args[0].global_symbol for c in calls] == ["kiln.test.add_rms_norm"] * 2
    assert [float(c.args[1].fields[3].value) for c in calls] == pytest.approx([1e-6, 1e-5])
    assert "call_tir" not in after["main"].script()
    assert [gv.name_hint for gv in after.get_global_vars()] == ["main"]  # the kernels dropped
    for dtype, multiple, largest in (("float32", 8, 4096), ("float16", 64, 4096),
                                     ("float16", 8, 64)):  # fmt: skip
        fused = FuseAddRMSNorm()(_layer(dtype, 96))
        assert DispatchAddRMSNorm("kiln.test.add_rms_norm", "float16", multiple, largest)(
            fused
        ).same_as(fused)


def test_dispatched_module_gives_the_unfused_numbers_on_the_cpu():
    tvm_ffi.register_global_func("kiln.test.add_rms_norm", _numpy_add_rms_norm, override=True)
    hidden = 96
    before = _layer("float16", hidden)
    after = DispatchAddRMSNorm("kiln.test.add_rms_norm", "float16", 8, 4096)(
        FuseAddRMSNorm()(before)
    )
    rng = np.random.default_rng(1)
    args = [rng.normal(0, 2, (5, 3, hidden)).astype("float16") for _ in range(3)]
    args += [rng.normal(1, 0.5, hidden).astype("float16") for _ in range(2)]
    for e, g in zip(_run(before, args), _run(after, args), strict=True):
        assert np.isfinite(g).all()
        # fp16 outputs of fp32 numbers summed in another order: at most one rounding apart
        np.testing.assert_allclose(g.astype("float64"), e.astype("float64"), rtol=2e-3, atol=0)
