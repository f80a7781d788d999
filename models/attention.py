"""How a model family describes attention, without naming a KV-cache implementation.

A model says what attention *is* (per-sequence causal K/V history, grouped-query heads, the RoPE
variant, an optional sliding window) in an `AttentionSpec`, and in its forward pass asks a
`CausalKV` for "attention of these fused q/k/v rows against their sequence's history". Which cache
serves that (TVM's paged KV cache today, a contiguous one for edge builds later) is the compiler's
choice, made in one place: `kiln.compiler.kv_cache`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from tvm.relax.frontend import nn


@dataclass(frozen=True)
class RoPE:
    """Rotary position embedding. `scaling` is None, {"rope_type": "linear", "factor": f} or
    {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"} as in transformers."""

    theta: float
    scaling: dict[str, Any] | None = None


@dataclass(frozen=True)
class AttentionSpec:
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RoPE
    context_length: int
    sliding_window: int | None = None  # each query sees itself and the window-1 tokens before it


class CausalKV(Protocol):
    """Attention over each sequence's causal key/value history."""

    def attention(self, layer_id: int, qkv: nn.Tensor, num_q_heads: int) -> nn.Tensor:
        """qkv: (batch, seq, q_heads + 2 * kv_heads, head_dim), before RoPE; rows of one
        sequence are its next tokens in order. Returns (batch, seq, q_heads, head_dim)."""
        ...
