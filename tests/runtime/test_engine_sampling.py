"""Per-request sampling in the engine: seeds independent of the batch, penalties and logprobs
against NumPy references."""

from __future__ import annotations

import numpy as np
import pytest

import kiln
from kiln.runtime.errors import KilnError
from kiln.runtime.sampler import SamplingParams, TokenSampler, log_softmax


def penalized_reference(
    logits: np.ndarray, prompt: list[int], output: list[int], rep: float, pres: float, freq: float
) -> np.ndarray:
    """Penalties written out token by token, as vLLM documents them."""
    out = logits.astype(np.float64).copy()
    for t in set(prompt) | set(output):
        out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
    for t in set(output):
        out[t] -= freq * output.count(t) + pres
    return out


def test_penalties_match_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, 64).astype(np.float32)
    prompt = rng.integers(0, 64, 10).tolist()
    output = rng.integers(0, 64, 15).tolist()
    params = SamplingParams(
        temperature=0, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.25
    )
    sampler = TokenSampler(params, prompt, 64)
    for t in output:
        sampler.accept(t)
    expect = penalized_reference(logits, prompt, output, 1.3, 0.4, 0.25)
    np.testing.assert_allclose(sampler.process(logits), expect, rtol=1e-12)
    token, _ = sampler(logits)
    assert token == int(np.argmax(expect))
    # Without penalties the logits pass through untouched.
    plain = TokenSampler(SamplingParams(), prompt, 64)
    assert plain.process(logits) is logits


def test_penalized_greedy_and_logprobs_match_a_reference_loop(artifact):
    """The engine's penalized greedy tokens and logprobs equal a loop over the model's raw
    logits with the NumPy reference."""
    path = artifact("llama")
    model = kiln.load(path)
    prompt = [1, *np.random.default_rng(1).integers(3, 320, 30).tolist()]
    penalties = {"repetition_penalty": 1.5, "presence_penalty": 0.5, "frequency_penalty": 0.7}
    engine = kiln.Engine(path, max_batch_size=2)
    out = engine.submit(
        prompt, max_tokens=12, temperature=0, ignore_eos=True, logprobs=3, **penalties
    ).result()

    tokens, expect = list(prompt), []
    for _ in range(12):
        raw = model.prefill_logits(tokens)[-1]
        scores = penalized_reference(raw, prompt, expect, 1.5, 0.5, 0.7)
        token = int(np.argmax(scores))
        lp = out.logprobs[len(expect)]
        assert lp.token == token
        assert lp.logprob == pytest.approx(float(log_softmax(raw)[token]), abs=1e-5)
        ranked = np.argsort(-raw)[:3].tolist()
        assert [t for t, _ in lp.top] == ranked
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        expect.append(token)
        tokens.append(token)
    assert out.token_ids == expect
    unpenalized = model.generate_ids(prompt, max_tokens=12, temperature=0, ignore_eos=True)
    assert unpenalized != expect  # the penalties changed something


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(artifact):
    path = artifact("llama")
    rng = np.random.default_rng(2)
    prompt = [1, *rng.integers(3, 320, 20).tolist()]
    sampling = {"temperature": 0.9, "top_p": 0.95, "top_k": 50, "max_tokens": 24}
    sampling |= {"ignore_eos": True}

    def alone(seed: int) -> list[int]:
        engine = kiln.Engine(path, max_batch_size=1)
        return engine.submit(prompt, seed=seed, **sampling).result().token_ids

    def crowded(seed: int, crowd_seed: int) -> list[int]:
        crowd = np.random.default_rng(crowd_seed)
        engine = kiln.Engine(path, max_batch_size=6, prefill_chunk=24)
        others = [
            engine.submit(
                [1, *crowd.integers(3, 320, int(crowd.integers(2, 60))).tolist()],
                max_tokens=int(crowd.integers(5, 30)),
                temperature=float(crowd.choice([0.0, 0.7, 1.3])),
                seed=int(crowd.integers(0, 100)),
            )
            for _ in range(3)
        ]
        engine.step()
        engine.step()
        ours = engine.submit(prompt, seed=seed, **sampling)
        others += [engine.submit([1, 5, 9], max_tokens=40, temperature=1.0) for _ in range(2)]
        engine.run_until_idle()
        assert all(o.finished for o in others)
        return ours.result().token_ids

    first = alone(7)
    assert len(set(first)) > 5
    assert alone(7) == first
    assert crowded(7, crowd_seed=0) == first
    assert crowded(7, crowd_seed=1) == first
    assert alone(8) != first


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"presence_penalty": float("inf")}, "presence_penalty"),
        ({"frequency_penalty": "1"}, "frequency_penalty"),
        ({"logprobs": -1}, "logprobs"),
    ],
)
def test_invalid_penalties_raise_kiln_error(kwargs, field):
    with pytest.raises(KilnError, match=field):
        SamplingParams(**kwargs)
