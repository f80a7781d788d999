"""Logits with planted maxima for the greedy sampler's argmax in chunks
(kiln.compiler.sampling), shared by its CPU test (tests/compiler) and its GPU test (tests/gpu,
where the runtime-only TVM has no kiln.compiler: the chunk length comes as a number)."""

from __future__ import annotations

import numpy as np


def planted_logits(rows: int, vocab: int, length: int, seed: int) -> np.ndarray:
    """(rows >= 6, vocab) float32 normal logits, chunks of `length`; in row 1 the same maximum in
    two chunks, in row 2 either side of a chunk's edge, in row 3 the last id (in the padded
    chunk where `length` does not divide `vocab`), in row 4 twice in one chunk; row 5 all -inf
    (argmax 0, as NumPy's)."""
    logits = np.random.default_rng(seed).standard_normal((rows, vocab)).astype("float32")
    logits[1, [5, length + 5]] = 50.0
    logits[2, [length - 1, length]] = 50.0
    logits[3, vocab - 1] = 50.0
    logits[4, [9, 7]] = 50.0
    logits[5] = -np.inf
    return logits
