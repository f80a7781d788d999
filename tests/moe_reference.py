"""A NumPy model of kiln.models.mixtral's router, the contract of `kiln.gemv.moe_route`: the CPU
tests of DispatchMoE run it as the extern, the GPU tests check the kernel against it."""

from __future__ import annotations

import numpy as np


def route_reference(x: np.ndarray, gate: np.ndarray, top_k: int) -> np.ndarray:
    """Each row's weight per expert (..., E) for x (..., K) and the router's gate (E, K): the
    logits rounded to fp16, their softmax in float32, the top k by rank (ties to the lower
    index) renormalized, 0 elsewhere."""
    logits = (x.astype(np.float64) @ gate.astype(np.float64).T).astype(np.float16)
    p = np.exp(logits.astype(np.float32) - logits.max(-1, keepdims=True).astype(np.float32))
    p /= p.sum(-1, keepdims=True)
    p_j, p_e = p[..., None, :], p[..., :, None]
    lower = np.tri(p.shape[-1], k=-1, dtype=bool)  # [e, j]: j < e
    top = np.where(((p_j > p_e) | ((p_j == p_e) & lower)).sum(-1) < top_k, p, 0)
    return top / top.sum(-1, keepdims=True)
