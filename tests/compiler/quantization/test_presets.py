"""The preset registry, what each preset does to a model's parameters (the layout that maps
float parameters onto the exported ones), and the compile-time target check."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import kiln
from kiln.compiler.export import export
from kiln.compiler.quantization import QUANTIZATIONS
from kiln.models import MODELS
from kiln.runtime.errors import KilnError
from kiln.targets import TARGETS

HF = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=80,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def build(family: str, preset: str, **overrides):
    fam = MODELS[family]
    config = fam.config_class.from_hf({**HF, **overrides})
    quant = QUANTIZATIONS[preset]
    model = fam.model_class(config, quant.model_dtype)
    return config, model, quant.quantize_model(model)


def test_registry():
    assert list(QUANTIZATIONS) == [
        "q0f32", "q0f16", "q0bf16", "q4f16", "q4f32", "q4f16_fe", "q8f16", "fp8e4m3",
        "fp8e4m3_bf16", "q4f16_awq",
    ]  # fmt: skip
    for name, preset in QUANTIZATIONS.items():
        assert preset.name == name and preset.description
        assert dataclasses.is_dataclass(preset) and preset.__dataclass_params__.frozen
        entry = preset.to_json()
        assert entry["name"] == name and entry["model_dtype"] == preset.model_dtype


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize(
    "preset,quantized",
    [
        ("q0f16", set()),
        ("q4f16", {"embed_tokens", "lm_head", *LINEARS}),
        ("q4f16_fe", set(LINEARS)),
        ("q8f16", {"embed_tokens", "lm_head", *LINEARS}),
        ("fp8e4m3", {"embed_tokens", "lm_head", *LINEARS}),
    ],
)
def test_layout_maps_float_params_onto_the_exported_ones(preset, quantized):
    config, model, layout = build("llama", preset)
    float_model = MODELS["llama"].model_class(config, "float32")
    assert list(layout.sources) == [n for n, _ in float_model.named_parameters()]
    assert {n.split(".")[-2] for n in layout.schemes} == quantized
    exported = export(model, config.attention_spec(), layout.dtype, config.vocab_size)
    layout.check(exported.params)  # every exported param has exactly one source
    if quantized:
        dtypes = {n.split(".", 2)[-1]: d for n, _, d in exported.params if "layers.0" in n}
        qdtype = {"q4f16": "uint32", "q4f16_fe": "uint32", "q8f16": "int8", "fp8e4m3": "uint8"}
        assert dtypes["self_attn.o_proj.qweight"] == qdtype[preset]
        assert dtypes["self_attn.o_proj.scale"] == ("float32" if "fp8" in preset else "float16")
        w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
        out = layout.transform("layers.0.self_attn.o_proj.weight", w)
        assert sorted(out) == [f"layers.0.self_attn.o_proj.{k}" for k in ("qweight", "scale")]
    out = layout.transform("norm.weight", np.ones(64, np.float32))
    assert out["norm.weight"].dtype == np.float16

    with pytest.raises(KilnError, match="bug in Kiln's quantization"):
        layout.check(exported.params[:-1])
    with pytest.raises(KilnError, match="bug in Kiln's quantization"):
        layout.check([(n, s, "float64") for n, s, _ in exported.params])


def test_tied_embedding_and_router():
    _, _, tied = build("llama", "q4f32", tie_word_embeddings=True)
    assert "embed_tokens.weight" in tied.schemes and "lm_head.weight" not in tied.sources
    _, _, moe = build("mixtral", "q4f16", num_local_experts=3, num_experts_per_tok=2)
    assert "layers.0.mlp.experts.2.up_proj.weight" in moe.schemes
    assert "layers.0.mlp.gate.weight" in moe.sources  # the router stays float
    assert "layers.0.mlp.gate.weight" not in moe.schemes


def test_preset_the_target_cannot_run(monkeypatch):
    fp32_only = dataclasses.replace(TARGETS["cpu"], name="fp32only", dtypes=("float32",))
    monkeypatch.setitem(TARGETS, "fp32only", fp32_only)
    with pytest.raises(KilnError, match=r"q4f16 computes in float16.*fp32only.*q0f32, q4f32$"):
        kiln.compile("no-such-model", target="fp32only", quantization="q4f16")
