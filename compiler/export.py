"""Export a model family to a Relax IRModule with Kiln's entry points.

Entry points (all take the packed parameters last, as the Relax VM calls them):
- `prefill(input_ids (1, n) int32, logit_positions (k,) int32, kv)`: runs n new tokens of one or
  more sequences (ragged, as laid out by `kv_state_begin_forward`) and returns float32 logits
  (1, k, vocab) at the given flat positions: the last token of each sequence for generation, or
  every position for scoring.
- `decode(input_ids (b, 1) int32, kv)`: one new token for each of b sequences -> (b, 1, vocab).
- `decode_1`: `decode` specialized to one sequence, for latency: with every shape static the
  schedulers pick matrix-vector kernels instead of tiling for an unknown batch.
- `sample_greedy(logits (n, vocab))`, `sample(logits, temperature, top_p, top_k, uniform)`:
  token ids from logits left on the device (kiln.compiler.sampling).
- `create_kv_cache(max_batch_size, max_total_seq_len, prefill_chunk_size, page_size)`: builds
  the KV cache. Sliding-window models need each sequence's prefill chunks no longer than the
  window.

Attention and the cache are the models' abstract ops (kiln.models.attention); the compiler's
pipeline rewrites them into a cache implementation (kiln.passes.lower_paged_kv_cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm.relax.frontend import nn

from kiln.compiler import sampling
from kiln.models.attention import AbstractCausalKV, AttentionSpec, KVCache
from kiln.models.ops import take

ENTRY_POINTS = ("prefill", "decode", "decode_1", "sample_greedy", "sample", "create_kv_cache")


class _Exported(nn.Module):
    def __init__(self, model: nn.Module, spec: AttentionSpec, dtype: str):
        self.model = model
        self._spec = spec
        self._dtype = dtype

    def prefill(self, input_ids: nn.Tensor, logit_positions: nn.Tensor, cache: KVCache):
        hidden = self.model.hidden_states(input_ids, AbstractCausalKV(cache, self._spec))
        hidden = take(hidden, logit_positions, 1, "logit_rows")  # (1, k, hidden)
        return self.model.logits(hidden), cache

    def decode(self, input_ids: nn.Tensor, cache: KVCache):
        hidden = self.model.hidden_states(input_ids, AbstractCausalKV(cache, self._spec))
        return self.model.logits(hidden), cache  # (b, 1, vocab)

    def decode_1(self, input_ids: nn.Tensor, cache: KVCache):
        return self.decode(input_ids, cache)

    def sample_greedy(self, logits: nn.Tensor):
        return sampling.greedy(logits)

    def sample(self, logits, temperature, top_p, top_k, uniform):
        return sampling.sample(logits, temperature, top_p, top_k, uniform)

    def create_kv_cache(
        self, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size
    ) -> KVCache:
        return KVCache.create(
            self._spec, self._dtype, max_batch_size, max_total_seq_len, prefill_chunk_size,
            page_size,
        )  # fmt: skip


@dataclass
class Exported:
    mod: tvm.IRModule
    params: list[tuple[str, tuple[int, ...], str]]  # (name, shape, dtype) in VM argument order


def export(model: nn.Module, spec: AttentionSpec, dtype: str, vocab_size: int) -> Exported:
    """The cache's kernels are chosen later, per target, by the pipeline's rewrite."""
    wrapper = _Exported(model, spec, dtype)
    kv = nn.spec.Object(object_type=KVCache)
    packed = {"$": {"param_mode": "packed", "effect_mode": "none"}}
    unpacked = {"$": {"param_mode": "none", "effect_mode": "none"}}
    logits = nn.spec.Tensor(["n", vocab_size], "float32")
    mod, named_params = wrapper.export_tvm(
        spec={
            "prefill": {
                "input_ids": nn.spec.Tensor([1, "seq_len"], "int32"),
                "logit_positions": nn.spec.Tensor(["num_logits"], "int32"),
                "cache": kv,
                **packed,
            },
            "decode": {
                "input_ids": nn.spec.Tensor(["batch_size", 1], "int32"),
                "cache": kv,
                **packed,
            },
            "decode_1": {
                "input_ids": nn.spec.Tensor([1, 1], "int32"),
                "cache": kv,
                **packed,
            },
            "sample_greedy": {"logits": logits, **unpacked},
            "sample": {
                "logits": logits,
                "temperature": nn.spec.Tensor(["n"], "float32"),
                "top_p": nn.spec.Tensor(["n"], "float32"),
                "top_k": nn.spec.Tensor(["n"], "int32"),
                "uniform": nn.spec.Tensor(["n"], "float32"),
                **unpacked,
            },
            "create_kv_cache": {
                "max_batch_size": int,
                "max_total_seq_len": int,
                "prefill_chunk_size": int,
                "page_size": int,
                **unpacked,
            },
        }
    )
    params = [
        (name.removeprefix("model."), tuple(int(d) for d in p.shape), p.dtype)
        for name, p in named_params
    ]
    return Exported(mod, params)
