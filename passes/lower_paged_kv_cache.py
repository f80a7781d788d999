"""LowerPagedKVCache: the models' abstract attention ops -> TVM's paged KV cache.

Rewrites the two ops of `kiln.models.attention`:

- `kiln.kv_cache.create(sizes, spec_json, dtype)`: the function that makes it becomes one that
  builds a `TIRPagedKVCache` for the spec (page size, max batch, max total tokens and prefill
  chunk size stay runtime arguments), adding its attention kernels for the target to the module;
- `kiln.attention.causal(kv, layer_id, sm_scale, qkv)` becomes the paged cache's
  `vm.builtin.attention_kv_cache_attention_with_fused_qkv`, which applies RoPE to q/k as they
  enter the cache, keeps each sequence's K/V history in pages and runs causal (optionally
  sliding-window) attention with grouped-query heads.

`attention_externs(dtype, head_dim)`, from the target (kiln.targets.base.TargetSpec), may name
extern functions that take the place of TVM's attention kernels, each taking its kernel's
arguments as they are: "ragged" for `batch_prefill_ragged_kv` (a prefill chunk attending to its
own keys), "paged" for `batch_prefill_paged_kv` (the chunk attending to the keys its sequences
already have in the pages), "decode" for `batch_decode_paged_kv` (one new token per sequence
against its pages); their sliding-window variants stay TVM's. "rope" for `fused_rope` (q/k/v
out of the fused rows, q and k rotated) and "append" for `tir_kv_cache_transpose_append` (k/v
into the pages) are for externs that leave that work to the attention extern called next
(Kiln's decode kernel does both itself): they are taken only where the other three are too,
the model has no sliding window and its RoPE has no frequency scaling of its own (none, or
linear, which is the cache's rope_scale, an argument of every attention call). The cache is
then created with those functions, and TVM's kernels they replace are left out of the module. A
kind it does not name keeps TVM's kernel.

A module without the abstract ops comes back unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.relax.frontend.nn.llm import kv_cache as tvm_kv_cache
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm.target import Target

from kiln.compiler.kv_kernels import _attention_prefill_cpu
from kiln.models.attention import ATTENTION_OP, CREATE_OP, AttentionSpec

PAGED_ATTENTION = "vm.builtin.attention_kv_cache_attention_with_fused_qkv"
# TVM's attention kernels (GPU targets) in the module TIRPagedKVCache adds them to; the cache
# gets each as the tuple ("tirx", kernel).
RAGGED_PREFILL_KERNEL = "batch_prefill_ragged_kv"
PAGED_PREFILL_KERNEL = "batch_prefill_paged_kv"
DECODE_KERNEL = "batch_decode_paged_kv"
ATTENTION_KERNELS = {
    "ragged": RAGGED_PREFILL_KERNEL,
    "paged": PAGED_PREFILL_KERNEL,
    "decode": DECODE_KERNEL,
    "rope": "fused_rope",
    "append": "tir_kv_cache_transpose_append",
}


@tvm.transform.module_pass(opt_level=0, name="LowerPagedKVCache")
class LowerPagedKVCache:
    def __init__(
        self,
        target: Target,
        attention_externs: Callable[[str, int], dict[str, str]] | None = None,
    ):
        self.target = target
        self.attention_externs = attention_externs

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        creators = {}
        rest = {}
        for gvar, func in mod.functions_items():
            call = _create_call(func) if isinstance(func, relax.Function) else None
            if call is not None:
                creators[gvar] = (func, call)
            elif isinstance(func, relax.Function) and _uses(func, ATTENTION_OP):
                rest[gvar] = _AttentionToPaged().visit_expr(func)
            else:
                rest[gvar] = func
        if not creators and all(rest[g].same_as(f) for g, f in mod.functions_items()):
            return mod

        out = tvm.IRModule(rest, attrs=mod.attrs)
        bb = relax.BlockBuilder(out)
        externs = {}  # creation function -> {kind: the extern its cache runs that attention with}
        for gvar, (func, call) in creators.items():
            sizes, spec_json, dtype = call.args[1:]
            spec = AttentionSpec.from_json(spec_json.value)
            with bb.function(gvar.name_hint, list(func.params), attrs=dict(func.attrs or {})):
                cache = create_paged_kv_cache(spec, dtype.value, self.target, *sizes.values)
                bb.emit_func_output(cache._expr)
            chosen = (
                self.attention_externs(dtype.value, spec.head_dim) if self.attention_externs else {}
            )
            chosen = _deferred_only_where_possible(chosen, spec)
            if chosen:
                externs[gvar.name_hint] = chosen
        lowered = bb.finalize()
        for name, chosen in externs.items():
            for kind, extern in chosen.items():
                lowered = _with_extern(
                    lowered, lowered.get_global_var(name), ATTENTION_KERNELS[kind], extern
                )
        return lowered


def _deferred_only_where_possible(chosen: dict[str, str], spec: AttentionSpec) -> dict[str, str]:
    """Without "rope" and "append" unless their work is sure to reach a Kiln attention call
    that can do it (the module docstring)."""
    scaling = (spec.rope.scaling or {}).get("rope_type")
    if (
        {"ragged", "paged", "decode"} <= chosen.keys()
        and not spec.sliding_window
        and scaling in (None, "linear")
    ):
        return chosen
    return {kind: name for kind, name in chosen.items() if kind not in ("rope", "append")}


def _create_call(func: relax.Function) -> relax.Call | None:
    """The abstract creation call a function returns, if it is a creation function."""
    calls = [
        b.value
        for block in getattr(func.body, "blocks", [])
        for b in block.bindings
        if _is_extern_call(b.value, CREATE_OP)
    ]
    if not calls:
        return None
    if len(calls) > 1:
        raise ValueError(f"a function creates {len(calls)} KV caches; Kiln expects one")
    return calls[0]


def _is_extern_call(expr: relax.Expr, name: str) -> bool:
    return (
        isinstance(expr, relax.Call)
        and len(expr.args) > 0
        and isinstance(expr.args[0], relax.ExternFunc)
        and expr.args[0].global_symbol == name
    )


def _uses(func: relax.Function, name: str) -> bool:
    found = []
    relax.analysis.post_order_visit(
        func, lambda e: found.append(e) if isinstance(e, relax.ExternFunc) else None
    )
    return any(e.global_symbol == name for e in found)


@mutator
class _AttentionToPaged(PyExprMutator):
    def visit_extern_func_(self, op: relax.ExternFunc) -> relax.Expr:
        if op.global_symbol == ATTENTION_OP:
            return relax.ExternFunc(PAGED_ATTENTION)
        return op


def _with_extern(
    mod: tvm.IRModule, creator: relax.GlobalVar, kernel: str, extern: str
) -> tvm.IRModule:
    """`creator` makes its cache with the extern function `extern` in place of TVM's kernel
    named `kernel`, which, as nothing calls it then, leaves the module (so it is not compiled)."""
    kernels = [g for g in mod.get_global_vars() if g.name_hint == kernel]
    if not kernels:
        raise ValueError(
            f"TVM's paged KV cache has no {kernel} kernel for {extern} to replace: "
            "kiln.passes.lower_paged_kv_cache does not match this version of TVM"
        )
    mod[creator] = _ReplaceGlobal(kernels[0], relax.ExternFunc(extern)).visit_expr(mod[creator])
    del mod[kernels[0]]
    return mod


@mutator
class _ReplaceGlobal(PyExprMutator):
    def __init__(self, old: relax.GlobalVar, new: relax.Expr):
        super().__init__()
        self.old, self.new = old, new

    def visit_global_var_(self, op: relax.GlobalVar) -> relax.Expr:
        return self.new if op.same_as(self.old) else op


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
    as no sequence's prefill chunk is longer than the window (the runtime chunks accordingly).
    TVM's global sliding-window mode (a rolling buffer) instead lets a token see window + 1 keys.
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
    """Emit a TIRPagedKVCache for `spec` into the current BlockBuilder function."""
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
