"""Comparing a compiled model with transformers, shared by tests/models (pytest puts tests/ on
the path): a prompt, the relative error, and prefill-then-greedy-decode logits checks."""

from __future__ import annotations

import numpy as np
import torch

FAMILIES = ["llama", "llama3", "llama_linear", "mistral", "mixtral"]
PROMPT_LEN = 45  # longer than mistral's 16-token window and than two 16-token KV pages


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def prompt(seed: int, vocab: int = 320) -> list[int]:
    return [1, *np.random.default_rng(seed).integers(3, vocab, PROMPT_LEN - 1).tolist()]


def assert_logits_match(model, ref, bound: float, decode_steps: int) -> None:
    """Prefill logits of a prompt, then `decode_steps` decode steps through the KV cache, fed
    with greedy tokens, against transformers' full recomputation: within `bound` of `ref`."""
    ids = prompt(0)

    ours = model.prefill_logits(ids)  # (len, vocab)
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0].numpy()
    assert ours.shape == theirs.shape
    assert rel_err(ours, theirs) <= bound

    seq = 1000
    model.kv.add(seq)
    try:
        logits = model._run_prefill(seq, ids, all_logits=False)
        tokens = list(ids)
        for _ in range(decode_steps):
            tokens.append(int(np.argmax(logits)))
            logits = model._run_decode([seq], [tokens[-1]])[0]
            with torch.no_grad():
                expect = ref(torch.tensor([tokens])).logits[0, -1].numpy()
            assert rel_err(logits, expect) <= bound
    finally:
        model.kv.remove(seq)
