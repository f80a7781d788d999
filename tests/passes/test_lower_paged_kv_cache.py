"""LowerPagedKVCache: the models' abstract attention and KV-cache ops -> TVM's paged KV cache.

Structure: the rewritten attention is exactly what TVM's own PagedKVCache API emits, and the
creation function builds a TIRPagedKVCache for the spec; where the target names an extern for
the ragged prefill kernel (CUDA, kiln.runtime.attention), the cache gets that instead of TVM's
kernel, which leaves the module. Numbers: a tiny Llama exported with the abstract ops and
lowered by the pass gives the same logits as one written directly against the paged cache (the
way the models were exported before the pass), for prompts longer than one page and for a
sliding window.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.llm.kv_cache import AttnKind, PagedKVCache
from tvm.runtime import vm as tvm_vm
from tvm.target import Target

from kiln.compiler.pipeline import relax_pipeline
from kiln.models.attention import AbstractCausalKV, AttentionSpec, KVCache, RoPE
from kiln.models.llama import LlamaConfig, LlamaForCausalLM
from kiln.models.ops import take
from kiln.passes.lower_paged_kv_cache import (
    DECODE_KERNEL,
    PAGED_PREFILL_KERNEL,
    RAGGED_PREFILL_KERNEL,
    LowerPagedKVCache,
    create_paged_kv_cache,
)
from kiln.runtime.kv import PagedKV
from kiln.targets import get_target

SPEC = AttentionSpec(
    num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=16, rope=RoPE(1e6), context_length=256
)
SLIDING = AttentionSpec(
    num_layers=2,
    num_q_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope=RoPE(10000.0),
    context_length=256,
    sliding_window=16,
)
TARGET = get_target("cpu").target(None)


class _PagedKV:
    """The reference path: TVM's PagedKVCache API called directly."""

    def __init__(self, cache: PagedKVCache, spec: AttentionSpec):
        self.cache, self.sm_scale = cache, spec.head_dim**-0.5

    def attention(self, layer_id: int, qkv: nn.Tensor, num_q_heads: int) -> nn.Tensor:
        return self.cache.attention_with_fused_qkv(layer_id, qkv, num_q_heads, self.sm_scale)


class _Entry(nn.Module):
    """prefill / decode / create_kv_cache, written against the abstract ops or (reference)
    against TVM's paged cache."""

    def __init__(
        self, model: nn.Module, spec: AttentionSpec, reference: bool, dtype: str, target: Target
    ):
        self.model, self._spec, self._reference = model, spec, reference
        self._dtype, self._target = dtype, target

    def _kv(self, cache):
        return (
            _PagedKV(cache, self._spec) if self._reference else AbstractCausalKV(cache, self._spec)
        )

    def prefill(self, input_ids: nn.Tensor, logit_positions: nn.Tensor, cache):
        hidden = self.model.hidden_states(input_ids, self._kv(cache))
        return self.model.logits(take(hidden, logit_positions, 1)), cache

    def decode(self, input_ids: nn.Tensor, cache):
        return self.model.logits(self.model.hidden_states(input_ids, self._kv(cache))), cache

    def create_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size):
        sizes = (max_batch_size, max_total_seq_len, prefill_chunk_size, page_size)
        if self._reference:
            return create_paged_kv_cache(self._spec, self._dtype, self._target, *sizes)
        return KVCache.create(self._spec, self._dtype, *sizes)


def export(
    spec: AttentionSpec, reference: bool, dtype: str = "float32", target: Target = TARGET
) -> tuple[tvm.IRModule, list]:
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_q_heads, num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, rms_norm_eps=1e-6, rope=spec.rope,
        context_length=spec.context_length, sliding_window=spec.sliding_window,
    )  # fmt: skip
    kv = nn.spec.Object(object_type=PagedKVCache if reference else KVCache)
    packed = {"$": {"param_mode": "packed", "effect_mode": "none"}}
    mod, params = _Entry(
        LlamaForCausalLM(config, dtype), spec, reference, dtype, target
    ).export_tvm(
        spec={
            "prefill": {
                "input_ids": nn.spec.Tensor([1, "seq_len"], "int32"),
                "logit_positions": nn.spec.Tensor(["num_logits"], "int32"),
                "cache": kv,
                **packed,
            },
            "decode": {"input_ids": nn.spec.Tensor(["batch", 1], "int32"), "cache": kv, **packed},
            "create_kv_cache": {
                "max_batch_size": int,
                "max_total_seq_len": int,
                "prefill_chunk_size": int,
                "page_size": int,
                "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }
    )
    return mod, params


@pytest.fixture(scope="module")
def lowered():
    """(abstract module, lowered module, reference module) for SPEC and SLIDING."""
    out = {}
    for name, spec in (("full", SPEC), ("sliding", SLIDING)):
        before, _ = export(spec, reference=False)
        expected, _ = export(spec, reference=True)
        out[name] = (before, LowerPagedKVCache(TARGET)(before), expected)
    return out


def externs(func: relax.Function) -> list[str]:
    found: list[str] = []
    relax.analysis.post_order_visit(
        func, lambda e: found.append(e.global_symbol) if isinstance(e, relax.ExternFunc) else None
    )
    return found


def test_abstract_attention_becomes_tvm_paged_attention(lowered):
    before, after, expected = lowered["full"]
    assert "kiln.attention.causal" in externs(before["decode"])
    for entry in ("prefill", "decode"):
        assert "kiln.attention.causal" not in externs(after[entry])
        tvm.ir.assert_structural_equal(after[entry], expected[entry])


@pytest.mark.parametrize("name", ["full", "sliding"])
def test_cache_creation_becomes_tir_paged_kv_cache(lowered, name):
    spec = SPEC if name == "full" else SLIDING
    _, after, expected = lowered[name]
    create = after["create_kv_cache"]
    assert "kiln.kv_cache.create" not in externs(create)
    calls = [
        b.value
        for block in create.body.blocks
        for b in block.bindings
        if isinstance(b.value, relax.Call) and isinstance(b.value.args[0], relax.ExternFunc)
    ]
    assert [c.args[0].global_symbol for c in calls] == [
        "vm.builtin.paged_attention_kv_cache_create"
    ]
    args = calls[0].args[1:]
    # The cache geometry stays the function's runtime arguments; the window is baked in.
    sizes = args[0].values
    assert [str(v) for v in sizes[:4]] == [str(p.ty.values[0]) for p in create.params]
    assert [int(v) for v in sizes[4:]] == [0, spec.sliding_window or 1024]
    kinds = [int(v) for v in args[6].values]
    if spec.sliding_window:
        assert kinds == [AttnKind.MHA_SLIDING] * spec.num_layers + [AttnKind.MHA]
    else:
        assert kinds == [AttnKind.MHA] * spec.num_layers
    # The cache's kernels joined the module, as they do on the reference path.
    kernels = {g.name_hint for g in expected.get_global_vars()}
    assert kernels <= {g.name_hint for g in after.get_global_vars()}


def test_module_without_abstract_ops_is_unchanged(lowered):
    _, _, expected = lowered["full"]
    assert LowerPagedKVCache(TARGET)(expected).same_as(expected)
    assert LowerPagedKVCache(TARGET, lambda dtype, head_dim: EXTERNS)(expected).same_as(expected)


# A fp16 cache of head_dim 64 on CUDA: what Kiln's attention externs take.
EXTERNS = {
    "ragged": "kiln.attention.prefill_ragged",
    "paged": "kiln.attention.prefill_paged",
    "decode": "kiln.attention.decode_paged",
    "rope": "kiln.attention.split_rope",
    "append": "kiln.attention.append_kv",
}
KERNELS = {
    "ragged": RAGGED_PREFILL_KERNEL,
    "paged": PAGED_PREFILL_KERNEL,
    "decode": DECODE_KERNEL,
    "rope": "fused_rope",
    "append": "tir_kv_cache_transpose_append",
}
ATTENTION = ("ragged", "paged", "decode")
GPU_SPEC = AttentionSpec(
    num_layers=2, num_q_heads=8, num_kv_heads=2, head_dim=64, rope=RoPE(1e4), context_length=256
)


@pytest.fixture(scope="module")
def cuda_lowered():
    """(lowered with the extern, lowered without, TVM's paged cache written directly) on CUDA."""
    target = get_target("cuda").target("sm_90")
    before, _ = export(GPU_SPEC, False, "float16", target)
    expected, _ = export(GPU_SPEC, True, "float16", target)
    with target:
        asked = []

        def choose(dtype: str, head_dim: int) -> dict[str, str]:
            asked.append((dtype, head_dim))
            return EXTERNS

        with_extern = LowerPagedKVCache(target, choose)(before)
        without = LowerPagedKVCache(target)(before)
    assert asked == [("float16", 64)]  # the target decides from the cache's dtype and head_dim
    return with_extern, without, expected


def _create_args(mod: tvm.IRModule) -> list:
    (call,) = [
        b.value
        for block in mod["create_kv_cache"].body.blocks
        for b in block.bindings
        if isinstance(b.value, relax.Call) and isinstance(b.value.args[0], relax.ExternFunc)
    ]
    assert call.args[0].global_symbol == "vm.builtin.paged_attention_kv_cache_create"
    return list(call.args[1:])


def test_without_an_extern_the_cache_runs_tvms_kernels(cuda_lowered):
    _, without, expected = cuda_lowered
    assert _differing(_create_args(without), _create_args(expected)) == []
    names = {g.name_hint for g in without.get_global_vars()}
    assert set(KERNELS.values()) <= names
    assert PAGED_PREFILL_KERNEL + "_sliding_window" in names


def _differing(got: list, want: list) -> list[int]:
    """Positions of the arguments that differ (variables, bound in each function: by type)."""
    assert len(got) == len(want)
    return [
        i
        for i, (a, b) in enumerate(zip(got, want, strict=True))
        if not (
            tvm_ffi.structural_equal(a.ty, b.ty)
            if isinstance(a, relax.Var) and isinstance(b, relax.Var)
            else tvm_ffi.structural_equal(a, b, map_free_vars=True)
        )
    ]


def _replaced(got: list, want: list) -> dict[str, str]:
    """{TVM kernel: the extern in its place} over the creation call's kernel arguments (the
    attention kernels as ("tirx", f), RoPE and the append as f); every other argument must be
    equal."""
    replaced = {}
    for i in _differing(got, want):
        new, original = got[i], want[i]
        if isinstance(original, relax.Tuple):
            assert [f.value for f in (new.fields[0], original.fields[0])] == ["tirx", "tirx"]
            new, original = new.fields[1], original.fields[1]
        assert isinstance(new, relax.ExternFunc)
        replaced[original.name_hint] = new.global_symbol
    return replaced


def test_the_externs_take_the_place_of_tvms_kernels(cuda_lowered):
    """Expected: TVM's own creation call with ("tirx", batch_prefill_ragged_kv), ("tirx",
    batch_prefill_paged_kv) and ("tirx", batch_decode_paged_kv) replaced by ("tirx",
    ExternFunc(...)), fused_rope and tir_kv_cache_transpose_append by ExternFunc(...), every
    other argument as it is (the sliding-window kernels among them);
    the TIR kernels leave the module (nothing compiles them), every other kernel stays; prefill
    and decode are untouched."""
    ours, _, expected = cuda_lowered
    assert _replaced(_create_args(ours), _create_args(expected)) == {
        KERNELS[kind]: extern for kind, extern in EXTERNS.items()
    }
    names = {g.name_hint for g in ours.get_global_vars()}
    assert names == {g.name_hint for g in expected.get_global_vars()} - set(KERNELS.values())
    for entry in ("prefill", "decode"):
        tvm.ir.assert_structural_equal(ours[entry], expected[entry])


def _lowered_with(spec: AttentionSpec, chosen: dict[str, str]) -> dict[str, str]:
    """{TVM kernel: extern} that LowerPagedKVCache put in a CUDA cache for `spec` when the
    target offers `chosen`; the module keeps every other kernel."""
    target = get_target("cuda").target("sm_90")
    before, _ = export(spec, False, "float16", target)
    expected, _ = export(spec, True, "float16", target)
    with target:
        ours = LowerPagedKVCache(target, lambda dtype, head_dim: chosen)(before)
    replaced = _replaced(_create_args(ours), _create_args(expected))
    names = {g.name_hint for g in ours.get_global_vars()}
    assert names == {g.name_hint for g in expected.get_global_vars()} - set(replaced)
    return replaced


@pytest.mark.parametrize("kind", ATTENTION)
def test_one_extern_replaces_only_its_kernel(kind):
    assert _lowered_with(GPU_SPEC, {kind: EXTERNS[kind]}) == {KERNELS[kind]: EXTERNS[kind]}


def test_rope_and_append_go_to_externs_only_where_attention_can_do_them():
    """The RoPE and append externs leave their work to the next attention call, which must be
    Kiln's and know the rotation: taken with all three attention externs and RoPE without
    scaling or with linear scaling (the cache's rope_scale); refused without one of the three,
    with llama3 scaling (frequencies the attention call is not told) or a sliding window
    (TVM's kernels)."""
    every = {KERNELS[kind]: extern for kind, extern in EXTERNS.items()}
    attention_only = {KERNELS[kind]: EXTERNS[kind] for kind in ATTENTION}
    linear = dataclasses.replace(GPU_SPEC, rope=RoPE(1e4, {"rope_type": "linear", "factor": 2.0}))
    assert _lowered_with(linear, EXTERNS) == every
    llama3 = dataclasses.replace(GPU_SPEC, rope=RoPE(5e5, {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }))  # fmt: skip
    assert _lowered_with(llama3, EXTERNS) == attention_only
    sliding = dataclasses.replace(GPU_SPEC, sliding_window=32)
    assert _lowered_with(sliding, EXTERNS) == attention_only
    no_ragged = {kind: name for kind, name in EXTERNS.items() if kind != "ragged"}
    assert _lowered_with(GPU_SPEC, no_ragged) == {
        KERNELS[kind]: EXTERNS[kind] for kind in ("paged", "decode")
    }


def run(mod: tvm.IRModule, params: list, ids: list[int], chunk: int, steps: int) -> np.ndarray:
    """Logits of the last prompt token and of `steps` greedy decode steps."""
    spec = get_target("cpu")
    ex = tvm.compile(mod, TARGET, relax_pipeline=relax_pipeline(spec, TARGET))
    dev = tvm.cpu()
    vm = tvm_vm.VirtualMachine(ex, dev)
    rng = np.random.default_rng(0)
    weights = [
        tvm.runtime.tensor(rng.normal(0, p.shape[-1] ** -0.5, p.shape).astype("float32"), dev)
        for _, p in params
    ]
    shape = tvm_ffi.Shape
    kv = PagedKV(vm["create_kv_cache"](shape([1]), shape([256]), shape([chunk]), shape([16])))
    kv.add(0)
    for start in range(0, len(ids), chunk):
        piece = np.array([ids[start : start + chunk]], dtype="int32")
        kv.begin([0], [piece.shape[1]])
        last = tvm.runtime.tensor(np.array([piece.shape[1] - 1], dtype="int32"), dev)
        logits, kv.cache = vm["prefill"](tvm.runtime.tensor(piece, dev), last, kv.cache, weights)
        kv.end()
    rows = [logits.numpy()[0, -1]]
    for _ in range(steps):
        kv.begin([0], [1])
        token = np.array([[int(np.argmax(rows[-1]))]], dtype="int32")
        logits, kv.cache = vm["decode"](tvm.runtime.tensor(token, dev), kv.cache, weights)
        kv.end()
        rows.append(logits.numpy()[0, -1])
    return np.stack(rows)


@pytest.mark.parametrize("name", ["full", "sliding"])
def test_lowered_model_gives_the_reference_logits(lowered, name):
    spec = SPEC if name == "full" else SLIDING
    _, after, expected = lowered[name]
    _, params = export(spec, reference=False)
    ids = np.random.default_rng(1).integers(0, 96, 45).tolist()  # 3 pages, past the window
    chunk = spec.sliding_window or 64
    ours = run(after, params, ids, chunk, steps=4)
    ref = run(expected, params, ids, chunk, steps=4)
    assert np.isfinite(ours).all()
    np.testing.assert_array_equal(ours, ref)
