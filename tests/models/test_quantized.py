"""Quantized CPU artifacts of every family.

Kernel correctness is isolated from quantization error: each artifact is compared with
transformers running, in fp32, the weights the artifact actually holds (quantized weights
dequantized exactly as the kernels do, float weights as stored). Quantization error itself is
measured against the original fp32 model and printed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch
from model_checks import FAMILIES, PROMPT_LEN, assert_logits_match, prompt, rel_err

import kiln
from kiln.compiler.combine import combine_layout, combine_projections
from kiln.compiler.export import export
from kiln.compiler.quantization import QUANTIZATIONS
from kiln.models import MODELS
from kiln.runtime.artifact import read_manifest
from kiln.runtime.safetensors import load_safetensors

DECODE_STEPS = 4
# Max relative logits error against transformers on the same (dequantized) weights: the kernels
# accumulate in fp32, so f16 presets differ only by rounding fp16 (bf16) activations.
BOUND = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 5e-2}
CASES = [(f, q) for f in FAMILIES for q in ("q4f32", "q4f16", "q8f16", "fp8e4m3")] + [
    ("llama3", "q4f16_fe"),  # the tied embedding kept in fp16
    ("llama", "q0bf16"),
    ("llama", "fp8e4m3_bf16"),
]


def artifact_weights(path: Path) -> dict[str, np.ndarray]:
    """The artifact's weights as the float32 parameters of the unquantized model, as its
    family writes them (a combined q/k/v or gate/up parameter split back into its parts)."""
    manifest = read_manifest(path)
    family = MODELS[manifest.data["model"]["family"]]
    config = family.config_class.from_json(manifest.config)
    entry = manifest.data["quantization"]
    preset = QUANTIZATIONS[entry["name"]]
    if "group_size" in entry:  # an imported checkpoint's own group size
        preset = dataclasses.replace(preset, group_size=entry["group_size"])
    model = family.model_class(config, preset.model_dtype)
    layout = preset.quantize_model(model)
    exported = export(model, config.attention_spec(), preset.model_dtype, config.vocab_size)
    _, groups = combine_projections(exported, layout)
    combined = combine_layout(layout, groups)
    stored: dict[str, np.ndarray] = {}
    for rel in sorted({p["file"] for p in manifest.params}):
        stored.update(load_safetensors(path / rel))
    weights = {}
    for name, shape in combined.sources.items():
        scheme = combined.schemes.get(name)
        if scheme is None:
            weights[name] = stored[name].astype(np.float32)
        else:
            prefix = name.removesuffix(".weight")
            parts = {k: stored[f"{prefix}.{k}"] for k in scheme.storage(*shape)}
            weights[name] = scheme.dequantize(parts, shape[1]).astype(np.float32)
    for name, parts in groups.items():
        rows = np.cumsum([layout.sources[p][0] for p in parts])[:-1]
        weights.update(zip(parts, np.split(weights.pop(name), rows), strict=True))
    return weights


def dequantized_checkpoint(ckpt: Path, path: Path, out: Path) -> Path:
    """A Hugging Face checkpoint of the weights artifact `path` holds (the weight map inverted)."""
    manifest = read_manifest(path)
    family = MODELS[manifest.data["model"]["family"]]
    config = family.config_class.from_json(manifest.config)
    weights = artifact_weights(path)
    tensors = {}
    for name, source in family.weight_map(config).items():
        assert source.combine is None, "the test inverts one-tensor sources only"
        tensors[source.names[0]] = weights[name]
    out.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text((ckpt / "config.json").read_text())
    return out


@pytest.mark.parametrize("name,preset", CASES)
def test_logits_match_transformers_on_dequantized_weights(
    name, preset, checkpoint, artifact, reference, tmp_path
):
    path = artifact(name, preset)
    ref = reference(dequantized_checkpoint(checkpoint(name), path, tmp_path / "dequantized"))
    bound = BOUND[QUANTIZATIONS[preset].model_dtype]
    assert_logits_match(kiln.load(path), ref, bound, DECODE_STEPS)


# -- AutoAWQ checkpoints (q4f16_awq) ----------------------------------------------------------

# AutoAWQ's order_map (WQLinear_GEMM.from_linear): nibble i of word w holds feature 8w + ORDER[i].
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
AWQ_GROUP = 16  # divides the tiny models' widths (64, 96, 112)


def awq_pack(values: np.ndarray) -> np.ndarray:
    """(n, m) ints in 0..15 -> (n, m / 8) int32, AutoAWQ's packing loop transcribed."""
    n, m = values.shape
    packed = np.zeros((n, m // 8), np.uint32)
    for col in range(m // 8):
        for i in range(8):
            packed[:, col] |= values[:, col * 8 + AWQ_ORDER[i]].astype(np.uint32) << (4 * i)
    return packed.view(np.int32)


def awq_checkpoints(ckpt: Path, out: Path) -> tuple[Path, Path]:
    """An AutoAWQ-style checkpoint with the architecture of `ckpt` (every linear layer of the
    decoder as random qweight/qzeros/scales; embedding, LM head, norms and router in fp16),
    and a plain fp32 checkpoint of the weights it means, w = (q - z) * s in fp16."""
    rng = np.random.default_rng(7)
    awq, plain = {}, {}
    for name, value in safetensors.numpy.load_file(ckpt / "model.safetensors").items():
        router = name.endswith("block_sparse_moe.gate.weight")  # AutoAWQ keeps it in fp16
        if not name.startswith("model.layers.") or value.ndim != 2 or router:
            awq[name] = value.astype(np.float16)
            plain[name] = awq[name].astype(np.float32)
            continue
        out_f, in_f = value.shape
        groups = in_f // AWQ_GROUP
        q = rng.integers(0, 16, (in_f, out_f))
        z = rng.integers(0, 16, (groups, out_f))
        s = (rng.uniform(0.5, 1.5, (groups, out_f)) * in_f**-0.5 / 5).astype(np.float16)
        w = (q - np.repeat(z, AWQ_GROUP, axis=0)).astype(np.float16)
        w = w * np.repeat(s, AWQ_GROUP, axis=0)  # fp16 product, as AutoAWQ's dequantize_gemm
        stem = name.removesuffix(".weight")
        awq.update({f"{stem}.qweight": awq_pack(q), f"{stem}.qzeros": awq_pack(z)})
        awq[f"{stem}.scales"] = s
        plain[name] = np.ascontiguousarray(w.T.astype(np.float32))
    config = json.loads((ckpt / "config.json").read_text())
    dirs = out / "awq", out / "plain"
    for d, tensors in zip(dirs, (awq, plain), strict=True):
        d.mkdir(parents=True)
        safetensors.numpy.save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(config))
    config["quantization_config"] = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": AWQ_GROUP,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": ["gate"] if config.get("num_local_experts") else None,
    }
    (dirs[0] / "config.json").write_text(json.dumps(config))
    return dirs


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_awq_checkpoint_matches_transformers_on_its_weights(name, checkpoint, reference, tmp_path):
    """The artifact holds exactly the AWQ weights (dequantized, bit for bit what transformers
    runs) and its logits match transformers on them."""
    awq, plain = awq_checkpoints(checkpoint(name), tmp_path)
    path = kiln.compile(str(awq), target="cpu", quantization="q4f16_awq", output=tmp_path / "art")
    manifest = read_manifest(path)
    assert manifest.data["quantization"]["group_size"] == AWQ_GROUP
    assert "layers.0.self_attn.qkv_proj.zero" in {p["name"] for p in manifest.params}
    expected = safetensors.numpy.load_file(plain / "model.safetensors")
    family = MODELS[manifest.data["model"]["family"]]
    wmap = family.weight_map(family.config_class.from_json(manifest.config))
    for kiln_name, value in artifact_weights(path).items():
        np.testing.assert_array_equal(value, expected[wmap[kiln_name].names[0]], err_msg=kiln_name)
    assert_logits_match(kiln.load(path), reference(plain), BOUND["float16"], DECODE_STEPS)


def test_quantization_error_against_fp32(checkpoint, artifact, reference, capsys):
    """Logits error and top-1 agreement of each preset against the fp32 model, printed. The
    tiny models have random Gaussian weights, a hard case for 4 bits (no outliers to spare, and
    near-flat logits); the bounds only catch a broken quantizer, which scores top-1 near 0."""
    rows = []
    for name in FAMILIES:
        ids = prompt(6)
        with torch.no_grad():
            theirs = reference(checkpoint(name))(torch.tensor([ids])).logits[0].numpy()
        for preset in [q for f, q in [("llama", "q0f16"), *CASES] if f == name]:
            ours = kiln.load(artifact(name, preset)).prefill_logits(ids)
            rms = float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
            top1 = float((ours.argmax(-1) == theirs.argmax(-1)).mean())
            rows.append((name, preset, rel_err(ours, theirs), rms, top1))
    with capsys.disabled():
        print(f"\nquantization error vs fp32, {PROMPT_LEN}-token prompt: max rel, rms rel, top-1")
        for name, preset, err, rms, top1 in rows:
            print(f"  {name:13s} {preset:9s} {err:.4f} {rms:.4f} {top1:.3f}")
    # fp8 e4m3 keeps 3 mantissa bits (each weight within 1/16 of itself): measured rms 0.06 to
    # 0.11 here, about four times int8's per-channel error on these Gaussian weights.
    for name, preset, _, rms, top1 in rows:
        q4, fp8 = preset.startswith("q4"), preset.startswith("fp8")
        assert rms <= (0.6 if q4 else 0.2 if fp8 else 0.1), (name, preset)
        assert top1 >= (0.3 if q4 else 0.8), (name, preset)


def test_conversion_is_deterministic(checkpoint, artifact, tmp_path):
    """Compiling twice gives byte-identical weight files."""
    first = artifact("llama3", "q4f16")
    second = kiln.compile(
        str(checkpoint("llama3")), target="cpu", quantization="q4f16", output=tmp_path / "again"
    )
    files = [p.relative_to(first) for p in sorted((first / "params").iterdir())]
    assert files == [p.relative_to(second) for p in sorted((second / "params").iterdir())]
    for rel in files:
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel
    manifest = json.loads((second / "manifest.json").read_text())
    assert manifest["quantization"] == QUANTIZATIONS["q4f16"].to_json()
