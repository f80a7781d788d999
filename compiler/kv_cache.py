"""Lowering of the models' abstract attention (`kiln.models.attention`) to TVM's paged KV cache.

This is the one place that names a KV-cache implementation. Model files call
`CausalKV.attention(...)`; here that becomes `attention_with_fused_qkv` on a `TIRPagedKVCache`,
which applies RoPE to q/k as they enter the cache, keeps each sequence's K/V history in pages and
runs causal (optionally sliding-window) attention with grouped-query heads.
"""

from __future__ import annotations

from tvm import relax, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm.target import Target

from kiln.models.attention import AttentionSpec


class PagedCausalKV:
    """`CausalKV` served by a TVM paged KV cache object."""

    def __init__(self, cache: PagedKVCache, spec: AttentionSpec):
        self.cache = cache
        self.sm_scale = spec.head_dim**-0.5

    def attention(self, layer_id: int, qkv: nn.Tensor, num_q_heads: int) -> nn.Tensor:
        return self.cache.attention_with_fused_qkv(layer_id, qkv, num_q_heads, self.sm_scale)


def _rope_args(spec: AttentionSpec) -> tuple[float, dict]:
    """TVM multiplies positions by `rope_scale`; transformers' linear scaling divides by factor."""
    scaling = spec.rope.scaling or {}
    if scaling.get("rope_type") == "linear":
        return 1.0 / scaling["factor"], {}
    return 1.0, dict(scaling)


def create_paged_kv_cache(
    spec: AttentionSpec,
    dtype: str,
    target: Target,
    max_batch_size: tirx.Var,
    max_total_seq_len: tirx.Var,
    prefill_chunk_size: tirx.Var,
    page_size: tirx.Var,
    support_sliding_window: tirx.Var,
) -> PagedKVCache:
    rope_scale, rope_scaling = _rope_args(spec)
    return TIRPagedKVCache(
        attn_kind="mha",
        max_batch_size=max_batch_size,
        max_total_seq_len=max_total_seq_len,
        prefill_chunk_size=prefill_chunk_size,
        page_size=page_size,
        support_sliding_window=support_sliding_window,
        layer_partition=relax.ShapeExpr([0, spec.num_layers]),
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_q_heads,
        num_key_value_heads=spec.num_kv_heads,
        qk_head_dim=spec.head_dim,
        v_head_dim=spec.head_dim,
        mla_original_qk_head_dim=0,
        mla_original_v_head_dim=0,
        rope_mode=RopeMode.NORMAL,
        rope_scale=rope_scale,
        rope_theta=spec.rope.theta,
        rope_scaling=rope_scaling,
        rope_ext_factors=relax.prim_value(0),
        rotary_dim=spec.head_dim,
        enable_disaggregation=False,
        dtype=dtype,
        target=target,
        # The prefill kernels bake the window in; the runtime enables it per sequence.
        layer_sliding_window_size=spec.sliding_window or 1024,
    )
