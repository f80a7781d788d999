"""Sampling: greedy, filters, seeding, and the drawn distribution itself."""

import numpy as np
import pytest

from kiln.runtime.errors import KilnError
from kiln.runtime.sampler import SamplingParams, make_rng, sample


def _logits(n: int = 50, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 2, n).astype(np.float32)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_greedy_is_argmax_and_uses_no_randomness():
    logits = _logits()
    rng = make_rng(0)
    before = rng.bit_generator.state
    assert sample(logits, SamplingParams(temperature=0), rng) == int(np.argmax(logits))
    assert rng.bit_generator.state == before


def test_greedy_ties_pick_lowest_id():
    logits = np.array([0.0, 3.0, 1.0, 3.0], dtype=np.float32)
    assert sample(logits, SamplingParams(temperature=0), make_rng(0)) == 1


@pytest.mark.parametrize("temperature", [0.1, 1.0, 5.0])
def test_top_k_one_is_argmax(temperature):
    logits = _logits()
    params = SamplingParams(temperature=temperature, top_k=1)
    rng = make_rng(1)
    assert {sample(logits, params, rng) for _ in range(100)} == {int(np.argmax(logits))}


def test_same_seed_same_draws_different_seed_different_draws():
    logits = _logits()
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=40)

    def draws(seed):
        rng = make_rng(seed)
        return [sample(logits, params, rng) for _ in range(50)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_empirical_distribution_matches_softmax():
    logits = _logits(20)
    expected = _softmax(logits.astype(np.float64) / 0.7)
    rng = make_rng(123)
    params = SamplingParams(temperature=0.7)
    counts = np.bincount([sample(logits, params, rng) for _ in range(20000)], minlength=20)
    total_variation = 0.5 * np.abs(counts / counts.sum() - expected).sum()
    assert total_variation < 0.02


def test_top_k_stays_in_top_k():
    logits = _logits(100, seed=3)
    top5 = set(np.argsort(-logits)[:5].tolist())
    rng = make_rng(0)
    params = SamplingParams(temperature=3.0, top_k=5)
    seen = {sample(logits, params, rng) for _ in range(2000)}
    assert seen <= top5
    assert len(seen) == 5  # at temperature 3 every one of them should turn up


@pytest.mark.parametrize("vocab", [100, 1000])  # 1000 exceeds the sampler's first partial ranking
@pytest.mark.parametrize("top_p", [0.3, 0.8, 0.99])
def test_top_p_stays_in_nucleus(vocab, top_p):
    logits = _logits(vocab, seed=5)
    probs = _softmax(logits.astype(np.float64) / 1.3)
    order = np.argsort(-probs, kind="stable")
    n = int(np.argmax(np.cumsum(probs[order]) >= top_p)) + 1
    nucleus = set(order[:n].tolist())
    rng = make_rng(0)
    params = SamplingParams(temperature=1.3, top_p=top_p)
    seen = {sample(logits, params, rng) for _ in range(3000)}
    assert seen <= nucleus
    assert len(seen) >= min(len(nucleus), 3)


def test_top_p_and_top_k_combine_on_the_renormalized_top_k():
    logits = np.log(np.array([0.5, 0.3, 0.1, 0.06, 0.04]))
    # Inside the top 2 the first token holds 0.5 / 0.8 = 0.625 < 0.7, so both must remain.
    params = SamplingParams(temperature=1.0, top_k=2, top_p=0.7)
    rng = make_rng(0)
    assert {sample(logits, params, rng) for _ in range(500)} == {0, 1}


def test_tiny_top_p_keeps_one_token():
    logits = _logits()
    params = SamplingParams(top_p=1e-9)
    rng = make_rng(0)
    assert {sample(logits, params, rng) for _ in range(50)} == {int(np.argmax(logits))}


def test_masked_logits_are_never_drawn():
    logits = np.full(10, -np.inf, dtype=np.float32)
    logits[[2, 7]] = 0.0
    rng = make_rng(0)
    assert {sample(logits, SamplingParams(), rng) for _ in range(200)} == {2, 7}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": [""]}, "stop"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_params_raise_kiln_error(kwargs, field):
    with pytest.raises(KilnError, match=field):
        SamplingParams(**kwargs)


def test_stop_is_normalized_to_a_tuple():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
