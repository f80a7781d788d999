"""FuseDequantizeMatmul, and the property it exists for: no compiled kernel writes a dequantized
copy of a whole weight matrix to memory.

Structure against a hand-written Expected kernel; kernels without the pattern, or already
scheduled, come back unchanged; the numbers of a quantized matmul do not change on the CPU; and
the final TIR of a q4f16 CPU build writes no buffer, output or global scratch, with the element
count of a quantized weight (on CUDA, only the kernels that dequantize each weight for prefill's
cuBLAS GEMMs do).
"""

from __future__ import annotations

from math import prod

import numpy as np
import tvm
import tvm_ffi
from tvm import tirx
from tvm.script import ir as I
from tvm.script import tirx as T

from kiln.compiler.combine import combine_layout, combine_projections
from kiln.compiler.export import export
from kiln.compiler.pipeline import phases
from kiln.compiler.quantization import get_quantization
from kiln.models.attention import RoPE
from kiln.models.llama import LlamaConfig, LlamaForCausalLM
from kiln.passes.fuse_dequantize_matmul import FuseDequantizeMatmul
from kiln.targets import get_target


@I.ir_module
class Before:
    @T.prim_func(private=True, s_tir=True)
    def dequantize_matmul(
        var_x: T.handle,
        qweight: T.Buffer((T.int64(6), T.int64(2)), "uint32"),
        scale: T.Buffer((T.int64(6), T.int64(1)), "float32"),
        var_out: T.handle,
    ):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        x = T.match_buffer(var_x, (n, T.int64(16)))
        out = T.match_buffer(var_out, (n, T.int64(6)))
        dequantize = T.sblock_alloc_buffer((T.int64(6), T.int64(16)))
        for i, j in T.grid(T.int64(6), T.int64(16)):
            with T.sblock("dequantize"):
                v_i, v_j = T.axis.remap("SS", [i, j])
                dequantize[v_i, v_j] = (
                    T.Cast(
                        "float32",
                        T.Cast(
                            "int32",
                            qweight[v_i, v_j // T.int64(8)]
                            >> T.Cast("uint32", v_j % T.int64(8) * T.int64(4))
                            & T.uint32(15),
                        )
                        - 8,
                    )
                    * scale[v_i, T.int64(0)]
                )
        for i0, i1, k in T.grid(n, T.int64(6), T.int64(16)):
            with T.sblock("matmul"):
                v_i0, v_i1, v_k = T.axis.remap("SSR", [i0, i1, k])
                with T.init():
                    out[v_i0, v_i1] = T.float32(0)
                out[v_i0, v_i1] = out[v_i0, v_i1] + x[v_i0, v_k] * dequantize[v_i1, v_k]


@I.ir_module
class Expected:
    @T.prim_func(private=True, s_tir=True)
    def dequantize_matmul(
        var_x: T.handle,
        qweight: T.Buffer((T.int64(6), T.int64(2)), "uint32"),
        scale: T.Buffer((T.int64(6), T.int64(1)), "float32"),
        var_out: T.handle,
    ):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        x = T.match_buffer(var_x, (n, T.int64(16)))
        out = T.match_buffer(var_out, (n, T.int64(6)))
        dequantize = T.sblock_alloc_buffer((T.int64(6), T.int64(16)))
        for i1 in range(T.int64(6)):  # weight rows outermost
            for ax0 in range(T.int64(16)):  # decode row i1 ...
                with T.sblock("dequantize"):
                    v_i, v_j = T.axis.remap("SS", [i1, ax0])
                    dequantize[v_i, v_j] = (
                        T.Cast(
                            "float32",
                            T.Cast(
                                "int32",
                                qweight[v_i, v_j // T.int64(8)]
                                >> T.Cast("uint32", v_j % T.int64(8) * T.int64(4))
                                & T.uint32(15),
                            )
                            - 8,
                        )
                        * scale[v_i, T.int64(0)]
                    )
            for i0, k in T.grid(n, T.int64(16)):  # ... then every token's dot product with it
                with T.sblock("matmul"):
                    v_i0, v_i1, v_k = T.axis.remap("SSR", [i0, i1, k])
                    with T.init():
                        out[v_i0, v_i1] = T.float32(0)
                    out[v_i0, v_i1] = out[v_i0, v_i1] + x[v_i0, v_k] * dequantize[v_i1, v_k]


def test_weight_is_decoded_row_by_row_inside_the_matmul():
    tvm.ir.assert_structural_equal(FuseDequantizeMatmul()(Before), Expected)


@I.ir_module
class NoMatch:
    @T.prim_func(private=True, s_tir=True)
    def matmul(
        x: T.Buffer((4, 16), "float32"),
        w: T.Buffer((6, 16), "float32"),
        out: T.Buffer((4, 6), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        for i0, i1, k in T.grid(4, 6, 16):  # reads the weight directly: nothing to move
            with T.sblock("matmul"):
                v_i0, v_i1, v_k = T.axis.remap("SSR", [i0, i1, k])
                with T.init():
                    out[v_i0, v_i1] = T.float32(0)
                out[v_i0, v_i1] = out[v_i0, v_i1] + x[v_i0, v_k] * w[v_i1, v_k]

    @T.prim_func(private=True, s_tir=True)
    def exp_sum(x: T.Buffer((4, 16), "float32"), out: T.Buffer((4,), "float32")):
        T.func_attr({"tirx.noalias": True})
        e = T.sblock_alloc_buffer((4, 16))
        for i, j in T.grid(4, 16):  # an intermediate, but its reader reduces it over j = i's
            with T.sblock("exp"):  # own rows (e[i, k]), not as a weight (e[j, k])
                v_i, v_j = T.axis.remap("SS", [i, j])
                e[v_i, v_j] = T.exp(x[v_i, v_j])
        for i, k in T.grid(4, 16):
            with T.sblock("sum"):
                v_i, v_k = T.axis.remap("SR", [i, k])
                with T.init():
                    out[v_i] = T.float32(0)
                out[v_i] = out[v_i] + e[v_i, v_k]


def test_module_without_the_pattern_is_unchanged():
    assert FuseDequantizeMatmul()(NoMatch).same_as(NoMatch)
    scheduled = Before.with_attr("unused", 1)
    scheduled.update_func(
        scheduled.get_global_var("dequantize_matmul"),
        Before["dequantize_matmul"].with_attr("tirx.is_scheduled", True),
    )
    assert FuseDequantizeMatmul()(scheduled).same_as(scheduled)


def test_numbers_do_not_change():
    target = tvm.target.Target("llvm")
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (5, 16)).astype("float32")
    qweight = rng.integers(0, 2**32, (6, 2), dtype="uint64").astype("uint32")
    scale = rng.uniform(0.01, 0.1, (6, 1)).astype("float32")
    outs = []
    for mod in (Before, FuseDequantizeMatmul()(Before)):
        func = mod["dequantize_matmul"].with_attr("global_symbol", "main")
        lib = tvm.compile(tvm.IRModule({"main": func}), target)
        out = tvm.runtime.tensor(np.zeros((5, 6), "float32"))
        lib["main"](*[tvm.runtime.tensor(a) for a in (x, qweight, scale)], out)
        outs.append(out.numpy())
    # the reference: the same int4 codes decoded with NumPy
    codes = (qweight[:, :, None] >> (4 * np.arange(8, dtype="uint32"))) & 15
    w = (codes.reshape(6, 16).astype("float32") - 8) * scale
    np.testing.assert_allclose(outs[0], x @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(outs[1], outs[0])


# ---- the property, on whole q4f16 builds (one layer of a tiny Llama) ----

CONFIG = LlamaConfig(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
    rope=RoPE(10000.0), context_length=128,
)  # fmt: skip


def _final_tir(target_name: str, quantization: str) -> tuple[tvm.IRModule, set[int]]:
    """The lowered TIR of every kernel of a build, and the element counts of its weights (q/k/v
    and gate/up joined, as compile joins them)."""
    preset = get_quantization(quantization)
    model = LlamaForCausalLM(CONFIG, preset.model_dtype)
    layout = preset.quantize_model(model)
    exported = export(model, CONFIG.attention_spec(), preset.model_dtype, CONFIG.vocab_size)
    exported, groups = combine_projections(exported, layout)
    joined = combine_layout(layout, groups)
    weights = {prod(joined.sources[name]) for name in joined.schemes}
    spec = get_target(target_name)
    target = spec.target(None)
    mod = exported.mod
    with target:
        for _name, passes in phases(spec, target):
            mod = tvm.transform.Sequential(passes)(mod)
    tir = tvm.IRModule({gv: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)})
    tir = tirx.transform.BindTarget(target.with_host(target.host or "llvm"))(tir)
    lower, _, _ = tirx.get_default_tir_pipeline(target)
    return lower(tir), weights


def _weight_sized_writes(mod: tvm.IRModule, weights: set[int]) -> list[str]:
    """Buffers some kernel stores into (outputs, scratch) or allocates in global memory whose
    static element count is that of a weight."""
    found = []
    for gv, func in mod.functions_items():
        buffers: list[tirx.Buffer] = []

        def store(s: tirx.BufferStore, buffers: list = buffers) -> None:
            buffers.append(s.buffer)

        def alloc(a: tirx.AllocBuffer, buffers: list = buffers) -> None:
            if a.buffer.scope() == "global":
                buffers.append(a.buffer)

        tvm_ffi.structural_walk(func.body, (tirx.BufferStore, store), order="post")
        tvm_ffi.structural_walk(func.body, (tirx.AllocBuffer, alloc), order="post")
        for buf in buffers:
            size = int(np.prod([int(d) for d in buf.shape])) if all(
                isinstance(d, tirx.IntImm) for d in buf.shape
            ) else None  # fmt: skip
            if size in weights:
                found.append(f"{gv.name_hint}: {buf.name} {list(buf.shape)} {buf.scope()}")
    return sorted(set(found))


def test_no_kernel_writes_a_dequantized_weight_on_the_cpu():
    lowered, weights = _final_tir("cpu", "q4f16")
    assert len(weights) == 5  # qkv, o, gate_up, down, lm_head
    kernels = [gv.name_hint for gv in lowered.get_global_vars()]
    assert any("dequantize_matmul" in k for k in kernels)
    assert _weight_sized_writes(lowered, weights) == []


def test_on_cuda_only_the_prefills_dequantize_kernels_write_a_weight():
    """CUDA's decode reads the packed weights (Kiln's GEMV externs, no TIR kernel), and its
    prefill dequantizes each weight on purpose, for cuBLAS (kiln.passes.dispatch_matmul): the
    weight-sized writes are those dequantize kernels', one per weight, and no other kernel's."""
    lowered, weights = _final_tir("cuda", "q4f16")
    writers = {w.split(":")[0] for w in _weight_sized_writes(lowered, weights)}
    assert len(writers) == len(weights) == 5
    assert all(w.startswith("dequantize") and "matmul" not in w for w in writers), writers


def test_the_check_sees_a_dequantized_weight():
    """The same check on a kernel that does write the decoded weight (Before, unfused)."""
    target = tvm.target.Target("llvm")
    func = Before["dequantize_matmul"].with_attr("global_symbol", "main")
    tir = tirx.transform.BindTarget(target.with_host(target))(tvm.IRModule({"main": func}))
    lowered = tirx.get_default_tir_pipeline(target)[0](tir)
    assert _weight_sized_writes(lowered, {6 * 16}) == ["main: dequantize [96] global"]
