"""Kiln's prefill attention kernel (`kiln.attention.prefill_ragged`) on a real GPU, against a
float64 NumPy reference and TVM's own ragged prefill kernel on the same inputs: fp16 and bf16,
head_dim 64 and 128, 1, 4 and 8 query heads per KV head, causal and not, ragged batches of
sequences of 1, 7, 64, 100 and 1000 tokens, queries aligned to the end of longer keys, both tile
heights; it runs on TVM's current stream; and CUDA artifacts that call it (head_dim 64 and 128)
give transformers' logits, for a ragged batch and for a chunk after a cached prefix (where TVM
merges its paged attention with this kernel's output through the lse).

Which models run it: CUDA artifacts whose cache is fp16/bf16 with head_dim 64 or 128. The GPU
tests' tiny models have head_dim 16 or 32 and keep TVM's kernel, but for build_artifacts.py's
ATTENTION_MODELS: "llama-wide" (head_dim 64; also test_tensor_parallel.py's model) and
"llama-hd128".

The libraries and artifacts come from KILN_GPU_ARTIFACTS (tests/gpu/build_artifacts.py writes
Kiln's extern, TVM's kernel for these shapes and the models there), so the GPU machine needs
only the TVM runtime; without it, they are built here (nvcc) and TVM's kernel is left out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tvm
import tvm_ffi
from conftest import make_checkpoint
from gpu.build_artifacts import ATTENTION_CONFIGS, ATTENTION_MODELS

import kiln
from kiln.runtime.attention import ARTIFACT_FILE, PREFILL_RAGGED, load_attention
from kiln.runtime.device import open_device
from kiln.runtime.runner import Runner

pytestmark = pytest.mark.gpu

TVM_LIBRARY = "tvm-ragged-prefill.so"  # bench/attention.py's build of TVM's kernels
LENGTHS = [100, 1, 1000, 7, 64]  # one ragged batch: tiles of every fill, a sequence of 1
# (dtype, head_dim, query heads, KV heads): 1, 4 and 8 queries per KV head
CONFIGS = [(dtype, d, h_q, h_kv) for dtype, h_q, h_kv, d in ATTENTION_CONFIGS]
FP16_BOUND = 2e-2  # test_cuda.py's: max logits error relative to their largest magnitude
# Output tolerance: one rounding of O to the dtype plus P's rounding for the tensor cores
O_TOL = {"float16": 2e-3, "bfloat16": 1.6e-2}
LSE_TOL = 1e-3  # lse is fp32 throughout
EMPTY_LSE = -5e4  # a row that sees no key (TVM's kernels' starting score)


def reference(q, k, v, q_indptr, kv_indptr, causal: bool, sm_scale: float):
    """Attention in float64 with TVM's conventions: queries aligned to the end of the keys under
    `causal`, lse = log2(sum 2^(s)) of scores s = q.k * sm_scale * log2(e); a row that sees no
    key: output 0, lse -5e4."""
    total_q, h_q, head_dim = q.shape
    group = h_q // k.shape[1]
    out = np.zeros((total_q, h_q, head_dim))
    lse = np.zeros((total_q, h_q))
    for b in range(len(q_indptr) - 1):
        q0, q1, k0, k1 = q_indptr[b], q_indptr[b + 1], kv_indptr[b], kv_indptr[b + 1]
        q_len, kv_len = q1 - q0, k1 - k0
        visible = np.ones((q_len, kv_len), bool)
        if causal:
            visible = np.arange(kv_len)[None, :] < kv_len - q_len + np.arange(q_len)[:, None] + 1
        empty = ~visible.any(axis=1)
        for h in range(h_q):
            qh = q[q0:q1, h].astype(np.float64)
            kh, vh = k[k0:k1, h // group].astype(np.float64), v[k0:k1, h // group]
            s = np.where(visible, qh @ kh.T * sm_scale * np.log2(np.e), -np.inf)
            m = np.where(empty, 0.0, s.max(axis=1, initial=-np.inf))
            p = np.exp2(s - m[:, None])
            total = np.where(empty, 1.0, p.sum(axis=1))
            out[q0:q1, h] = np.where(
                empty[:, None], 0.0, p @ vh.astype(np.float64) / total[:, None]
            )
            lse[q0:q1, h] = np.where(empty, EMPTY_LSE, m + np.log2(total))
    return out, lse


def rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values exactly representable in `dtype` (bf16: round to nearest even)."""
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32)


def upload(x: np.ndarray, dtype: str, dev):
    """A float32 array as a `dtype` tensor on `dev` (bf16 through its bits: no ml_dtypes)."""
    if dtype == "float16":
        return tvm.runtime.tensor(x.astype(np.float16), dev)
    bits = (rounded(x, dtype).view(np.uint32) >> 16).astype(np.uint16)
    return tvm.runtime.tensor(bits, dev)._create_view(x.shape, "bfloat16")


def download(t, dtype: str) -> np.ndarray:
    if dtype == "float16":
        return t.numpy().astype(np.float32)
    bits = t._create_view(tuple(t.shape), "uint16").numpy()
    return (bits.astype(np.uint32) << 16).view(np.float32)


@pytest.fixture(scope="module")
def kernels():
    """(device, Kiln's prefill_ragged_tiled, TVM's library or None)."""
    dev = open_device("cuda:0")  # TVM's CUDA runtime before the extern (it shares libcudart)
    prebuilt = os.environ.get("KILN_GPU_ARTIFACTS")
    library = Path(prebuilt) / ARTIFACT_FILE if prebuilt else None
    if library is not None and not library.is_file():
        pytest.fail(f"{library} is missing: run tests/gpu/build_artifacts.py again")
    load_attention(library)
    tvm_library = Path(prebuilt) / TVM_LIBRARY if prebuilt else None
    tvm_kernels = None
    if tvm_library is not None and tvm_library.is_file():
        tvm_kernels = tvm.runtime.load_module(str(tvm_library))
    return dev, tvm_ffi.get_global_func(PREFILL_RAGGED + "_tiled"), tvm_kernels


class Case:
    """Random q, k, v (rounded to the dtype) of a ragged batch, on the device."""

    def __init__(self, dev, dtype, head_dim, h_q, h_kv, q_lens, kv_lens=None, seed=0):
        kv_lens = q_lens if kv_lens is None else kv_lens
        rng = np.random.default_rng(seed)
        self.dev, self.dtype = dev, dtype
        self.q_indptr = np.concatenate([[0], np.cumsum(q_lens)]).astype("int32")
        self.kv_indptr = np.concatenate([[0], np.cumsum(kv_lens)]).astype("int32")
        total_q, total_kv = int(self.q_indptr[-1]), int(self.kv_indptr[-1])
        self.q = rounded(rng.standard_normal((total_q, h_q, head_dim)), dtype)
        self.k = rounded(rng.standard_normal((total_kv, h_kv, head_dim)), dtype)
        self.v = rounded(rng.standard_normal((total_kv, h_kv, head_dim)), dtype)
        self.sm_scale = head_dim**-0.5
        self.args = [
            upload(self.q, dtype, dev),
            tvm.runtime.tensor(self.q_indptr, dev),
            upload(self.k, dtype, dev),
            upload(self.v, dtype, dev),
            tvm.runtime.tensor(self.kv_indptr, dev),
            tvm.runtime.tensor(np.zeros(total_q, "int32"), dev),  # RoPE positions: unused
            tvm.runtime.tensor(np.zeros(len(q_lens), "int32"), dev),
        ]

    def run(self, fn, causal: bool, *lead) -> tuple[np.ndarray, np.ndarray]:
        """fn(*lead, q, ..., output, lse, causal, rotary_mode 0, ...) into NaN-filled outputs."""
        out = upload(np.full(self.q.shape, np.nan, np.float32), self.dtype, self.dev)
        lse = tvm.runtime.tensor(np.full(self.q.shape[:2], np.nan, np.float32), self.dev)
        fn(*lead, *self.args, out, lse, int(causal), 0, 1.0, 1e4, self.sm_scale)
        return download(out, self.dtype), lse.numpy()

    def reference(self, causal: bool):
        return reference(self.q, self.k, self.v, self.q_indptr, self.kv_indptr, causal,
                         self.sm_scale)  # fmt: skip


def check(got: tuple, want: tuple, dtype: str, what: str) -> None:
    (o, lse), (o_ref, lse_ref) = got, want
    assert np.isfinite(o).all() and np.isfinite(lse).all(), f"{what}: rows left unwritten"
    o_err, lse_err = np.abs(o - o_ref).max(), np.abs(lse - lse_ref).max()
    print(f"{what}: max |O - ref| {o_err:.1e}, max |lse - ref| {lse_err:.1e}")
    np.testing.assert_allclose(o, o_ref, rtol=O_TOL[dtype], atol=O_TOL[dtype], err_msg=what)
    np.testing.assert_allclose(lse, lse_ref, rtol=0, atol=LSE_TOL, err_msg=what)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype,head_dim,h_q,h_kv", CONFIGS)
def test_ragged_batch_equals_numpy(kernels, dtype, head_dim, h_q, h_kv, causal):
    """Each tile height (64, 128, and the one the kernel picks) on one batch of LENGTHS."""
    dev, tiled, _ = kernels
    case = Case(dev, dtype, head_dim, h_q, h_kv, LENGTHS)
    want = case.reference(causal)
    for rows in (64, 128, 0):
        what = f"{dtype} d{head_dim} {h_q}/{h_kv} heads causal={causal} rows={rows}"
        check(case.run(tiled, causal, rows), want, dtype, what)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype,head_dim", [("float16", 128), ("bfloat16", 64)])
def test_queries_aligned_to_the_end_of_longer_keys(kernels, dtype, head_dim, causal):
    """A chunk after a prefix: q_len < kv_len, causal rows see the prefix and themselves; with
    q_len > kv_len (and an empty sequence) causal rows before the keys see nothing."""
    dev, tiled, _ = kernels
    q_lens, kv_lens = [1, 7, 64, 100, 20, 0], [1, 12, 128, 1000, 5, 3]
    case = Case(dev, dtype, head_dim, 8, 2, q_lens, kv_lens, seed=1)
    want = case.reference(causal)
    for rows in (64, 128):
        what = f"{dtype} d{head_dim} q_len<kv_len causal={causal} rows={rows}"
        check(case.run(tiled, causal, rows), want, dtype, what)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype,head_dim,h_q,h_kv", CONFIGS)
def test_agrees_with_tvms_kernel(kernels, dtype, head_dim, h_q, h_kv, causal):
    """TVM's batch_prefill_ragged_kv (what the cache ran before) on the same inputs."""
    dev, tiled, tvm_kernels = kernels
    if tvm_kernels is None:
        pytest.skip("no TVM kernels: KILN_GPU_ARTIFACTS from tests/gpu/build_artifacts.py")
    case = Case(dev, dtype, head_dim, h_q, h_kv, LENGTHS, seed=2)
    theirs = case.run(tvm_kernels[f"tvm_ragged_{dtype}_{h_q}_{h_kv}_{head_dim}"], causal)
    ours = case.run(tiled, causal, 0)
    # Both are one rounding of the same fp32 result away from the reference.
    check(ours, theirs, dtype, f"{dtype} d{head_dim} {h_q}/{h_kv} causal={causal} vs TVM")


def test_the_contract_entry_point_equals_the_tiled_one(kernels):
    dev, tiled, _ = kernels
    case = Case(dev, "float16", 128, 8, 2, LENGTHS, seed=3)
    auto = case.run(tvm_ffi.get_global_func(PREFILL_RAGGED), True)
    np.testing.assert_array_equal(auto[0], case.run(tiled, True, 0)[0])


def test_runs_on_tvms_current_stream(kernels):
    """On a torch stream set as TVM's current one, after a long kernel on that stream that
    writes q: run on any other stream, the attention would read q before it is written."""
    torch = pytest.importorskip("torch")
    _, tiled, _ = kernels
    rng = np.random.default_rng(4)
    n, heads, head_dim = 1024, 8, 128
    src = torch.tensor(rng.standard_normal((n, heads, head_dim)), dtype=torch.float16,
                       device="cuda")  # fmt: skip
    k = torch.tensor(rng.standard_normal((n, 2, head_dim)), dtype=torch.float16, device="cuda")
    q = torch.zeros_like(src)
    indptr = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    rope = torch.zeros(n, dtype=torch.int32, device="cuda")
    out = torch.zeros_like(src)
    lse = torch.zeros((n, heads), dtype=torch.float32, device="cuda")
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), tvm_ffi.use_torch_stream():
        torch.cuda._sleep(200_000_000)  # ~0.1 s of spinning on `stream`
        q.copy_(src)
        tiled(0, q, indptr, k, k, indptr, rope, indptr[:1], out, lse, 1, 0, 1.0, 1e4, 0.1)
    stream.synchronize()
    host = src.float().cpu().numpy()
    kv = k.float().cpu().numpy()
    want, _ = reference(host, kv, kv, np.array([0, n]), np.array([0, n]), True, 0.1)
    np.testing.assert_allclose(out.float().cpu().numpy(), want, rtol=2e-3, atol=2e-3)


@pytest.fixture(scope="module")
def attention_model(tmp_path_factory):
    """attention_model(name) -> (checkpoint, q0f16 CUDA artifact) of ATTENTION_MODELS[name]."""
    prebuilt = os.environ.get("KILN_GPU_ARTIFACTS")

    def get(name: str) -> tuple[Path, Path]:
        if prebuilt:
            return Path(prebuilt) / f"ckpt-{name}", Path(prebuilt) / f"{name}-q0f16"
        tmp = tmp_path_factory.mktemp(name)
        ckpt = make_checkpoint("llama", tmp / "ckpt", **ATTENTION_MODELS[name])
        art = kiln.compile(str(ckpt), target="cuda", quantization="q0f16",
                           output=tmp / "artifact", arch="sm_90")  # fmt: skip
        return ckpt, art

    return get


@pytest.mark.parametrize("name", list(ATTENTION_MODELS))
def test_artifacts_on_kilns_kernel_match_transformers(attention_model, name):
    """One ragged prefill of three sequences (230 tokens cut to 150, 1, 77), then the rest of
    the first one as a chunk over its cached prefix: every row's logits against transformers."""
    import torch
    import transformers

    ckpt, art = attention_model(name)
    assert PREFILL_RAGGED in json.loads((art / "manifest.json").read_text())["target"]["externs"]
    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype="float32").eval()
    runner = Runner(art, "cuda", max_batch_size=4, kv_tokens=1024)
    rng = np.random.default_rng(6)
    prompts = [[1, *rng.integers(3, runner.vocab_size, n - 1).tolist()] for n in (230, 1, 77)]

    def theirs(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return ref(torch.tensor([ids])).logits[0].numpy()

    def rel_err(ours: np.ndarray, expect: np.ndarray) -> float:
        return float(np.abs(ours - expect).max() / np.abs(expect).max())

    for seq in range(len(prompts)):
        runner.kv.add(seq)
    first = [prompts[0][:150], *prompts[1:]]
    rows = runner.prefill([0, 1, 2], first, all_logits=True)
    start = 0
    for seq, ids in enumerate(first):
        err = rel_err(rows[start : start + len(ids)], theirs(ids))
        print(f"{name}: ragged prefill, sequence {seq} ({len(ids)} tokens): max rel err {err:.2e}")
        assert err <= FP16_BOUND
        start += len(ids)
    rest = runner.prefill([0], [prompts[0][150:]], all_logits=True)
    err = rel_err(rest, theirs(prompts[0])[150:])
    print(f"{name}: 80 tokens after a cached prefix of 150: max rel err {err:.2e}")
    assert err <= FP16_BOUND
