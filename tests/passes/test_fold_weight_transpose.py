"""FoldWeightTranspose: `matmul(x, permute_dims(W))` -> one NT_matmul kernel reading W as stored.

Structure against a hand-written Expected module; modules without the pattern come back
unchanged; the folded matmul gives the unfolded numbers on the CPU; and the graph phase of a
Llama export leaves no permute_dims of a weight.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.runtime import vm as tvm_vm
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from kiln.passes.fold_weight_transpose import FoldWeightTranspose, has_weight_transpose


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor(("n", 1, 8), "float32"), w: R.Tensor((6, 8), "float32")):
        n = T.int64()
        with R.dataflow():
            wt: R.Tensor((8, 6), "float32") = R.permute_dims(w)
            y: R.Tensor((n, 1, 6), "float32") = R.matmul(x, wt)
            R.output(y)
        return y


@I.ir_module
class Expected:
    @T.prim_func(private=True, s_tir=True)
    def NT_matmul(
        var_x: T.handle, w: T.Buffer((T.int64(6), T.int64(8)), "float32"), var_out: T.handle
    ):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        x = T.match_buffer(var_x, (n, T.int64(1), T.int64(8)))
        out = T.match_buffer(var_out, (n, T.int64(1), T.int64(6)))
        for i0, i1, i2, k in T.grid(n, T.int64(1), T.int64(6), T.int64(8)):
            with T.sblock("NT_matmul"):
                v_i0, v_i1, v_i2, v_k = T.axis.remap("SSSR", [i0, i1, i2, k])
                with T.init():
                    out[v_i0, v_i1, v_i2] = T.float32(0)
                out[v_i0, v_i1, v_i2] = out[v_i0, v_i1, v_i2] + x[v_i0, v_i1, v_k] * w[v_i2, v_k]

    @R.function
    def main(x: R.Tensor(("n", 1, 8), "float32"), w: R.Tensor((6, 8), "float32")):
        n = T.int64()
        cls = Expected
        with R.dataflow():
            y = R.call_tir(cls.NT_matmul, (x, w), out_ty=R.Tensor((n, 1, 6), "float32"))
            R.output(y)
        return y


def test_transpose_is_folded_into_the_matmul():
    tvm.ir.assert_structural_equal(FoldWeightTranspose()(Before), Expected)


@I.ir_module
class NoMatch:
    @R.function
    def main(
        x: R.Tensor((2, 8), "float32"), w: R.Tensor((8, 6), "float32"), v: R.Tensor((2, 3, 8))
    ):
        with R.dataflow():
            y = R.matmul(x, w)  # no transpose
            wt = R.permute_dims(w)  # transposed, but not into a matmul
            vt = R.permute_dims(v, axes=[1, 0, 2])  # into a matmul, but its first operand
            z = R.matmul(vt, w)
            R.output(y, wt, z)
        return (y, wt, z)


def test_module_without_the_pattern_is_unchanged():
    assert not has_weight_transpose(NoMatch["main"])
    assert FoldWeightTranspose()(NoMatch).same_as(NoMatch)


def _run(mod: tvm.IRModule, args: list[np.ndarray]) -> np.ndarray:
    vm = tvm_vm.VirtualMachine(tvm.compile(mod, tvm.target.Target("llvm")), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


def test_folded_matmul_gives_the_same_numbers():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([tvm.tirx.Var("n", "int64"), 3, 48], "float32"))
    w = relax.Var("w", relax.TensorType([40, 48], "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, relax.op.permute_dims(w)))
        bb.emit_func_output(out)
    before = bb.get()
    after = FoldWeightTranspose()(before)
    assert not has_weight_transpose(after["main"])
    assert [gv.name_hint for gv in after.get_global_vars()] == ["NT_matmul", "main"]
    rng = np.random.default_rng(0)
    args = [rng.normal(0, 1, (5, 3, 48)).astype("float32"), rng.normal(0, 1, (40, 48))]
    args[1] = args[1].astype("float32")
    expect = _run(before, args)
    np.testing.assert_allclose(expect, args[0] @ args[1].T, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(_run(after, args), expect)


def test_no_weight_transpose_is_left_in_a_llama():
    from kiln.compiler.export import export
    from kiln.compiler.pipeline import graph_passes
    from kiln.models.attention import RoPE
    from kiln.models.llama import LlamaConfig, LlamaForCausalLM
    from kiln.targets import get_target

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-5,
        rope=RoPE(10000.0), context_length=64,
    )  # fmt: skip
    mod = export(LlamaForCausalLM(config, "float32"), config.attention_spec(), "float32", 64).mod
    assert has_weight_transpose(mod["decode"])
    target = get_target("cpu").target(None)
    with target:
        mod = tvm.transform.Sequential(graph_passes(target))(mod)
    for entry in ("prefill", "decode"):
        assert not has_weight_transpose(mod[entry])
    assert sum(gv.name_hint.startswith("NT_matmul") for gv in mod.get_global_vars()) >= 4
