"""DispatchMatmul: fp16/bf16 `x @ W^T` with symbolic rows and a weight parameter -> one
`call_dps_packed` of a GEMM library's extern (kiln.cublas.matmul on CUDA).

Structure against hand-written Expected modules (the `NT_matmul` kernel FoldWeightTranspose
leaves, and a plain matmul of a transposed weight); modules without the pattern (a static
batch-1 GEMV, float32, an activation as the weight, a kernel that is not a plain matmul) and the
CPU target's pipeline leave them unchanged; the rewritten module gives the same numbers on the
CPU with a NumPy extern; quantized Linears on symbolic rows, with `dequantize`, become a
dequantize kernel and the extern (structure, the same numbers on the CPU, static rows and the
option off left alone); and a CUDA artifact calls cuBLAS in prefill and batched decode, never in
the batch-1 decode, and a q4f16 one in prefill only (its decode GEMVs are Kiln's).
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax
from tvm.runtime import vm as tvm_vm
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import kiln
from kiln.compiler.quantization import get_quantization
from kiln.compiler.quantization.layers import (
    LINEAR_ATTR,
    dequantize_te,
    linear_te,
    scheme_key,
)
from kiln.passes.dispatch_matmul import DispatchMatmul
from kiln.passes.fold_weight_transpose import FoldWeightTranspose
from kiln.runtime import cublas, gemv
from kiln.targets import cuda, get_target

EXTERN = "kiln.cublas.matmul"


@I.ir_module
class Before:
    @T.prim_func(private=True, s_tir=True)
    def NT_matmul(
        var_x: T.handle, w: T.Buffer((T.int64(6), T.int64(8)), "float16"), var_out: T.handle
    ):
        T.func_attr({"tirx.noalias": True})
        s = T.int64()
        x = T.match_buffer(var_x, (T.int64(1), s, T.int64(8)), "float16")
        out = T.match_buffer(var_out, (T.int64(1), s, T.int64(6)), "float16")
        for i0, i1, i2, k in T.grid(T.int64(1), s, T.int64(6), T.int64(8)):
            with T.sblock("NT_matmul"):
                v_i0, v_i1, v_i2, v_k = T.axis.remap("SSSR", [i0, i1, i2, k])
                with T.init():
                    out[v_i0, v_i1, v_i2] = T.float16(0)
                out[v_i0, v_i1, v_i2] = out[v_i0, v_i1, v_i2] + x[v_i0, v_i1, v_k] * w[v_i2, v_k]

    @R.function
    def main(
        x: R.Tensor((1, "s", 8), "float16"),
        r: R.Tensor((1, "s", 6), "float16"),
        params: R.Tuple(R.Tensor((6, 8), "float16")),
    ):
        s = T.int64()
        cls = Before
        with R.dataflow():
            w = params[0]
            y = R.call_tir(cls.NT_matmul, (x, w), out_ty=R.Tensor((1, s, 6), "float16"))
            z = R.add(y, r)
            R.output(z)
        return z


@I.ir_module
class Expected:
    @R.function
    def main(
        x: R.Tensor((1, "s", 8), "float16"),
        r: R.Tensor((1, "s", 6), "float16"),
        params: R.Tuple(R.Tensor((6, 8), "float16")),
    ):
        s = T.int64()
        with R.dataflow():
            w = params[0]
            y = R.call_dps_packed(EXTERN, (x, w), out_ty=R.Tensor((1, s, 6), "float16"))
            # The epilogue TVM would have fused into the kernel stays an op of its own.
            z = R.add(y, r)
            R.output(z)
        return z


def test_nt_matmul_kernel_becomes_the_extern():
    tvm.ir.assert_structural_equal(DispatchMatmul(EXTERN)(Before), Expected)


def test_the_cuda_target_dispatches_and_the_cpu_does_not():
    for name, expected in (("cuda", Expected), ("cpu", Before)):
        spec = get_target(name)
        target = spec.target(None)
        with target:
            after = tvm.transform.Sequential(spec.library_dispatch(target))(Before)
        tvm.ir.assert_structural_equal(after, expected)


@I.ir_module
class BeforeMatmul:
    @R.function
    def main(x: R.Tensor(("b", 1, 8), "bfloat16"), w: R.Tensor((6, 8), "bfloat16")):
        with R.dataflow():
            wt = R.permute_dims(w)
            y = R.matmul(x, wt, out_dtype="float32")
            R.output(y)
        return y


@I.ir_module
class ExpectedMatmul:
    @R.function
    def main(x: R.Tensor(("b", 1, 8), "bfloat16"), w: R.Tensor((6, 8), "bfloat16")):
        b = T.int64()
        with R.dataflow():
            y = R.call_dps_packed(EXTERN, (x, w), out_ty=R.Tensor((b, 1, 6), "float32"))
            R.output(y)
        return y


def test_matmul_of_a_transposed_weight_becomes_the_extern():
    """The form before FoldWeightTranspose (batched decode rows, bf16, a float32 result): the
    transpose goes with it."""
    tvm.ir.assert_structural_equal(DispatchMatmul(EXTERN)(BeforeMatmul), ExpectedMatmul)


@I.ir_module
class NoMatch:
    @T.prim_func(private=True, s_tir=True)
    def gemv(
        x: T.Buffer((T.int64(1), T.int64(1), T.int64(8)), "float16"),
        w: T.Buffer((T.int64(6), T.int64(8)), "float16"),
        out: T.Buffer((T.int64(1), T.int64(1), T.int64(6)), "float16"),
    ):
        T.func_attr({"tirx.noalias": True})
        for i0, i1, i2, k in T.grid(T.int64(1), T.int64(1), T.int64(6), T.int64(8)):
            with T.sblock("NT_matmul"):
                v_i0, v_i1, v_i2, v_k = T.axis.remap("SSSR", [i0, i1, i2, k])
                with T.init():
                    out[v_i0, v_i1, v_i2] = T.float16(0)
                out[v_i0, v_i1, v_i2] = out[v_i0, v_i1, v_i2] + x[v_i0, v_i1, v_k] * w[v_i2, v_k]

    @T.prim_func(private=True, s_tir=True)
    def scaled(var_x: T.handle, w: T.Buffer((T.int64(6), T.int64(8)), "float16"), var_o: T.handle):
        T.func_attr({"tirx.noalias": True})
        s = T.int64()
        x = T.match_buffer(var_x, (T.int64(1), s, T.int64(8)), "float16")
        out = T.match_buffer(var_o, (T.int64(1), s, T.int64(6)), "float16")
        for i0, i1, i2, k in T.grid(T.int64(1), s, T.int64(6), T.int64(8)):
            with T.sblock("NT_matmul"):
                vb, vs, vn, vk = T.axis.remap("SSSR", [i0, i1, i2, k])
                with T.init():
                    out[vb, vs, vn] = T.float16(0)
                out[vb, vs, vn] = out[vb, vs, vn] + x[vb, vs, vk] * w[vn, vk] * T.float16(2)

    @R.function
    def main(
        x1: R.Tensor((1, 1, 8), "float16"),
        x: R.Tensor((1, "s", 8), "float16"),
        x32: R.Tensor(("s", 8), "float32"),
        w: R.Tensor((6, 8), "float16"),
        w32: R.Tensor((6, 8), "float32"),
    ):
        s = T.int64()
        cls = NoMatch
        with R.dataflow():
            # the batch-1 decode's GEMV: static rows
            a = R.call_tir(cls.gemv, (x1, w), out_ty=R.Tensor((1, 1, 6), "float16"))
            # not a plain matmul
            b = R.call_tir(cls.scaled, (x, w), out_ty=R.Tensor((1, s, 6), "float16"))
            # float32
            c = R.matmul(x32, R.permute_dims(w32))
            # the "weight" is computed, not a parameter
            v = R.add(w, w)
            d = R.matmul(x, R.permute_dims(v))
            R.output(a, b, c, d)
        return (a, b, c, d)


def test_module_without_the_pattern_is_unchanged():
    assert DispatchMatmul(EXTERN)(NoMatch).same_as(NoMatch)


def test_dispatched_matmul_gives_the_same_numbers_on_the_cpu():
    """A Linear folded by FoldWeightTranspose, dispatched to a NumPy extern (float32 here, for
    exact numbers), compiled for the CPU: the extern gets x, W and out in the right order."""

    def numpy_nt_matmul(x, w, out):
        out.copyfrom(np.matmul(x.numpy(), w.numpy().T))

    tvm_ffi.register_global_func("kiln.test.nt_matmul", numpy_nt_matmul, override=True)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, tvm.tirx.Var("s", "int64"), 48], "float32"))
    params = relax.Var("params", relax.TupleType([relax.TensorType([40, 48], "float32")]))
    with bb.function("main", [x, params]):
        with bb.dataflow():
            w = bb.emit(relax.TupleGetItem(params, 0))
            out = bb.emit_output(relax.op.matmul(x, relax.op.permute_dims(w)))
        bb.emit_func_output(out)
    folded = FoldWeightTranspose()(bb.get())
    after = DispatchMatmul("kiln.test.nt_matmul", dtypes=("float32",))(folded)
    assert "kiln.test.nt_matmul" in after.script()
    assert [gv.name_hint for gv in after.get_global_vars()] == ["main"]  # the kernel is gone
    rng = np.random.default_rng(0)
    for s in (1, 3, 7):
        xs = rng.normal(0, 1, (1, s, 48)).astype("float32")
        ws = rng.normal(0, 1, (40, 48)).astype("float32")
        results = []
        for mod in (folded, after):
            vm = tvm_vm.VirtualMachine(tvm.compile(mod, tvm.target.Target("llvm")), tvm.cpu())
            results.append(vm["main"](tvm.runtime.tensor(xs), [tvm.runtime.tensor(ws)]).numpy())
        np.testing.assert_allclose(results[1], xs @ ws.T, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-5)


Q4 = get_quantization("q4f32")  # float32 activations: exact numbers on the CPU
QK, QN = 64, 40


def _quantized_module(rows, dispatched: bool = False) -> tvm.IRModule:
    """main(x (1, rows, QK), stored) -> x @ W^T through the q4f32 Linear kernel; `dispatched`:
    what DispatchMatmul(..., dequantize=True) should make of it."""
    stored_ty = [relax.TensorType(list(s), d) for s, d in Q4.storage(QN, QK).values()]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, rows, QK], "float32"))
    params = relax.Var("params", relax.TupleType(stored_ty))
    with bb.function("main", [x, params]):
        with bb.dataflow():
            stored = [bb.emit(relax.TupleGetItem(params, i)) for i in range(len(stored_ty))]
            if dispatched:
                w = bb.emit_te(dequantize_te(Q4, QN, QK), *stored, primfunc_name_hint="dequantize")
                call = relax.call_dps_packed(
                    relax.ExternFunc("kiln.test.nt_matmul"), relax.Tuple([x, w]),
                    relax.TensorType([1, rows, QN], "float32"),
                )  # fmt: skip
                out = bb.emit_output(bb.emit(call))
            else:
                out = bb.emit_output(
                    bb.emit_te(
                        linear_te(Q4, QN, QK), x, *stored,
                        primfunc_name_hint="dequantize_matmul",
                        primfunc_attrs={LINEAR_ATTR: scheme_key(Q4)},
                    )
                )  # fmt: skip
        bb.emit_func_output(out)
    return bb.get()


def test_a_quantized_linear_on_symbolic_rows_becomes_dequantize_and_the_extern():
    rows = tvm.tirx.Var("s", "int64")
    after = DispatchMatmul("kiln.test.nt_matmul", ("float32",), dequantize=True)(
        _quantized_module(rows)
    )
    tvm.ir.assert_structural_equal(after, _quantized_module(rows, dispatched=True))


@pytest.mark.parametrize("case", ["static rows", "without dequantize"])
def test_other_quantized_linears_stay(case):
    before = _quantized_module(1 if case == "static rows" else tvm.tirx.Var("s", "int64"))
    after = DispatchMatmul("kiln.test.nt_matmul", ("float32",), case == "static rows")(before)
    assert after.same_as(before)


def test_dispatched_quantized_linear_gives_the_same_numbers_on_the_cpu():
    def numpy_nt_matmul(x, w, out):
        out.copyfrom(np.matmul(x.numpy(), w.numpy().T))

    tvm_ffi.register_global_func("kiln.test.nt_matmul", numpy_nt_matmul, override=True)
    before = _quantized_module(tvm.tirx.Var("s", "int64"))
    after = DispatchMatmul("kiln.test.nt_matmul", ("float32",), dequantize=True)(before)
    rng = np.random.default_rng(2)
    weight = rng.normal(0, 1, (QN, QK)).astype("float32")
    stored = list(Q4.quantize("w", weight).values())
    dequantized = Q4.dequantize(dict(zip(Q4.storage(QN, QK), stored, strict=True)), QK)
    for s in (1, 5):
        xs = rng.normal(0, 1, (1, s, QK)).astype("float32")
        results = []
        for mod in (before, after):
            vm = tvm_vm.VirtualMachine(tvm.compile(mod, tvm.target.Target("llvm")), tvm.cpu())
            args = [tvm.runtime.tensor(a) for a in stored]
            results.append(vm["main"](tvm.runtime.tensor(xs), args).numpy())
        np.testing.assert_allclose(results[1], xs @ dequantized.T, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-5)


def _extern_calls(script: str) -> dict[str, int]:
    """Calls of the extern in each function of a module's TVMScript, those of the batched
    decode's copy for CUDA graphs (kiln.targets.cuda.BATCH_GRAPHS) left out: that copy must make
    the same calls as decode, all inside its graphs (checked here)."""
    calls: dict[str, int] = {}
    name = None
    for line in script.splitlines():
        if m := re.match(r"    def (\w+)\(", line):
            name = m[1]
        elif EXTERN in line and name is not None:
            calls[name] = calls.get(name, 0) + 1
    copy = cuda.BATCH_GRAPHS[0]
    graphed = {k: calls.pop(k) for k in list(calls) if k.startswith(copy)}
    assert copy not in graphed and sum(graphed.values()) == calls.get("decode", 0)
    return calls


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_artifact_calls_cublas_in_prefill_and_decode_not_in_decode_1(
    checkpoint, artifact, tmp_path, monkeypatch
):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    art = kiln.compile(
        str(checkpoint("tiny-llama")), target="cuda", quantization="q0f16",
        output=tmp_path / "cuda", arch="sm_90", dump_ir=tmp_path / "ir",
    )  # fmt: skip
    manifest = json.loads((art / "manifest.json").read_text())
    # cuBLAS, and the batch-1 SwiGLU and the norms on Kiln's GEMV library (test_cuda.py)
    assert manifest["target"]["externs"] == [EXTERN, gemv.ADD_RMS_NORM, gemv.F16_SWIGLU]
    # The extern, built here, travels in the artifact (checked like its other files).
    own = art / cublas.ARTIFACT_FILE
    assert own.read_bytes() == cublas.build().read_bytes()
    assert manifest["files"][cublas.ARTIFACT_FILE]["size"] == own.stat().st_size
    layers = manifest["model"]["config"]["num_hidden_layers"]
    calls = _extern_calls((tmp_path / "ir" / "5-finalize.py").read_text())
    # qkv, o, gate_up and down per layer, and the LM head; none in the batch-1 decode (GEMVs,
    # captured in CUDA graphs) nor in any captured graph.
    assert calls == {"prefill": 4 * layers + 1, "decode": 4 * layers + 1}
    cpu = json.loads((artifact("tiny-llama") / "manifest.json").read_text())
    assert "externs" not in cpu["target"]
    # q4f16: prefill's Linears dequantize, then cuBLAS; the batched decode's are Kiln's GEMVs,
    # but for the down projections (344 columns, not a whole number of the GEMV's 32-groups),
    # which go the prefill's way too.
    art = kiln.compile(
        str(checkpoint("tiny-llama")), target="cuda", quantization="q4f16",
        output=tmp_path / "cuda-q4", arch="sm_90", dump_ir=tmp_path / "ir-q4",
    )  # fmt: skip
    script = (tmp_path / "ir-q4" / "5-finalize.py").read_text()
    assert _extern_calls(script) == {"prefill": 4 * layers + 1, "decode": layers}
    assert script.count('"kiln.gemv.q4"') > 0
