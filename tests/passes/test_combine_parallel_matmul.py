"""CombineParallelMatmul: Linears reading the same input -> one matmul of their joined weights.

Structure against a hand-written Expected module (float Linears: q/k/v joined into what
attention reads, gate/up split for SiLU*up); modules without a group come back unchanged (other
inputs, other modules, a weight used twice, a function that uses a part on its own); the
combined module gives the original numbers on the CPU, float and int4 (its kernel rebuilt for
the joined rows, its weights quantized joined as weight conversion does); and a Llama export has
one matmul for q/k/v and one for gate/up in every layer.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm.relax.frontend import nn
from tvm.runtime import vm as tvm_vm
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from kiln.compiler.quantization import get_quantization
from kiln.compiler.quantization.layers import LINEAR_ATTR, linear_kernels
from kiln.passes.combine_parallel_matmul import CombineParallelMatmul, combined_name

NAMES = [
    "a.q_proj.weight", "a.k_proj.weight", "a.v_proj.weight", "a.o_proj.weight",
    "m.gate_proj.weight", "m.up_proj.weight",
]  # fmt: skip


@I.ir_module
class Before:
    @R.function
    def main(
        x: R.Tensor(("n", 8), "float32"),
        params: R.Tuple(
            R.Tensor((4, 8), "float32"),
            R.Tensor((2, 8), "float32"),
            R.Tensor((2, 8), "float32"),
            R.Tensor((8, 8), "float32"),
            R.Tensor((6, 8), "float32"),
            R.Tensor((6, 8), "float32"),
        ),
    ):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            wq = params[0]
            wk = params[1]
            wv = params[2]
            wo = params[3]
            wg = params[4]
            wu = params[5]
            q = R.matmul(x, R.permute_dims(wq))
            k = R.matmul(x, R.permute_dims(wk))
            v = R.matmul(x, R.permute_dims(wv))
            qkv = R.concat((q, k, v), axis=-1)
            o = R.matmul(qkv, R.permute_dims(wo))
            g = R.matmul(o, R.permute_dims(wg))
            u = R.matmul(o, R.permute_dims(wu))
            y = R.multiply(R.nn.silu(g), u)
            R.output(y)
        return y


@I.ir_module
class Expected:
    I.module_attrs(
        {
            "kiln.params": ["a.qkv_proj.weight", "a.o_proj.weight", "m.gate_up_proj.weight"],
            "kiln.combined": {
                "a.qkv_proj.weight": ["a.q_proj.weight", "a.k_proj.weight", "a.v_proj.weight"],
                "m.gate_up_proj.weight": ["m.gate_proj.weight", "m.up_proj.weight"],
            },
        }
    )

    @R.function
    def main(
        x: R.Tensor(("n", 8), "float32"),
        params: R.Tuple(
            R.Tensor((8, 8), "float32"), R.Tensor((8, 8), "float32"), R.Tensor((12, 8), "float32")
        ),
    ):
        R.func_attr({"num_input": 1})
        n = T.int64()
        with R.dataflow():
            wo = params[1]
            wqkv = params[0]
            qkv = R.matmul(x, R.permute_dims(wqkv))  # concat((q, k, v)) is this matmul itself
            o = R.matmul(qkv, R.permute_dims(wo))
            wgu = params[2]
            gu = R.matmul(o, R.permute_dims(wgu))
            parts: R.Tuple(R.Tensor((n, 6), "float32"), R.Tensor((n, 6), "float32")) = R.split(
                gu, [6], axis=-1
            )
            g = parts[0]
            u = parts[1]
            y = R.multiply(R.nn.silu(g), u)
            R.output(y)
        return y


def test_parallel_linears_become_one_matmul():
    tvm.ir.assert_structural_equal(CombineParallelMatmul(NAMES)(Before), Expected)


def test_combined_names():
    assert combined_name(NAMES[:3]) == "a.qkv_proj.weight"
    assert combined_name(["l.1.mlp.gate_proj.qweight", "l.1.mlp.up_proj.qweight"]) == (
        "l.1.mlp.gate_up_proj.qweight"
    )
    assert combined_name(["w1.scale", "w3.scale"]) == "w1_w3.scale"


def _packed_module(body, shapes: list[tuple[int, int]], second=None) -> tvm.IRModule:
    """A module whose `main` (and `second`, if given) take x (n, 8) and packed weights."""
    bb = tvm.relax.BlockBuilder()
    funcs = [("main", body)] + ([("second", second)] if second else [])
    for name, make in funcs:
        x = tvm.relax.Var("x", tvm.relax.TensorType([tvm.tirx.Var("n", "int64"), 8], "float32"))
        params = tvm.relax.Var(
            "params",
            tvm.relax.TupleType([tvm.relax.TensorType(list(s), "float32") for s in shapes]),
        )
        with bb.function(name, [x, params], attrs={"num_input": 1}):
            with bb.dataflow():
                w = [bb.emit(tvm.relax.TupleGetItem(params, i)) for i in range(len(shapes))]
                out = bb.emit_output(make(bb, x, w))
            bb.emit_func_output(out)
    return bb.get()


def _linear(x, w):
    return tvm.relax.op.matmul(x, tvm.relax.op.permute_dims(w))


@pytest.mark.parametrize(
    "case",
    ["different inputs", "different modules", "weight used twice", "another function differs"],
)
def test_module_without_a_group_is_unchanged(case):
    op = tvm.relax.op
    names = ["a.q_proj.weight", "a.k_proj.weight"]
    second = None
    if case == "different inputs":

        def body(bb, x, w):
            h = bb.emit(op.multiply(x, x))
            return op.concat([bb.emit(_linear(x, w[0])), bb.emit(_linear(h, w[1]))], axis=-1)

    elif case == "different modules":
        names = ["a.q_proj.weight", "b.k_proj.weight"]

        def body(bb, x, w):
            return op.concat([bb.emit(_linear(x, w[0])), bb.emit(_linear(x, w[1]))], axis=-1)

    elif case == "weight used twice":

        def body(bb, x, w):
            q, k = bb.emit(_linear(x, w[0])), bb.emit(_linear(x, w[1]))
            return op.add(op.concat([q, k], axis=-1), op.sum(w[1]))

    else:

        def body(bb, x, w):
            return op.concat([bb.emit(_linear(x, w[0])), bb.emit(_linear(x, w[1]))], axis=-1)

        def second(bb, x, w):  # uses q's weight alone: q and k cannot share one parameter
            return _linear(x, w[0])

    before = _packed_module(body, [(8, 8), (8, 8)], second)
    assert CombineParallelMatmul(names)(before).same_as(before)


def _run(mod: tvm.IRModule, x: np.ndarray, params: list[np.ndarray]) -> np.ndarray:
    vm = tvm_vm.VirtualMachine(tvm.compile(mod, tvm.target.Target("llvm")), tvm.cpu())
    packed = [tvm.runtime.tensor(p) for p in params]
    return vm["main"](tvm.runtime.tensor(x), packed).numpy()


def test_combined_float_linears_give_the_same_numbers():
    rng = np.random.default_rng(0)
    shapes = [(4, 8), (2, 8), (2, 8), (8, 8), (6, 8), (6, 8)]
    params = [rng.normal(0, 1, s).astype("float32") for s in shapes]
    x = rng.normal(0, 1, (5, 8)).astype("float32")
    after = CombineParallelMatmul(NAMES)(Before)
    joined = {n: params[i] for i, n in enumerate(NAMES)}
    for name, parts in after.attrs["kiln.combined"].items():
        joined[str(name)] = np.concatenate([joined[str(p)] for p in parts])
    expect = _run(Before, x, params)
    got = _run(after, x, [joined[str(n)] for n in after.attrs["kiln.params"]])
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)


class _Attention(nn.Module):
    def __init__(self):
        self.q_proj = nn.Linear(64, 32, bias=False)
        self.k_proj = nn.Linear(64, 16, bias=False)
        self.v_proj = nn.Linear(64, 16, bias=False)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return nn.op.concat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)


def test_combined_int4_linears_give_the_same_numbers():
    """q4f32: the combined kernel is rebuilt for 64 rows; its stored weight is the three
    weights quantized as one (what weight conversion writes), and the outputs are the same."""
    preset = get_quantization("q4f32")
    model = _Attention()
    layout = preset.quantize_model(model)
    spec = {"forward": {"x": nn.spec.Tensor(["n", 64], "float32"), "$": {"param_mode": "packed"}}}
    before, named = model.export_tvm(spec=spec)
    names = [n for n, _ in named]
    after = CombineParallelMatmul(names, linear_kernels(layout.schemes.values()))(before)
    assert dict(after.attrs["kiln.combined"]) == {
        "qkv_proj.qweight": ["q_proj.qweight", "k_proj.qweight", "v_proj.qweight"],
        "qkv_proj.scale": ["q_proj.scale", "k_proj.scale", "v_proj.scale"],
    }
    kernels = [gv for gv, f in after.functions_items() if LINEAR_ATTR in (f.attrs or {})]
    assert len(kernels) == 1  # one dequantizing matmul instead of three

    rng = np.random.default_rng(1)
    floats = {p: rng.normal(0, 1, (rows, 64)).astype("float32") for p, rows in
              (("q_proj", 32), ("k_proj", 16), ("v_proj", 16))}  # fmt: skip
    stored = {}
    for p, w in floats.items():
        stored.update({f"{p}.{k}": v for k, v in preset.quantize(p, w).items()})
    joined = preset.quantize("qkv", np.concatenate(list(floats.values())))
    stored.update({f"qkv_proj.{k}": v for k, v in joined.items()})
    x = rng.normal(0, 1, (3, 64)).astype("float32")

    def run(mod, order):
        vm = tvm_vm.VirtualMachine(tvm.compile(mod, tvm.target.Target("llvm")), tvm.cpu())
        return vm["forward"](tvm.runtime.tensor(x), [tvm.runtime.tensor(stored[n]) for n in order])

    expect = run(before, names).numpy()
    got = run(after, [str(n) for n in after.attrs["kiln.params"]]).numpy()
    np.testing.assert_array_equal(got, expect)


def test_a_llama_export_has_one_matmul_for_qkv_and_one_for_gate_up():
    from kiln.compiler.combine import combine_projections
    from kiln.compiler.export import export
    from kiln.models.attention import RoPE
    from kiln.models.llama import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-5,
        rope=RoPE(10000.0), context_length=64,
    )  # fmt: skip
    preset = get_quantization("q4f16")
    model = LlamaForCausalLM(config, preset.model_dtype)
    layout = preset.quantize_model(model)
    exported = export(model, config.attention_spec(), preset.model_dtype, 64)
    combined, groups = combine_projections(exported, layout)
    assert groups == {
        **{
            f"layers.{i}.self_attn.qkv_proj.weight": tuple(
                f"layers.{i}.self_attn.{p}_proj.weight" for p in "qkv"
            )
            for i in range(2)
        },
        **{
            f"layers.{i}.mlp.gate_up_proj.weight": (
                f"layers.{i}.mlp.gate_proj.weight",
                f"layers.{i}.mlp.up_proj.weight",
            )
            for i in range(2)
        },
    }
    names = [n for n, _, _ in combined.params]
    assert "layers.1.self_attn.qkv_proj.qweight" in names
    assert not any(".q_proj." in n or ".gate_proj." in n for n in names)
    for entry in ("prefill", "decode", "decode_1"):
        script = combined.mod[entry].script()
        # per layer: qkv, o, gate_up, down; plus the LM head
        assert script.count("dequantize_matmul") == 2 * 4 + 1, entry
        assert "R.concat" not in script  # attention reads the qkv matmul's output as it is
