"""Lowering of the models' abstract attention (`kiln.models.attention`) to TVM's paged KV cache.

This is the one place that names a KV-cache implementation. Model files call
`CausalKV.attention(...)`; here that becomes `attention_with_fused_qkv` on a `TIRPagedKVCache`,
which applies RoPE to q/k as they enter the cache, keeps each sequence's K/V history in pages and
runs causal (optionally sliding-window) attention with grouped-query heads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tvm import relax, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.llm import kv_cache as tvm_kv_cache
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm.target import Target

from kiln.compiler.kv_kernels import _attention_prefill_cpu
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


def _attn_kinds(spec: AttentionSpec) -> list[str]:
    """Per-layer attention kinds.

    Sliding-window layers take TVM's per-layer "mha_sliding" path: the cache keeps every token and
    the kernels mask all but the last `window` keys, which matches transformers exactly as long
    as no prefill chunk is longer than the window (the runtime chunks accordingly). TVM's global
    sliding-window mode (a rolling buffer) instead lets a token see window + 1 keys.
    TVM 0.27 allocates its q/k/v staging buffers only when some entry is "mha"; with every layer
    "mha_sliding" the first prefill crashes. One unused "mha" entry past the layer partition's
    end allocates them without pages for an extra layer.
    """
    if not spec.sliding_window:
        return ["mha"] * spec.num_layers
    return ["mha_sliding"] * spec.num_layers + ["mha"]


@contextmanager
def _fixed_cpu_prefill_kernel() -> Iterator[None]:
    """TIRPagedKVCache looks its CPU prefill kernel up in its module when constructed; use
    Kiln's fixed copy (kiln.compiler.kv_kernels) for the duration."""
    stock = tvm_kv_cache._attention_prefill_cpu
    tvm_kv_cache._attention_prefill_cpu = _attention_prefill_cpu
    try:
        yield
    finally:
        tvm_kv_cache._attention_prefill_cpu = stock


def create_paged_kv_cache(
    spec: AttentionSpec,
    dtype: str,
    target: Target,
    max_batch_size: tirx.Var,
    max_total_seq_len: tirx.Var,
    prefill_chunk_size: tirx.Var,
    page_size: tirx.Var,
) -> PagedKVCache:
    rope_scale, rope_scaling = _rope_args(spec)
    with _fixed_cpu_prefill_kernel():
        return TIRPagedKVCache(
            attn_kind=_attn_kinds(spec),
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            # TVM's global rolling-buffer mode; off, see _attn_kinds. (On, it also switches RoPE
            # to an inline mode that assumes theta 10000 for sliding layers.)
            support_sliding_window=0,
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
            # The sliding-window kernels bake the window in.
            layer_sliding_window_size=spec.sliding_window or 1024,
        )
