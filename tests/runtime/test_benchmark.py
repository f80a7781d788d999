"""`kiln bench` (kiln.runtime.benchmark): the roofline inputs against independent counts, and
the command end to end on a tiny CPU artifact; the random weights benchmarks fill artifacts
with (bench/random_weights.py)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import kiln
from kiln.compiler.cli import main
from kiln.runtime.benchmark import (
    batched_decode,
    decode_step_bytes,
    decode_weight_bytes,
    matmul_flops_per_token,
)
from kiln.runtime.errors import KilnError
from kiln.runtime.runner import Runner
from kiln.runtime.safetensors import load_safetensors


@pytest.mark.parametrize("name", ["llama", "llama3", "mixtral"])
def test_flops_per_token_count_every_projection(name, checkpoint, artifact, reference):
    """2 x every weight matrix element of transformers' model that a token multiplies: all but
    the embedding (which is the LM head when tied), Mixtral's experts at top-k of N."""
    model = reference(checkpoint(name))
    config = Runner(artifact(name), kv_tokens=64).config
    tied = config["tie_word_embeddings"]
    total = 0.0
    for pname, p in model.named_parameters():  # a tied LM head is listed once, as the embedding
        if p.dim() < 2 or ("embed_tokens" in pname and not tied):
            continue
        share = 1.0
        if ".experts." in pname:
            share = config["num_experts_per_tok"] / config["num_local_experts"]
        total += 2 * p.numel() * share
    assert matmul_flops_per_token(config) == pytest.approx(total, rel=1e-12)


@pytest.mark.parametrize("name", ["llama", "llama3"])  # untied and tied embeddings
def test_decode_bytes_leave_out_only_an_untied_embedding(name, artifact):
    runner = Runner(artifact(name), kv_tokens=64)
    tensors = {}
    for f in {p["file"] for p in runner.manifest.params}:
        tensors |= load_safetensors(runner.manifest.root / f)
    total = sum(a.nbytes for a in tensors.values())
    embed = sum(a.nbytes for n, a in tensors.items() if n.startswith("embed_tokens."))
    tied = runner.config["tie_word_embeddings"]
    assert decode_weight_bytes(runner) == (total if tied else total - embed)


def test_decode_bytes_of_a_mixture_count_the_routed_experts(artifact):
    runner = Runner(artifact("mixtral"), kv_tokens=64)
    tensors = {}
    for f in {p["file"] for p in runner.manifest.params}:
        tensors |= load_safetensors(runner.manifest.root / f)
    experts = sum(a.nbytes for n, a in tensors.items() if ".experts." in n)
    rest = sum(
        a.nbytes for n, a in tensors.items() if ".experts." not in n and "embed_tokens" not in n
    )
    n, k = runner.config["num_local_experts"], runner.config["num_experts_per_tok"]
    assert decode_weight_bytes(runner) == pytest.approx(rest + experts * k / n, abs=1)
    # Many tokens route to nearly every expert.
    assert decode_weight_bytes(runner, 64) == pytest.approx(rest + experts, rel=1e-6)


def test_a_decode_step_reads_the_weights_and_each_sequences_mean_history(artifact):
    """4 sequences decoding 50 tokens after 100-token prompts: K/V at 125 tokens each, in the
    cache's dtype (q0f32: 4 bytes), keys and values of every layer's KV heads."""
    runner = Runner(artifact("llama3"), kv_tokens=64)
    c = runner.config
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    per_token = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * head_dim * 4
    want = decode_weight_bytes(runner, 4) + 4 * 125 * per_token
    assert decode_step_bytes(runner, 4, 100, 50) == want


def test_kiln_bench_on_the_cpu(artifact):
    result = CliRunner().invoke(
        main, ["bench", str(artifact("llama")), "--device", "cpu", "--batches", "2"]
    )
    assert result.exit_code == 0, result.output
    lines = {line.split("  ")[0].strip(): line for line in result.output.splitlines()}
    for figure in ("load", "decode tokens/s, batch 1", "time to first token, 128 tokens"):
        assert figure in lines, result.output
    rate = float(lines["decode tokens/s, batch 1"].split()[4])
    assert rate > 0 and "roofline" in lines["decode tokens/s, batch 1"]
    assert any(k.startswith("decode tokens/s, batch 2") for k in lines), result.output
    assert np.isfinite(rate)
    assert "not finite" not in result.output


def test_benchmark_without_prefills_or_batches(artifact):
    """kiln.runtime.benchmark.run with no prefill sizes and no batches measures the batch-1
    decode alone (its engine prefills in chunks of 2048 tokens: 4 of the batched decode's
    512-token prompts a step, so that 128 of them are all prefilled before the first finish)."""
    from kiln.runtime.benchmark import run

    said = []
    run(artifact("llama"), "cpu", batches=(), prefills=(), say=said.append)
    text = "\n".join(map(str, said))
    assert "decode tokens/s, batch 1" in text and "prefill tokens/s" not in text, text


def test_a_batch_that_never_decodes_together_is_a_clear_error(artifact):
    """One new token each: every request finishes at its prefill, so no step decodes them all
    at once, and there is no rate to give."""
    with kiln.Engine(artifact("llama"), device="cpu", max_batch_size=2) as engine:
        with pytest.raises(KilnError, match="no step decoded all 2 requests at once"):
            batched_decode(engine, [[1, 5, 6, 7], [1, 8, 9]], 1)


def test_kiln_bench_warns_of_weights_that_give_nan(artifact, tmp_path):
    """An artifact whose final norm weight is NaN (as overflowing random weights end up): the
    run says so before its figures."""
    from safetensors.numpy import save_file

    from kiln.runtime.artifact import file_entry

    art = tmp_path / "art"
    shutil.copytree(artifact("llama"), art)
    manifest = json.loads((art / "manifest.json").read_text())
    (entry,) = [p for p in manifest["params"] if p["name"] == "norm.weight"]
    tensors = load_safetensors(art / entry["file"])
    tensors["norm.weight"] = np.full_like(tensors["norm.weight"], np.nan)
    save_file(tensors, str(art / entry["file"]))
    manifest["files"][entry["file"]] = file_entry(art / entry["file"])
    (art / "manifest.json").write_text(json.dumps(manifest, indent=2))
    result = CliRunner().invoke(main, ["bench", str(art), "--device", "cpu", "--batches", "2"])
    assert result.exit_code == 0, result.output
    assert "logits are not finite" in result.output


def test_random_benchmark_weights_are_zero_mean_int4_of_the_float_std(artifact, tmp_path):
    """bench/random_weights.py fills a q4f16 artifact: every int4 code in 1..15 (values -7..7),
    each dequantized matrix of std 1/sqrt(K) (as its N(0, 1/K) float matrices), the artifact
    verifies and its logits are finite. (A fixed scale of 0.02 and all 16 codes made the 7B's
    activations overflow fp16.)"""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from random_weights import fill

    art = tmp_path / "art"
    shutil.copytree(artifact("llama", "q4f16"), art)
    fill(art)
    runner = Runner(art, kv_tokens=64)
    tensors = {}
    for f in {p["file"] for p in runner.manifest.params}:
        tensors |= load_safetensors(runner.manifest.root / f)
    shifts = 4 * np.arange(8, dtype=np.uint32)
    matrices = [n for n in tensors if n.endswith("qweight")]
    assert matrices
    for name in matrices:
        words = tensors[name]
        codes = ((words[..., None] >> shifts) & 15).reshape(len(words), -1).astype(np.int64)
        assert codes.min() >= 1 and codes.max() <= 15, name
        scale = tensors[name.removesuffix("qweight") + "scale"].astype(np.float64)
        weights = (codes - 8) * np.repeat(scale, 32, axis=1)
        k = weights.shape[1]
        assert weights.std() == pytest.approx(k**-0.5, rel=0.05), name
        assert abs(weights.mean()) < 0.05 * k**-0.5, name
    logits = kiln.load(art).prefill_logits([1, *range(3, 40)])
    assert np.isfinite(logits).all()
