"""The shipped trained model (examples/tiny-code-llama): transformers agrees with Kiln on it, a
golden greedy continuation, and perplexity on held-out code for every quantization preset."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import kiln
from kiln.compiler.quantization import QUANTIZATIONS, imports_checkpoint

MODEL = Path(__file__).resolve().parents[2] / "examples" / "tiny-code-llama"
PROMPT = "def fibonacci(n):"
# 32 greedy tokens after PROMPT from the CPU q0f32 build (and from transformers, checked below):
# '\n    """Return the fibonacci() of the numeric numeric numeric numeric\n       numbers.\n\n
#  >>> fib = Fraction('
GOLDEN = [
    279, 435, 1087, 337, 887, 68, 273, 728, 678, 307, 451, 337, 327, 3970, 327, 3970,
    327, 3970, 327, 3970, 2380, 1323, 85, 16, 326, 893, 887, 68, 282, 491, 3397, 10,
]  # fmt: skip
WINDOW, WINDOWS = 512, 4  # perplexity over the first 2048 held-out tokens
# Perplexity may rise by at most this factor over fp32 (set from measurements; see README).
# Measured on 2026-11-26: fp32 19.717; q0f16 19.697; q8f16 19.74 (1.001); q4f16/q4f32 21.85
# (1.108); q4f16_fe about 20.97 (1.063); fp8e4m3 19.818 (1.005).
PPL_BOUND = {
    "q0f32": 1.0,
    "q0f16": 1.01,
    "q8f16": 1.01,
    "q4f16": 1.12,
    "q4f32": 1.12,
    "q4f16_fe": 1.08,
    "fp8e4m3": 1.02,
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """preset -> its artifact. q0f32 (the golden tokens, the reference perplexity) is built as
    `kiln compile` builds by default, for any x86-64 (or aarch64); the other presets for this
    machine's CPU (--arch native): generic x86-64 has no F16C, so each fp16 <-> fp32 conversion
    is a library call, and a 512-token q0f16 prefill of this model takes 142 s instead of 8."""
    made: dict[str, Path] = {}

    def get(preset: str) -> Path:
        if preset not in made:
            out = tmp_path_factory.mktemp(f"code-{preset}") / "artifact"
            arch = {} if preset == "q0f32" else {"arch": "native"}
            made[preset] = kiln.compile(str(MODEL), quantization=preset, output=out, **arch)
        return made[preset]

    return get


def perplexity(model) -> float:
    ids = model.tokenizer.encode((MODEL / "heldout.txt").read_text(encoding="utf-8"))
    nll, count = 0.0, 0
    for w in range(WINDOWS):
        chunk = ids[w * WINDOW : (w + 1) * WINDOW + 1]
        logits = model.prefill_logits(chunk[:-1]).astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= logp[np.arange(len(chunk) - 1), chunk[1:]].sum()
        count += len(chunk) - 1
    return float(np.exp(nll / count))


def test_golden_greedy_continuation(compiled):
    model = kiln.load(compiled("q0f32"))
    ids = model.tokenizer.encode(PROMPT)
    assert model.generate_ids(ids, max_tokens=32, temperature=0) == GOLDEN


def test_transformers_loads_it_and_agrees(compiled):
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL)
    ref = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
    assert out[0, len(ids) :].tolist() == GOLDEN
    text = (MODEL / "heldout.txt").read_text(encoding="utf-8")[:3000]
    ids = tokenizer(text)["input_ids"][:400]
    ours = kiln.load(compiled("q0f32")).prefill_logits(ids)
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() <= 1e-4


@pytest.fixture(scope="module")
def fp32_perplexity(compiled):
    return perplexity(kiln.load(compiled("q0f32")))


# bfloat16 has no native CPU path in LLVM here: every operation is emulated, and scoring 2048
# tokens takes many minutes on a 2-core machine. Its accuracy is checked on the tiny models
# (tests/models/test_quantized.py); the perplexity table leaves it out, as it does presets that
# import a pre-quantized checkpoint (q4f16_awq), which this model has none of.
# fp8e4m3 is scored on request (KILN_PERPLEXITY_ALL=1): one more preset costs one to three
# minutes on 2 cores, and its accuracy is checked on the tiny models in every run.
ON_REQUEST = {"fp8e4m3"}
SCORED = sorted(
    p
    for p, q in QUANTIZATIONS.items()
    if q.model_dtype != "bfloat16"
    and not imports_checkpoint(q)
    and (p not in ON_REQUEST or os.environ.get("KILN_PERPLEXITY_ALL") == "1")
)


def test_every_scored_preset_has_a_bound():
    assert set(SCORED) | ON_REQUEST <= set(PPL_BOUND)


@pytest.mark.parametrize("preset", SCORED)
def test_perplexity_per_preset(preset, compiled, fp32_perplexity):
    ppl = perplexity(kiln.load(compiled(preset)))
    print(f"\n{preset}: held-out perplexity {ppl:.3f} (fp32 {fp32_perplexity:.3f})")
    assert 1.0 < fp32_perplexity < 50.0  # a trained model, not a random one (random: ~4096)
    assert ppl <= fp32_perplexity * PPL_BOUND[preset] + 1e-6
