"""DispatchGEMV: decode GEMVs -> GEMV externs, and gate/up + SiLU*up -> one fused extern.

Structure against Expected modules built by hand, at batch 1 and in a batched function (symbolic
rows); what must stay (prefill's symbolic rows, a scheme the externs do not take, a product used
elsewhere, a split that is not in halves, float weights in a batched function) stays; and on the
CPU, with NumPy functions registered under the externs' names, the dispatched module gives the
numbers of the original one (int4 at batch 1 and 11, float weights).
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax
from tvm.runtime import vm as tvm_vm

from kiln.compiler.quantization import get_quantization
from kiln.compiler.quantization.layers import LINEAR_ATTR, linear_te, scheme_key
from kiln.passes.dispatch_gemv import DispatchGEMV, GEMVExterns
from kiln.passes.fold_weight_transpose import FoldWeightTranspose

K, INTER, OUT = 64, 48, 40
PRESET = get_quantization("q4f32")  # float32 activations: exact numbers on the CPU
KEY = scheme_key(PRESET)
EXTERNS = {
    KEY: GEMVExterns(
        "kiln.test.q4", "kiln.test.q4_swiglu", cols_multiple=32, batched="kiln.test.q4_batched"
    )
}
FLOAT = {"float32": "kiln.test.f32_swiglu"}


def _stored(rows: int) -> list[relax.TensorType]:
    return [relax.TensorType(list(s), d) for s, d in PRESET.storage(rows, K).values()]


def _quantized(bb, x, weights, rows):
    return bb.emit_te(
        linear_te(PRESET, rows, K), x, *weights,
        primfunc_name_hint="dequantize_matmul", primfunc_attrs={LINEAR_ATTR: KEY},
    )  # fmt: skip


def _mlp_module(rows_dim, variant: str = "swiglu", dispatched: bool | str = False) -> tvm.IRModule:
    """main(x (rows, K), packed (gate_up stored, out stored)) -> (SwiGLU(x) (rows, I), out(x)).

    `dispatched`: the module DispatchGEMV should make of it (True), or of it as a batched
    function ("batched")."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([rows_dim, K], "float32"))
    packed = relax.Var("packed", relax.TupleType([*_stored(2 * INTER), *_stored(OUT)]))
    with bb.function("main", [x, packed], attrs={"num_input": 1}):
        with bb.dataflow():
            w = [bb.emit(relax.TupleGetItem(packed, i)) for i in range(4)]
            if dispatched == "batched":  # plain Linears with scratch; SiLU*up an op

                def batched(i: int, n: int) -> relax.Var:
                    call = relax.call_dps_packed(
                        relax.ExternFunc(EXTERNS[KEY].batched), relax.Tuple([x, w[i], w[i + 1]]),
                        [relax.TensorType([rows_dim, n], "float32"),
                         relax.TensorType([n, K], "float32")],
                    )  # fmt: skip
                    return bb.emit(relax.TupleGetItem(bb.emit(call), 0))

                parts = bb.emit(relax.op.split(batched(0, 2 * INTER), [INTER], axis=-1))
                g, u = (bb.emit(relax.TupleGetItem(parts, i)) for i in range(2))
                y = bb.emit(relax.op.multiply(bb.emit(relax.op.nn.silu(g)), u))
                z = batched(2, OUT)
            elif dispatched:
                swiglu = relax.call_dps_packed(
                    relax.ExternFunc(EXTERNS[KEY].swiglu), relax.Tuple([x, w[0], w[1]]),
                    relax.TensorType([rows_dim, INTER], "float32"),
                )  # fmt: skip
                y = bb.emit(swiglu)
                z = bb.emit(
                    relax.call_dps_packed(
                        relax.ExternFunc(EXTERNS[KEY].gemv),
                        relax.Tuple([x, w[2], w[3]]),
                        relax.TensorType([rows_dim, OUT], "float32"),
                    )
                )
            else:
                gu = _quantized(bb, x, w[:2], 2 * INTER)
                parts = bb.emit(relax.op.split(gu, [INTER], axis=-1))
                g, u = (bb.emit(relax.TupleGetItem(parts, i)) for i in range(2))
                if variant == "silu of the up half":
                    g, u = u, g
                y = bb.emit(relax.op.multiply(bb.emit(relax.op.nn.silu(g)), u))
                if variant == "product used elsewhere":
                    y = bb.emit(relax.op.add(y, relax.op.sum(gu)))
                z = _quantized(bb, x, w[2:], OUT)
            out = bb.emit_output(relax.Tuple([y, z]))
        bb.emit_func_output(out)
    return relax.transform.DeadCodeElimination()(bb.get())


def test_gemvs_and_swiglu_become_the_externs():
    after = DispatchGEMV(EXTERNS, FLOAT)(_mlp_module(1))
    tvm.ir.assert_structural_equal(after, _mlp_module(1, dispatched=True))
    assert [gv.name_hint for gv in after.get_global_vars()] == ["main"]  # kernels dropped


def test_in_a_batched_function_symbolic_rows_become_the_externs():
    """A batched decode's rows (one per sequence, symbolic): plain Linears to the batched extern
    with (N, K) scratch, SiLU*up left an op, where the function is named batched and the scheme
    has a batched extern; left to the GEMM schedules elsewhere (prefill's rows look the same)."""
    rows = tvm.tirx.Var("batch", "int64")
    before = _mlp_module(rows)
    after = DispatchGEMV(EXTERNS, FLOAT, batched=("main",))(before)
    tvm.ir.assert_structural_equal(after, _mlp_module(rows, dispatched="batched"))
    assert DispatchGEMV(EXTERNS, FLOAT, batched=("decode",))(before).same_as(before)
    plain = {KEY: GEMVExterns("kiln.test.q4", "kiln.test.q4_swiglu", cols_multiple=32)}
    assert DispatchGEMV(plain, FLOAT, batched=("main",))(before).same_as(before)  # no batched form


@pytest.mark.parametrize("variant", ["prefill rows", "other scheme", "width not a multiple",
                                     "product used elsewhere",
                                     "silu of the up half"])  # fmt: skip
def test_what_is_not_a_gemv_or_a_swiglu_stays(variant):
    rows = tvm.tirx.Var("n", "int64") if variant == "prefill rows" else 1
    before = _mlp_module(rows, variant)
    externs = {"another scheme": EXTERNS[KEY]} if variant == "other scheme" else EXTERNS
    if variant == "width not a multiple":  # of the extern's group size
        externs = {KEY: GEMVExterns("kiln.test.q4", "kiln.test.q4_swiglu", cols_multiple=48)}
    after = DispatchGEMV(externs, FLOAT)(before)
    if variant in ("product used elsewhere", "silu of the up half"):
        # the plain GEMVs still go (the gate/up one among them), the epilogue stays a graph op
        assert after.script().count('kiln.test.q4"') == 2
        assert "kiln.test.q4_swiglu" not in after.script()
    else:
        assert after.same_as(before)


def _register_numpy_externs() -> None:
    def dequantized(stored) -> np.ndarray:
        arrays = dict(zip(PRESET.storage(1, K), (s.numpy() for s in stored), strict=True))
        return PRESET.dequantize(arrays, K).astype(np.float64)

    def silu(a):
        return a / (1 + np.exp(-a))

    def q4(x, qweight, scale, out):
        out.copyfrom((x.numpy() @ dequantized([qweight, scale]).T).astype("float32"))

    def q4_batched(x, qweight, scale, out, w):
        weight = dequantized([qweight, scale])
        w.copyfrom(weight.astype("float32"))
        out.copyfrom((x.numpy() @ weight.T).astype("float32"))

    def q4_swiglu(x, qweight, scale, out):
        gu = x.numpy() @ dequantized([qweight, scale]).T
        half = gu.shape[-1] // 2
        out.copyfrom((silu(gu[..., :half]) * gu[..., half:]).astype("float32"))

    def f32_swiglu(x, w, out):
        gu = x.numpy().astype(np.float64) @ w.numpy().T
        half = gu.shape[-1] // 2
        out.copyfrom((silu(gu[..., :half]) * gu[..., half:]).astype("float32"))

    externs = (("q4", q4), ("q4_batched", q4_batched), ("q4_swiglu", q4_swiglu),
               ("f32_swiglu", f32_swiglu))  # fmt: skip
    for name, f in externs:
        tvm_ffi.register_global_func(f"kiln.test.{name}", f, override=True)


def _run(mod, x, params):
    vm = tvm_vm.VirtualMachine(tvm.compile(mod, tvm.target.Target("llvm")), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x), [tvm.runtime.tensor(p) for p in params])
    return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]


@pytest.mark.parametrize("batch", [1, 11])
def test_dispatched_int4_module_gives_the_same_numbers_on_the_cpu(batch):
    """Batch 1 (static rows), and 11 rows of a batched function (symbolic)."""
    _register_numpy_externs()
    rng = np.random.default_rng(0)
    params = [
        *PRESET.quantize("gate_up", rng.normal(0, 1, (2 * INTER, K)).astype("float32")).values(),
        *PRESET.quantize("out", rng.normal(0, 1, (OUT, K)).astype("float32")).values(),
    ]
    before = _mlp_module(1 if batch == 1 else tvm.tirx.Var("batch", "int64"))
    after = DispatchGEMV(EXTERNS, FLOAT, batched=("main",))(before)
    assert ("kiln.test.q4_swiglu" if batch == 1 else "kiln.test.q4_batched") in after.script()
    x = rng.normal(0, 1, (batch, K)).astype("float32")
    for want, got in zip(_run(before, x, params), _run(after, x, params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _float_swiglu_module(rows) -> tvm.IRModule:
    """A float gate/up Linear as FoldWeightTranspose leaves it (an NT_matmul kernel), then
    SiLU(gate) * up, on x (rows, 1, K)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([rows, 1, K], "float32"))
    packed = relax.Var("packed", relax.TupleType([relax.TensorType([2 * INTER, K], "float32")]))
    with bb.function("main", [x, packed], attrs={"num_input": 1}):
        with bb.dataflow():
            w = bb.emit(relax.TupleGetItem(packed, 0))
            gu = bb.emit(relax.op.matmul(x, relax.op.permute_dims(w)))
            parts = bb.emit(relax.op.split(gu, 2, axis=-1))
            g, u = (bb.emit(relax.TupleGetItem(parts, i)) for i in range(2))
            out = bb.emit_output(relax.op.multiply(bb.emit(relax.op.nn.silu(g)), u))
        bb.emit_func_output(out)
    return FoldWeightTranspose()(bb.get())


def test_dispatched_float_swiglu_gives_the_same_numbers_on_the_cpu():
    _register_numpy_externs()
    before = _float_swiglu_module(1)
    after = DispatchGEMV(EXTERNS, FLOAT)(before)
    assert "kiln.test.f32_swiglu" in after.script()
    assert [gv.name_hint for gv in after.get_global_vars()] == ["main"]
    rng = np.random.default_rng(1)
    xs, ws = rng.normal(0, 1, (1, 1, K)), rng.normal(0, 1, (2 * INTER, K))
    xs, ws = xs.astype("float32"), ws.astype("float32")
    (want,), (got,) = _run(before, xs, [ws]), _run(after, xs, [ws])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_float_weights_in_a_batched_function_stay():
    """Float GEMMs of a batch are cuBLAS's (a GEMV per 8 rows would read the weight again)."""
    before = _float_swiglu_module(tvm.tirx.Var("batch", "int64"))
    assert DispatchGEMV(EXTERNS, FLOAT, batched=("main",))(before).same_as(before)
