"""Pick the next token from a logits vector: greedy, or temperature / top-k / top-p sampling,
after optional repetition / presence / frequency penalties.

Everything runs in float64 on the host. Ties between equal probabilities always resolve to the
lower token id, so a seeded run gives the same tokens on every machine. `TokenSampler` is one
request's sampling state (its own RNG and token counts), so what a request draws never depends
on what else shares the batch.
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
    # Penalties, as vLLM defines them: repetition divides positive logits (multiplies negative
    # ones) of every token in the prompt or the output; presence and frequency subtract from
    # the logits of output tokens once, and once per occurrence.
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Log-probabilities (of the model's distribution, before penalties and temperature) of each
    # chosen token, plus this many most likely alternatives; None: none are computed.
    logprobs: int | None = None

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
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            _bad("seed", self.seed, "an integer >= 0 or None")
        if not _is_number(self.repetition_penalty) or not self.repetition_penalty > 0:
            _bad("repetition_penalty", self.repetition_penalty, "a number > 0 (1 turns it off)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not np.isfinite(value):
                _bad(name, value, "a finite number (0 turns it off)")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            _bad("logprobs", self.logprobs, "None or an integer >= 0 (alternatives per token)")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                _bad("stop", self.stop, "non-empty strings")

    @property
    def penalized(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing else to compute: a batch of these is one argmax."""
        return self.temperature == 0 and not self.penalized and self.logprobs is None


def make_rng(seed: int | None) -> np.random.Generator:
    """A generator for sample(); seed None draws fresh entropy from the OS."""
    return np.random.default_rng(seed)


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Choose one token id from a 1-D logits vector according to params."""
    logits = np.asarray(logits)
    if logits.ndim != 1 or logits.size == 0:
        raise ValueError(f"sample() needs a non-empty 1-D logits vector, got shape {logits.shape}")
    top = np.max(logits)  # NaN if any logit is NaN
    if not np.isfinite(top):
        raise ValueError("logits contain NaN or no finite maximum; the model output is invalid")
    if params.temperature == 0:
        return int(np.argmax(logits))  # argmax already returns the lowest id among ties

    # Unnormalized probabilities: every consumer below scales by their sum instead, which saves
    # a pass over the vocabulary per token.
    probs = np.exp((logits.astype(np.float64) - top) / params.temperature)
    if params.top_k == 0 and params.top_p == 1.0:
        return _draw(None, probs, rng)

    candidates = _filtered_candidates(probs, params.top_k, params.top_p)
    return _draw(candidates, probs[candidates], rng)


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log-probability and the `logprobs` most likely alternatives
    (token id, log-probability), most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def apply_penalties(
    logits: np.ndarray, params: SamplingParams, seen: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """Penalized float64 logits. `seen`: bool (vocab,), tokens of the prompt or the output;
    `counts`: (vocab,) how often each token was generated."""
    out = logits.astype(np.float64)
    if params.repetition_penalty != 1.0:
        hit = out[seen]
        out[seen] = np.where(
            hit > 0, hit / params.repetition_penalty, hit * params.repetition_penalty
        )
    if params.frequency_penalty or params.presence_penalty:
        out -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - np.max(x)
    return x - np.log(np.exp(x).sum())


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    lp = log_softmax(logits)
    ranked = _top_indices(lp, top) if top else np.empty(0, dtype=np.int64)
    return TokenLogprob(int(token), float(lp[token]), tuple((int(i), float(lp[i])) for i in ranked))


class TokenSampler:
    """One request's sampling: its own RNG, and the token counts its penalties need."""

    def __init__(self, params: SamplingParams, prompt: list[int], vocab_size: int):
        self.params = params
        self.rng = make_rng(params.seed)
        self._seen: np.ndarray | None = None
        self._counts: np.ndarray | None = None
        if params.penalized:
            self._seen = np.zeros(vocab_size, dtype=bool)
            self._seen[prompt] = True
            self._counts = np.zeros(vocab_size, dtype=np.int64)

    def process(self, logits: np.ndarray) -> np.ndarray:
        """The logits sampling draws from (penalties applied; before temperature)."""
        if self._seen is None or self._counts is None:
            return logits
        return apply_penalties(logits, self.params, self._seen, self._counts)

    def __call__(self, logits: np.ndarray) -> tuple[int, TokenLogprob | None]:
        """Choose the next token from 1-D float logits; record it for the penalties."""
        token = sample(self.process(logits), self.params, self.rng)
        self.accept(token)
        lp = None
        if self.params.logprobs is not None:
            lp = token_logprob(logits, token, self.params.logprobs)
        return token, lp

    @property
    def on_device(self) -> bool:
        """Nothing to compute but the draw: the artifact's sampling kernel can choose the
        token, with `uniform()` as its draw."""
        return not self.params.penalized and self.params.logprobs is None

    def uniform(self) -> float:
        """The draw for one token: the same single number `sample` takes from the generator."""
        return float(self.rng.random())

    def accept(self, token: int) -> None:
        if self._seen is not None and self._counts is not None:
            self._seen[token] = True
            self._counts[token] += 1


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


def _draw(ids: np.ndarray | None, weights: np.ndarray, rng: np.random.Generator) -> int:
    """Draw ids[i] with probability weights[i] / sum (ids None: the index itself)."""
    cumulative = np.cumsum(weights)
    # Scaling u by the total renormalizes without a second pass over the weights.
    pos = min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")),
              weights.size - 1)  # fmt: skip
    return pos if ids is None else int(ids[pos])


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _bad(field: str, value: object, valid: str) -> None:
    raise KilnError(f"SamplingParams.{field} is {value!r}; it must be {valid}.")
