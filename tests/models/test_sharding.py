"""Tensor-parallel sharding: the splits, the sharded program, each GPU's weights, the errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

import kiln
from kiln.compiler.export import export
from kiln.models.llama import LlamaConfig, LlamaForCausalLM
from kiln.models.sharding import Split
from kiln.runtime.errors import KilnError


def test_split_rows_by_segments_gives_each_rank_its_heads():
    q, kv = np.arange(8 * 3).reshape(8, 3), np.arange(100, 100 + 4 * 3).reshape(4, 3)
    k, v = kv, kv + 1000
    fused = np.concatenate([q, k, v])  # (16, 3)
    split = Split(0, (8, 4, 4))
    for r in range(2):
        want = np.concatenate([q[4 * r : 4 * r + 4], k[2 * r : 2 * r + 2], v[2 * r : 2 * r + 2]])
        np.testing.assert_array_equal(split.take(fused, r, 2), want)


def test_row_and_column_parallel_mlp_sums_to_the_whole():
    """SwiGLU with gate/up split by rows and down by columns: the ranks' partial outputs add up
    to the unsharded MLP (what the all-reduce after down_proj computes)."""
    rng = np.random.default_rng(0)
    hidden, inter, ranks = 16, 24, 4
    gate_up = rng.standard_normal((2 * inter, hidden))
    down = rng.standard_normal((hidden, inter))
    x = rng.standard_normal(hidden)

    def mlp(gu, d):
        g, u = np.split(gu @ x, 2)
        return d @ (g / (1 + np.exp(-g)) * u)

    partial = [
        mlp(Split(0, (inter, inter)).take(gate_up, r, ranks), Split(1).take(down, r, ranks))
        for r in range(ranks)
    ]
    np.testing.assert_allclose(sum(partial), mlp(gate_up, down), rtol=1e-12)


def _tiny_config(**changes) -> LlamaConfig:
    fields = dict(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
        rope=kiln.models.attention.RoPE(10000.0), context_length=64,
    )  # fmt: skip
    return LlamaConfig(**{**fields, **changes})


def test_sharded_program_all_reduces_twice_per_layer():
    def allreduces(tp: int) -> int:
        config = _tiny_config(tensor_parallel=tp)
        model = LlamaForCausalLM(config, "float32")
        mod = export(model, config.attention_spec(), "float32", config.vocab_size).mod
        return mod["decode"].script().count("R.ccl.allreduce")

    assert allreduces(1) == 0
    assert allreduces(2) == 2 * 3


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"tensor_parallel": 3}, "num_attention_heads"),
        ({"tensor_parallel": 4}, "num_key_value_heads"),
        ({"tensor_parallel": 2, "intermediate_size": 47}, "intermediate_size"),
    ],
)
def test_tensor_parallel_must_divide_heads_and_mlp(changes, field):
    with pytest.raises(KilnError, match=f"--tensor-parallel {changes['tensor_parallel']}.*{field}"):
        _tiny_config(**changes).validate()


def test_tp2_artifact_holds_each_gpus_slice(checkpoint, tmp_path):
    ckpt = checkpoint("llama")
    art = kiln.compile(str(ckpt), target="cpu", output=tmp_path / "tp2", tensor_parallel=2)
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["tensor_parallel"] == 2
    assert manifest["model"]["config"]["tensor_parallel"] == 2
    assert manifest["kv_cache"]["num_kv_heads"] == 1  # 2 KV heads over 2 GPUs
    hf = load_file(ckpt / "model.safetensors")
    ranks = [{}, {}]
    for p in manifest["params"]:
        assert "file" not in p and len(p["files"]) == 2
        for r, rel in enumerate(p["files"]):
            assert rel.startswith(f"params/rank-{r}/")
            ranks[r].setdefault(rel, load_file(art / rel))
            tensor = ranks[r][rel][p["name"]]
            assert list(tensor.shape) == p["shape"]
    by_name = [{k: v for f in rank.values() for k, v in f.items()} for rank in ranks]

    attn = "model.layers.1.self_attn"
    hd = 16  # hidden 64 / 4 heads
    for r in range(2):
        mine = by_name[r]
        want_qkv = np.concatenate(
            [hf[f"{attn}.q_proj.weight"][2 * hd * r : 2 * hd * (r + 1)]]
            + [hf[f"{attn}.{p}_proj.weight"][hd * r : hd * (r + 1)] for p in "kv"]
        )
        np.testing.assert_array_equal(mine["layers.1.self_attn.qkv_proj.weight"], want_qkv)
        o = hf[f"{attn}.o_proj.weight"]
        np.testing.assert_array_equal(
            mine["layers.1.self_attn.o_proj.weight"], o[:, 2 * hd * r : 2 * hd * (r + 1)]
        )
        down = hf["model.layers.0.mlp.down_proj.weight"]
        np.testing.assert_array_equal(
            mine["layers.0.mlp.down_proj.weight"], down[:, 56 * r : 56 * (r + 1)]
        )
        up = hf["model.layers.0.mlp.up_proj.weight"][56 * r : 56 * (r + 1)]
        np.testing.assert_array_equal(mine["layers.0.mlp.gate_up_proj.weight"][56:], up)
        for replicated in ("embed_tokens.weight", "lm_head.weight", "norm.weight"):
            np.testing.assert_array_equal(mine[replicated], by_name[0][replicated])
    np.testing.assert_array_equal(
        by_name[1]["embed_tokens.weight"], hf["model.embed_tokens.weight"]
    )


def test_tensor_parallel_errors(checkpoint, tmp_path):
    ckpt = str(checkpoint("llama"))
    with pytest.raises(KilnError, match="--tensor-parallel 3 does not divide"):
        kiln.compile(ckpt, target="cpu", output=tmp_path / "a", tensor_parallel=3)
    with pytest.raises(KilnError, match=r"NVIDIA GPUs.*--target cuda"):
        kiln.compile(ckpt, target="rocm", output=tmp_path / "b", tensor_parallel=2)
    with pytest.raises(KilnError, match="cannot split q4f16_awq"):
        kiln.compile(
            ckpt, target="cuda", quantization="q4f16_awq", output=tmp_path / "c", tensor_parallel=2
        )
    assert not any(tmp_path.iterdir())  # nothing written
