"""FuseSwiGLU: SiLU(gate) * up -> the epilogue of the gate/up matmul's kernel.

Structure against a hand-written Expected module (the product becomes the kernel's scratch, the
epilogue reads rows j and I + j of it); graphs that are not exactly that SwiGLU come back
unchanged; the fused kernel gives the unfused numbers on the CPU, for a float and an int4 Linear;
and a CPU build of a Llama has one kernel per MLP up to down_proj.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.runtime import vm as tvm_vm
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from kiln.compiler.quantization import get_quantization
from kiln.compiler.quantization.layers import LINEAR_ATTR, linear_te, scheme_key
from kiln.passes.fuse_swiglu import FuseSwiGLU


@I.ir_module
class Before:
    @T.prim_func(private=True, s_tir=True)
    def NT_matmul(
        x: T.Buffer((T.int64(3), T.int64(8)), "float32"),
        w: T.Buffer((T.int64(12), T.int64(8)), "float32"),
        out: T.Buffer((T.int64(3), T.int64(12)), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        for i0, i1, k in T.grid(T.int64(3), T.int64(12), T.int64(8)):
            with T.sblock("NT_matmul"):
                v_i0, v_i1, v_k = T.axis.remap("SSR", [i0, i1, k])
                with T.init():
                    out[v_i0, v_i1] = T.float32(0.0)
                out[v_i0, v_i1] = out[v_i0, v_i1] + x[v_i0, v_k] * w[v_i1, v_k]

    @R.function
    def main(x: R.Tensor((3, 8), "float32"), w: R.Tensor((12, 8), "float32")):
        cls = Before
        with R.dataflow():
            gu = R.call_tir(cls.NT_matmul, (x, w), out_ty=R.Tensor((3, 12), "float32"))
            parts: R.Tuple(R.Tensor((3, 6), "float32"), R.Tensor((3, 6), "float32")) = R.split(
                gu, [6], axis=-1
            )
            g = parts[0]
            u = parts[1]
            y = R.multiply(R.nn.silu(g), u)
            R.output(y)
        return y


@I.ir_module
class Expected:
    @T.prim_func(private=True, s_tir=True)
    def fused_swiglu(
        x: T.Buffer((T.int64(3), T.int64(8)), "float32"),
        w: T.Buffer((T.int64(12), T.int64(8)), "float32"),
        y: T.Buffer((T.int64(3), T.int64(6)), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        gu = T.sblock_alloc_buffer((T.int64(3), T.int64(12)))
        for i0, i1, k in T.grid(T.int64(3), T.int64(12), T.int64(8)):
            with T.sblock("NT_matmul"):
                v_i0, v_i1, v_k = T.axis.remap("SSR", [i0, i1, k])
                T.reads(x[v_i0, v_k], w[v_i1, v_k])
                T.writes(gu[v_i0, v_i1])
                with T.init():
                    gu[v_i0, v_i1] = T.float32(0.0)
                gu[v_i0, v_i1] = gu[v_i0, v_i1] + x[v_i0, v_k] * w[v_i1, v_k]
        for i0, i1 in T.grid(T.int64(3), T.int64(6)):
            with T.sblock("swiglu"):
                v_i0, v_i1 = T.axis.remap("SS", [i0, i1])
                T.reads(gu[v_i0, v_i1 : v_i1 + T.int64(7)])
                T.writes(y[v_i0, v_i1])
                y[v_i0, v_i1] = gu[v_i0, v_i1] * T.sigmoid(gu[v_i0, v_i1]) * gu[v_i0, v_i1 + 6]

    @R.function
    def main(x: R.Tensor((3, 8), "float32"), w: R.Tensor((12, 8), "float32")):
        cls = Expected
        with R.dataflow():
            y = R.call_tir(cls.fused_swiglu, (x, w), out_ty=R.Tensor((3, 6), "float32"))
            R.output(y)
        return y


def test_swiglu_becomes_the_matmul_kernels_epilogue():
    tvm.ir.assert_structural_equal(FuseSwiGLU()(Before), Expected)


def _mlp(variant: str) -> tvm.IRModule:
    """main(x (3, 8), w (12, 8)): a SwiGLU after a matmul kernel, or a near miss."""
    op = relax.op
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([3, 8], "float32"))
    w = relax.Var("w", relax.TensorType([12, 8], "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            gu = bb.emit(op.matmul(x, op.permute_dims(w)))
            if variant != "not a kernel":  # FoldWeightTranspose makes it one
                gu = bb.emit(relax.call_tir(Before.get_global_var("NT_matmul"), [x, w], gu.ty))
            sections = [6] if variant != "uneven split" else [4]
            parts = bb.emit(op.split(gu, sections, axis=-1))
            g, u = (bb.emit(relax.TupleGetItem(parts, i)) for i in range(2))
            if variant == "silu of up":
                g, u = u, g
            act = op.nn.silu(g) if variant != "gelu" else op.nn.gelu(g)
            y = bb.emit(op.multiply(bb.emit(act), u) if variant != "uneven split" else act)
            if variant == "gate used twice":
                y = bb.emit(op.add(y, g))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = bb.get()
    if variant != "not a kernel":
        mod["NT_matmul"] = Before["NT_matmul"]
    return mod


@pytest.mark.parametrize(
    "variant", ["not a kernel", "silu of up", "gelu", "gate used twice", "uneven split"]
)
def test_other_graphs_are_unchanged(variant):
    before = _mlp(variant)
    assert FuseSwiGLU()(before).same_as(before)


def _run(mod: tvm.IRModule, args: list[np.ndarray]) -> np.ndarray:
    vm = tvm_vm.VirtualMachine(tvm.compile(mod, tvm.target.Target("llvm")), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


def test_fused_float_kernel_gives_the_same_numbers():
    rng = np.random.default_rng(0)
    x, w = rng.normal(0, 1, (3, 8)).astype("float32"), rng.normal(0, 1, (12, 8)).astype("float32")
    want = _run(Before, [x, w])
    gu = x.astype(np.float64) @ w.T
    np.testing.assert_allclose(want, gu[:, :6] / (1 + np.exp(-gu[:, :6])) * gu[:, 6:], rtol=1e-5)
    np.testing.assert_array_equal(_run(FuseSwiGLU()(Before), [x, w]), want)


def test_fused_int4_kernel_gives_the_same_numbers():
    """A q4f32 gate/up Linear's dequantizing kernel, with symbolic rows (prefill)."""
    preset, inter, k = get_quantization("q4f32"), 48, 64
    storage = list(preset.storage(2 * inter, k).values())
    bb = relax.BlockBuilder()
    n = tvm.tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([1, n, k], "float32"))
    stored = [relax.Var(f"s{i}", relax.TensorType(list(s), d)) for i, (s, d) in enumerate(storage)]
    with bb.function("main", [x, *stored]):
        with bb.dataflow():
            gu = bb.emit_te(
                linear_te(preset, 2 * inter, k), x, *stored,
                primfunc_name_hint="dequantize_matmul",
                primfunc_attrs={LINEAR_ATTR: scheme_key(preset)},
            )  # fmt: skip
            parts = bb.emit(relax.op.split(gu, 2, axis=-1))
            g, u = (bb.emit(relax.TupleGetItem(parts, i)) for i in range(2))
            out = bb.emit_output(relax.op.multiply(bb.emit(relax.op.nn.silu(g)), u))
        bb.emit_func_output(out)
    before = bb.get()
    after = FuseSwiGLU()(before)
    assert [gv.name_hint for gv in after.get_global_vars()] == ["fused_swiglu", "main"]
    rng = np.random.default_rng(1)
    weights = preset.quantize("gate_up", rng.normal(0, 1, (2 * inter, k)).astype("float32"))
    for tokens in (1, 5):
        xs = rng.normal(0, 1, (1, tokens, k)).astype("float32")
        args = [xs, *weights.values()]
        np.testing.assert_array_equal(_run(after, args), _run(before, args))


def test_a_cpu_llama_build_fuses_every_mlp_and_cuda_leaves_it_to_its_gemv():
    from kiln.compiler.combine import combine_projections
    from kiln.compiler.export import export
    from kiln.compiler.pipeline import graph_passes
    from kiln.models.attention import RoPE
    from kiln.models.llama import LlamaConfig, LlamaForCausalLM
    from kiln.targets import get_target

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-5,
        rope=RoPE(10000.0), context_length=64,
    )  # fmt: skip
    preset = get_quantization("q4f32")
    model = LlamaForCausalLM(config, "float32")
    layout = preset.quantize_model(model)
    exported, _ = combine_projections(export(model, config.attention_spec(), "float32", 64), layout)
    for name, fused in (("cpu", True), ("cuda", False)):
        spec = get_target(name)
        assert spec.fuse_swiglu is fused
        target = spec.target(None)
        with target:
            mod = tvm.transform.Sequential(graph_passes(target, None, spec.fuse_swiglu))(
                exported.mod
            )
        for entry in ("prefill", "decode", "decode_1"):
            script = mod[entry].script()
            assert script.count("fused_swiglu") == (2 if fused else 0), (name, entry)
            assert ("R.nn.silu" in script) is not fused
