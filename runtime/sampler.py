"""Pick the next token from a logits vector: greedy, or temperature / top-k / top-p sampling.

Everything runs in float64 on the host. Ties between equal probabilities always resolve to the
lower token id, so a seeded run gives the same tokens on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kiln.runtime.errors import KilnError

# Top-p alone would need a full sort of the vocabulary; most of the mass usually sits in a few
# hundred tokens, so rank that many first and rank 16 times more each time they fall short.
_TOP_P_FIRST_TRY = 256


@dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens. temperature 0 means greedy; top_k 0 and top_p 1 mean no filtering."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Callers naturally write stop="###" or stop=["a", "b"]; keep one hashable form inside.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        self.validate()

    def validate(self) -> None:
        """Raise KilnError naming the first field outside its valid range."""
        if not _is_number(self.temperature) or not self.temperature >= 0:
            _bad("temperature", self.temperature, "a number >= 0 (0 means greedy)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            _bad("top_p", self.top_p, "a number in (0, 1] (1 turns it off)")
        if not _is_int(self.top_k) or self.top_k < 0:
            _bad("top_k", self.top_k, "an integer >= 0 (0 turns it off)")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            _bad("max_tokens", self.max_tokens, "an integer >= 1")
        if self.seed is not None and not _is_int(self.seed):
            _bad("seed", self.seed, "an integer or None")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                _bad("stop", self.stop, "non-empty strings")


def make_rng(seed: int | None) -> np.random.Generator:
    """A generator for sample(); seed None draws fresh entropy from the OS."""
    return np.random.default_rng(seed)


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Choose one token id from a 1-D logits vector according to params."""
    logits = np.asarray(logits)
    if logits.ndim != 1 or logits.size == 0:
        raise ValueError(f"sample() needs a non-empty 1-D logits vector, got shape {logits.shape}")
    if np.isnan(logits).any() or not np.isfinite(np.max(logits)):
        raise ValueError("logits contain NaN or no finite maximum; the model output is invalid")
    if params.temperature == 0:
        return int(np.argmax(logits))  # argmax already returns the lowest id among ties

    probs = _softmax(logits.astype(np.float64) / params.temperature)
    if params.top_k == 0 and params.top_p == 1.0:
        return _draw(np.arange(probs.size), probs, rng)

    candidates = _filtered_candidates(probs, params.top_k, params.top_p)
    return _draw(candidates, probs[candidates], rng)


def _filtered_candidates(probs: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    # Top-k first, then the nucleus of what is left: the order transformers' warpers use.
    if top_k:
        ranked = _top_indices(probs, top_k)
        if top_p == 1.0:
            return ranked
        kept = probs[ranked]
        return ranked[: _nucleus_size(kept, kept.sum(), top_p, complete=True)]
    total = probs.sum()
    tried = _TOP_P_FIRST_TRY
    while True:
        ranked = _top_indices(probs, tried)
        complete = ranked.size == probs.size
        n = _nucleus_size(probs[ranked], total, top_p, complete)
        if n is not None:
            return ranked[:n]
        tried *= 16


def _nucleus_size(ranked: np.ndarray, total: float, top_p: float, complete: bool) -> int | None:
    """How many of the ranked probabilities reach top_p of total; None if they all fall short."""
    cumulative = np.cumsum(ranked)
    n = int(np.searchsorted(cumulative, top_p * total, side="left")) + 1
    if n <= ranked.size:
        return n
    # With every token ranked, falling short can only be rounding in the running sum.
    return ranked.size if complete else None


def _top_indices(probs: np.ndarray, k: int) -> np.ndarray:
    """The k most probable ids, most probable first, lower id first among equals."""
    if k >= probs.size:
        idx = np.arange(probs.size)
    else:
        threshold = np.partition(probs, probs.size - k)[probs.size - k]
        idx = np.flatnonzero(probs >= threshold)  # ascending ids, perhaps a few extra ties
    # A stable sort of ascending ids keeps lower ids first among equal probabilities.
    return idx[np.argsort(-probs[idx], kind="stable")[:k]]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


def _draw(ids: np.ndarray, weights: np.ndarray, rng: np.random.Generator) -> int:
    cumulative = np.cumsum(weights)
    # Scaling u by the total renormalizes without a second pass over the weights.
    pos = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return int(ids[min(pos, ids.size - 1)])


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _bad(field: str, value: object, valid: str) -> None:
    raise KilnError(f"SamplingParams.{field} is {value!r}; it must be {valid}.")
