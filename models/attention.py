"""How a model family describes attention, without naming a KV-cache implementation.

A model says what attention *is* (per-sequence causal K/V history, grouped-query heads, the RoPE
variant, an optional sliding window) in an `AttentionSpec`, and in its forward pass asks a
`CausalKV` for "attention of these fused q/k/v rows against their sequence's history".

In the exported IR that is an abstract op, an extern call no runtime implements:

    kv = call_pure_packed("kiln.kv_cache.create", shape(max_batch_size, max_total_seq_len,
                          prefill_chunk_size, page_size), spec_json, dtype)   -> Object
    o  = call_dps_packed("kiln.attention.causal", [kv, layer_id, sm_scale, qkv])
    # qkv (tokens, q_heads + 2 * kv_heads, head_dim) before RoPE -> o (tokens, q_heads, head_dim)

The rows of `qkv` belong to the sequences (and lengths) the runtime declared for this forward
pass (`vm.builtin.kv_state_begin_forward`). Which cache serves the ops is the compiler's choice,
made by a rewrite in `kiln.passes` (TVM's paged KV cache today: `lower_paged_kv_cache`; a
contiguous one for edge builds would be another rewrite of the same two ops).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Protocol

from tvm import ir, relax, tirx
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

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AttentionSpec:
        data = json.loads(text)
        return cls(**{**data, "rope": RoPE(**data["rope"])})


class CausalKV(Protocol):
    """Attention over each sequence's causal key/value history."""

    def attention(self, layer_id: int, qkv: nn.Tensor, num_q_heads: int) -> nn.Tensor:
        """qkv: (batch, seq, q_heads + 2 * kv_heads, head_dim), before RoPE; rows of one
        sequence are its next tokens in order. Returns (batch, seq, q_heads, head_dim)."""
        ...


CREATE_OP = "kiln.kv_cache.create"
ATTENTION_OP = "kiln.attention.causal"


class KVCache(nn.Object):
    """The abstract KV state the entry points pass around; a compiler rewrite decides what
    object it becomes."""

    @staticmethod
    def create(
        spec: AttentionSpec,
        dtype: str,
        max_batch_size: tirx.Var,
        max_total_seq_len: tirx.Var,
        prefill_chunk_size: tirx.Var,
        page_size: tirx.Var,
    ) -> KVCache:
        sizes = relax.ShapeExpr([max_batch_size, max_total_seq_len, prefill_chunk_size, page_size])
        call = relax.call_pure_packed(
            CREATE_OP,
            sizes,
            ir.StringImm(spec.to_json()),
            ir.StringImm(dtype),
            ty_args=relax.ObjectType(),
        )
        return KVCache(_expr=call, _name="kv_cache")


class AbstractCausalKV:
    """`CausalKV` that emits the abstract attention op on a `KVCache`."""

    def __init__(self, cache: KVCache, spec: AttentionSpec):
        self.cache = cache
        self.sm_scale = spec.head_dim**-0.5

    def attention(self, layer_id: int, qkv: nn.Tensor, num_q_heads: int) -> nn.Tensor:
        b, s, heads, d = qkv.shape
        rows = nn.op.reshape(qkv, (b * s, heads, d))
        call = relax.call_dps_packed(
            ATTENTION_OP,
            [self.cache._expr, relax.prim_value(layer_id), relax.prim_value(self.sm_scale),
             rows._expr],
            out_ty=relax.TensorType((b * s, num_q_heads, d), qkv.dtype),
        )  # fmt: skip
        out = nn.Tensor(_expr=relax.BlockBuilder.current().emit(call))
        return nn.op.reshape(out, (b, s, num_q_heads, d))
