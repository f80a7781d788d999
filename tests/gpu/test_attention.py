"""Kiln's attention kernels (`kiln.attention.prefill_ragged`, `prefill_paged` and
`decode_paged`) on a real GPU, against float64 NumPy references (attention_reference.py) and
TVM's own kernels on the same inputs: fp16 and bf16, head_dim 64 and 128, 1, 4 and 8 query heads
per KV head, causal and not, both tile heights. Ragged: batches of sequences of 1, 7, 64, 100
and 1000 tokens, queries aligned to the end of longer keys. Paged: chunks of 1, 7, 64 and 300
queries against histories of 0, 1, 15, 16, 17, 100 and 1000 keys in shuffled pages (unused page
rows hold NaN, so a wrong gather shows). Decode: one query per sequence after 0 to 4000 keys,
split over 1 to 64 blocks, groups of 1 to 16 query heads per KV head, page sizes 1 to 32, calls
after calls. RoPE and the KV append (`split_rope`, `append_kv`): done by the decode kernel
itself, or before a prefill kernel, against float64 RoPE. The kernels run on TVM's current
stream; and CUDA artifacts that call them (head_dim 64 and 128) give transformers' logits for a
ragged batch, for chunks after cached prefixes of different lengths in one pass, for a prompt
prefilled in chunks (where TVM merges the paged kernel's output with the ragged one's through
the lse), and for decode steps.

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
from attention_reference import EMPTY_LSE, paged_reference, random_page_table, reference, visible
from conftest import make_checkpoint
from gpu.build_artifacts import ATTENTION_CONFIGS, ATTENTION_MODELS
from step_graph_checks import check_step_graphs

import kiln
from kiln.runtime.attention import (
    APPEND_KV,
    ARTIFACT_FILE,
    DECODE_PAGED,
    PREFILL_PAGED,
    PREFILL_RAGGED,
    SPLIT_ROPE,
    load_attention,
)
from kiln.runtime.device import open_device
from kiln.runtime.runner import Runner

pytestmark = pytest.mark.gpu

TVM_LIBRARY = "tvm-prefill.so"  # bench/attention.py's build of TVM's kernels
LENGTHS = [100, 1, 1000, 7, 64]  # one ragged batch: tiles of every fill, a sequence of 1
# (dtype, head_dim, query heads, KV heads): 1, 4 and 8 queries per KV head
CONFIGS = [(dtype, d, h_q, h_kv) for dtype, h_q, h_kv, d in ATTENTION_CONFIGS]
FP16_BOUND = 2e-2  # test_cuda.py's: max logits error relative to their largest magnitude
# Output tolerance: one rounding of O to the dtype plus P's rounding for the tensor cores
O_TOL = {"float16": 2e-3, "bfloat16": 1.6e-2}
LSE_TOL = 1e-3  # lse is fp32 throughout
# Paged: each history (keys already in the cache) with each chunk length, in one batch
HISTORIES = [0, 1, 15, 16, 17, 100, 1000]
CHUNKS = [1, 7, 64, 300]
PAGE_SIZE = 16  # Kiln's caches' (TVM's paged kernel is built for it)


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


def nan_rows(shape, dtype: str, dev):
    """A `dtype` tensor of `shape` on `dev`, every element NaN (so that what a kernel leaves
    unwritten shows)."""
    return upload(np.full(shape, np.nan, np.float32), dtype, dev)


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
        out = nan_rows(self.q.shape, self.dtype, self.dev)
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


# Paged: the chunk's queries against the keys its sequences already have in the cache's pages.


class PagedCase(Case):
    """Random q and pages (rounded to the dtype) of a batch with a history and a chunk per
    sequence, the pages in shuffled order, every page row no sequence holds NaN; on the device.
    (Case.run calls a kernel on them.)"""

    def __init__(self, dev, dtype, head_dim, h_q, h_kv, histories, chunks, page_size=PAGE_SIZE,
                 seed=0):  # fmt: skip
        rng = np.random.default_rng(seed)
        self.dev, self.dtype = dev, dtype
        self.histories, self.chunks = list(histories), list(chunks)
        num_pages, self.page_indptr, self.page_values, self.last = random_page_table(
            rng, histories, page_size
        )
        pages = np.full((num_pages, 2, h_kv, page_size, head_dim), np.nan, np.float32)
        for b, n in enumerate(histories):
            for i in range(n):  # key i of sequence b, K and V
                page = self.page_values[self.page_indptr[b] + i // page_size]
                pages[page, :, :, i % page_size] = rng.standard_normal((2, h_kv, head_dim))
        self.pages = rounded(pages, dtype)
        self.q_indptr = np.concatenate([[0], np.cumsum(chunks)]).astype("int32")
        self.q = rounded(rng.standard_normal((int(self.q_indptr[-1]), h_q, head_dim)), dtype)
        self.sm_scale = head_dim**-0.5
        int32 = lambda x: tvm.runtime.tensor(np.asarray(x, "int32"), dev)  # noqa: E731
        self.args = [
            upload(self.q, dtype, dev),
            int32(self.q_indptr),
            upload(self.pages, dtype, dev),
            int32(self.page_indptr),
            int32(self.page_values),
            int32(self.last),  # length_info: the last page's length
            int32(np.zeros(len(chunks))),  # RoPE: unused
            int32(np.zeros(len(self.q))),
        ]

    def reference(self, causal: bool):
        return paged_reference(self.q, self.q_indptr, self.pages, self.page_indptr,
                               self.page_values, self.last, causal, self.sm_scale)  # fmt: skip

    def seen(self, causal: bool) -> np.ndarray:
        """(total_q,): whether each query sees some key."""
        pairs = zip(self.chunks, self.histories, strict=True)
        return np.concatenate([visible(n, h, causal).any(axis=1) for n, h in pairs])


def every_pair(histories, chunks, seed: int) -> tuple[list[int], list[int]]:
    """Each history with each chunk length, one sequence each, in a shuffled order."""
    pairs = [(h, c) for h in histories for c in chunks]
    order = np.random.default_rng(seed).permutation(len(pairs))
    return [pairs[i][0] for i in order], [pairs[i][1] for i in order]


@pytest.fixture(scope="module")
def paged(kernels):
    """(device, Kiln's prefill_paged_tiled, TVM's library or None)."""
    dev, _, tvm_kernels = kernels
    return dev, tvm_ffi.get_global_func(PREFILL_PAGED + "_tiled"), tvm_kernels


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,head_dim,h_q,h_kv", CONFIGS)
def test_paged_equals_numpy(paged, dtype, head_dim, h_q, h_kv, causal):
    """Every history with every chunk length in one batch, each tile height. The cache passes
    causal 0 (the history precedes the chunk); causal 1 aligns the chunk to the end of the
    history, as TVM's kernel does, and its rows before the history see nothing (output 0)."""
    dev, tiled, _ = paged
    histories, chunks = every_pair(HISTORIES, CHUNKS, seed=7)
    case = PagedCase(dev, dtype, head_dim, h_q, h_kv, histories, chunks, seed=8)
    want = case.reference(causal)
    for rows in (64, 128, 0):
        what = f"paged {dtype} d{head_dim} {h_q}/{h_kv} heads causal={causal} rows={rows}"
        check(case.run(tiled, causal, rows), want, dtype, what)


@pytest.mark.parametrize("page_size", [1, 8, 32])
def test_paged_other_page_sizes_equal_numpy(paged, page_size):
    """The page size comes from the pages' shape: a 64-key tile spans 64, 8 or 2 pages, or
    part of one."""
    dev, tiled, _ = paged
    histories, chunks = [0, 5, 40, 100, 333], [3, 64, 17, 130, 1]
    case = PagedCase(dev, "float16", 128, 8, 2, histories, chunks, page_size, seed=9)
    check(case.run(tiled, False, 0), case.reference(False), "float16", f"page_size {page_size}")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,head_dim,h_q,h_kv", CONFIGS)
def test_paged_agrees_with_tvms_kernel(paged, dtype, head_dim, h_q, h_kv, causal):
    """TVM's batch_prefill_paged_kv (what the cache ran before) on the same pages. Under causal,
    rows that see no key only where the history is not empty (TVM's gives them an average of
    V; the cache never asks for it) are left out."""
    dev, tiled, tvm_kernels = paged
    if tvm_kernels is None:
        pytest.skip("no TVM kernels: KILN_GPU_ARTIFACTS from tests/gpu/build_artifacts.py")
    histories, chunks = every_pair(HISTORIES, CHUNKS, seed=10)
    case = PagedCase(dev, dtype, head_dim, h_q, h_kv, histories, chunks, seed=11)
    theirs = case.run(tvm_kernels[f"tvm_paged_{dtype}_{h_q}_{h_kv}_{head_dim}"], causal)
    ours = case.run(tiled, causal, 0)
    rows = case.seen(causal) | np.repeat(np.array(histories) == 0, chunks)
    check(tuple(x[rows] for x in ours), tuple(x[rows] for x in theirs), dtype,
          f"paged {dtype} d{head_dim} {h_q}/{h_kv} causal={causal} vs TVM")  # fmt: skip


def test_paged_rows_without_keys_and_empty_batches(paged):
    """Rows of a sequence without history: output 0 and lse -5e4 (TVM's), which its merge with
    the ragged part ignores; a batch without queries writes nothing."""
    dev, tiled, _ = paged
    case = PagedCase(dev, "bfloat16", 64, 4, 4, [0, 0, 20], [5, 70, 0], seed=12)
    out, lse = case.run(tiled, False, 0)
    assert (out[:75] == 0).all() and (lse[:75] == EMPTY_LSE).all()
    empty = PagedCase(dev, "float16", 64, 4, 4, [16, 3], [0, 0], seed=13)
    assert empty.run(tiled, False, 0)[0].shape == (0, 4, 64)


def test_paged_contract_entry_point_equals_the_tiled_one(paged):
    dev, tiled, _ = paged
    case = PagedCase(dev, "float16", 128, 8, 2, [1000, 17], [300, 64], seed=14)
    auto = case.run(tvm_ffi.get_global_func(PREFILL_PAGED), False)
    np.testing.assert_array_equal(auto[0], case.run(tiled, False, 0)[0])


# Decode: one query per sequence against every key of its history in the pages.

DECODE_HISTORIES = [0, 1, 15, 16, 17, 100, 1000, 4000]


class DecodeCase(PagedCase):
    """A batch of one query per sequence after `histories` keys in shuffled pages (unused page
    rows NaN): decode_paged's arguments (q, pages, page_indptr, page_values, length_info, RoPE
    offsets and positions)."""

    def __init__(self, dev, dtype, head_dim, h_q, h_kv, histories, page_size=PAGE_SIZE, seed=0):
        super().__init__(dev, dtype, head_dim, h_q, h_kv, histories, [1] * len(histories),
                         page_size, seed)  # fmt: skip
        del self.args[1]  # no q_indptr: one query each

    def run(self, fn, *lead, rope=(1.0, 1e4)) -> tuple[np.ndarray, np.ndarray]:
        """fn(*lead, q, pages, ..., output, lse, rotary_mode 0, *rope (scale, theta), sm_scale)
        into NaN-filled outputs."""
        out = nan_rows(self.q.shape, self.dtype, self.dev)
        lse = tvm.runtime.tensor(np.full(self.q.shape[:2], np.nan, np.float32), self.dev)
        fn(*lead, *self.args, out, lse, 0, *rope, self.sm_scale)
        return download(out, self.dtype), lse.numpy()


@pytest.fixture(scope="module")
def decode(kernels):
    """(device, Kiln's decode_paged_split, TVM's library or None)."""
    dev, _, tvm_kernels = kernels
    return dev, tvm_ffi.get_global_func(DECODE_PAGED + "_split"), tvm_kernels


@pytest.mark.parametrize("dtype,head_dim,h_q,h_kv", CONFIGS)
def test_decode_equals_numpy(decode, dtype, head_dim, h_q, h_kv):
    """Histories of 0 to 4000 keys in one batch, unsplit, split in 2, 7 and 64 (more splits
    than a short history has keys: empty splits), and as many as the kernel picks."""
    dev, split, _ = decode
    case = DecodeCase(dev, dtype, head_dim, h_q, h_kv, DECODE_HISTORIES, seed=20)
    want = case.reference(False)
    for splits in (1, 2, 7, 64, 0):
        what = f"decode {dtype} d{head_dim} {h_q}/{h_kv} heads splits={splits}"
        check(case.run(split, splits), want, dtype, what)


@pytest.mark.parametrize(
    "h_q,h_kv",
    [(12, 4), (24, 8), (32, 2), (48, 4), (6, 6)],  # 3, 3, 16, 12 and 1 queries per KV head
)
def test_decode_other_group_sizes_equal_numpy(decode, h_q, h_kv):
    """A block takes up to 8 query heads of a KV head (rounded up to a power of two, the extra
    ones idle); larger groups are cut into slices of 8, each its own block."""
    dev, split, _ = decode
    case = DecodeCase(dev, "float16", 128, h_q, h_kv, [3, 300, 33], seed=21)
    want = case.reference(False)
    for splits in (1, 3, 0):
        check(case.run(split, splits), want, "float16", f"decode {h_q}/{h_kv} splits={splits}")


@pytest.mark.parametrize("heads", [1, 2, 4, 8])
def test_decode_any_heads_a_block_equals_numpy(decode, heads):
    """A block takes its KV head's whole group of query heads, or where a call has few keys one
    or two of them (attention.cu's DecodeHeads); decode_paged_tiled(heads, splits, ...) picks
    the count (at most the group's power of two). Each count and split equals NumPy; a count
    that is not a power of two is refused."""
    dev, _, _ = decode
    tiled = tvm_ffi.get_global_func(DECODE_PAGED + "_tiled")
    for h_q, h_kv in ((32, 8), (12, 4), (32, 2)):  # groups of 4, 3 and 16
        case = DecodeCase(dev, "float16", 128, h_q, h_kv, [0, 3, 300, 1000], seed=27)
        want = case.reference(False)
        for splits in (1, 3, 0):
            check(case.run(tiled, heads, splits), want, "float16",
                  f"decode {h_q}/{h_kv} heads={heads} splits={splits}")  # fmt: skip
    with pytest.raises(Exception, match="heads must be"):
        case.run(tiled, 3, 0)


@pytest.mark.parametrize("page_size", [1, 8, 32])
def test_decode_other_page_sizes_equal_numpy(decode, page_size):
    dev, split, _ = decode
    case = DecodeCase(dev, "bfloat16", 64, 8, 2, [0, 5, 40, 100, 333], page_size, seed=22)
    for splits in (1, 5, 0):
        check(case.run(split, splits), case.reference(False), "bfloat16",
              f"decode page_size {page_size} splits={splits}")  # fmt: skip


@pytest.mark.parametrize("dtype,head_dim,h_q,h_kv", CONFIGS)
def test_decode_agrees_with_tvms_kernel(decode, dtype, head_dim, h_q, h_kv):
    """TVM's batch_decode_paged_kv (what the cache ran before) on the same pages. The sequence
    without history is left out: TVM's kernel gives it output 0 but an lse of -5e4 plus the
    log2 of how many of its threads' states it merged (the cache never reads it)."""
    dev, split, tvm_kernels = decode
    if tvm_kernels is None:
        pytest.skip("no TVM kernels: KILN_GPU_ARTIFACTS from tests/gpu/build_artifacts.py")
    case = DecodeCase(dev, dtype, head_dim, h_q, h_kv, DECODE_HISTORIES, seed=23)
    theirs = case.run(tvm_kernels[f"tvm_decode_{dtype}_{h_q}_{h_kv}_{head_dim}"])
    ours = case.run(split, 0)
    rows = np.array(DECODE_HISTORIES) > 0
    check(tuple(x[rows] for x in ours), tuple(x[rows] for x in theirs), dtype,
          f"decode {dtype} d{head_dim} {h_q}/{h_kv} vs TVM")  # fmt: skip
    assert (theirs[0][~rows] == 0).all() and (ours[0][~rows] == 0).all()


def test_decode_calls_after_calls_with_other_shapes(decode):
    """The split kernel keeps per-device scratch across calls: counters that must be zero when
    a call starts, and each split's state. A large call first (the scratch grows to its size),
    then one sequence in 40 splits (its states where the next call's counters would be, were
    they one buffer), then 8 sequences of 32 heads in 3 splits (more counters than any call
    before), then the first small call again: each equals NumPy, the repeat bit for bit."""
    dev, split, _ = decode
    large = DecodeCase(dev, "float16", 128, 8, 8, [200] * 48 + [3000], seed=24)
    one = DecodeCase(dev, "float16", 128, 32, 32, [2000], seed=25)
    wide = DecodeCase(dev, "float16", 128, 32, 32, [300] * 8, seed=26)
    check(large.run(split, 40), large.reference(False), "float16", "large batch, 40 splits")
    first = one.run(split, 40)
    check(first, one.reference(False), "float16", "one sequence, 40 splits")
    check(wide.run(split, 3), wide.reference(False), "float16", "8 sequences, 3 splits")
    again = one.run(split, 40)
    np.testing.assert_array_equal(again[0], first[0])
    np.testing.assert_array_equal(again[1], first[1])


def test_decode_contract_entry_point_equals_the_split_one(decode):
    """The cache's entry point picks its splits from the GPU's size and the batch: equal to the
    split entry point asked to choose; an empty batch writes nothing."""
    dev, split, _ = decode
    case = DecodeCase(dev, "float16", 128, 32, 32, [256], seed=27)
    auto = case.run(tvm_ffi.get_global_func(DECODE_PAGED))
    np.testing.assert_array_equal(auto[0], case.run(split, 0)[0])
    check(auto, case.reference(False), "float16", "decode entry point")
    empty = DecodeCase(dev, "float16", 64, 4, 4, [], seed=28)
    assert empty.run(split, 0)[0].shape == (0, 4, 64)


# RoPE and the KV append: kiln.attention.split_rope and append_kv record their arguments, and
# the next attention call does their work (the decode kernel itself, a prefill kernel first).

ROPE_THETA, ROPE_SCALE = 1e4, 0.5
ROPE_TOL = {"float16": 4e-3, "bfloat16": 3e-2}  # a rounding or two of values up to ~4


def rope_reference(x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """TVM's fused_rope in float64: rotate-half RoPE of (tokens, heads, d) rows at `positions`
    (multiplied by ROPE_SCALE), frequencies ROPE_THETA^-((2i mod d) / d)."""
    d = x.shape[-1]
    exponent = (2 * np.arange(d) % d) / d
    angle = positions[:, None].astype(np.float64) * ROPE_SCALE / ROPE_THETA**exponent
    partner = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], axis=-1)
    return x * np.cos(angle)[:, None] + partner * np.sin(angle)[:, None]


class NewTokens:
    """A pass of one new token per sequence as the cache hands it over: the fused q/k/v rows
    (before RoPE), RoPE positions up to 5000, and each token's slot in `case`'s pages (the last
    key of its history, left NaN: not written yet), or for `elsewhere` sequences a slot in a
    spare page (a forked sequence's depth-0 call, whose new key is in a later depth's page)."""

    def __init__(self, case: PagedCase, h_q: int, h_kv: int, elsewhere=(), seed=0):
        rng = np.random.default_rng(seed)
        batch, d, ps = len(case.histories), case.q.shape[-1], case.pages.shape[3]
        self.h_q, self.h_kv = h_q, h_kv
        self.qkv = rounded(rng.standard_normal((batch, h_q + 2 * h_kv, d)), case.dtype)
        self.positions = rng.integers(0, 5000, batch).astype("int32")
        spare = sorted(set(range(case.pages.shape[0])) - set(case.page_values.tolist()))
        self.slots = np.zeros(batch, "int32")
        for b, n in enumerate(case.histories):
            if b in elsewhere:
                self.slots[b] = spare[0] * ps + b % ps
            else:
                self.slots[b] = case.page_values[case.page_indptr[b] + (n - 1) // ps] * ps
                self.slots[b] += (n - 1) % ps
            page, row = divmod(int(self.slots[b]), ps)
            case.pages[page, :, :, row] = np.nan
        rotated = rope_reference(self.qkv[:, : h_q + h_kv], self.positions)
        self.q, self.k = rotated[:, :h_q], rotated[:, h_q:]
        self.v = self.qkv[:, h_q + h_kv :]

    def split_rope(self, case: PagedCase):
        """split_rope's call; returns the q, k and v buffers it was given (NaN)."""
        dev, dtype, d = case.dev, case.dtype, self.qkv.shape[-1]
        bufs = [
            nan_rows((len(self.qkv), h, d), dtype, dev) for h in (self.h_q, self.h_kv, self.h_kv)
        ]
        positions = tvm.runtime.tensor(self.positions, dev)
        tvm_ffi.get_global_func(SPLIT_ROPE)(upload(self.qkv, dtype, dev), positions, *bufs, 1)
        return bufs

    def appended(self, pages: np.ndarray) -> np.ndarray:
        """`pages` with each token's K/V (rotated K, rounded) in its slot."""
        pages = pages.copy()
        for b, slot in enumerate(self.slots):
            page, row = divmod(int(slot), pages.shape[3])
            pages[page, 0, :, row] = self.k[b]
            pages[page, 1, :, row] = self.v[b]
        return pages


def assert_close_or_both_nan(got, want, tol, what):
    assert (np.isnan(got) == np.isnan(want)).all(), f"{what}: NaN where not expected, or not"
    np.testing.assert_allclose(np.nan_to_num(got), np.nan_to_num(want), rtol=tol, atol=tol,
                               err_msg=what)  # fmt: skip


@pytest.mark.parametrize("dtype,head_dim,h_q,h_kv", CONFIGS)
def test_decode_does_the_deferred_rope_and_append_itself(decode, dtype, head_dim, h_q, h_kv):
    """split_rope and append_kv as the cache calls them before a decode pass, then decode_paged
    in 1, 3 and the chosen splits: the output is attention of the rotated q over the history and
    the rotated new key; the kernel wrote the rotated q into q, k and v into their slots (one
    sequence's slot in a page its call does not read: written, not attended to), and nothing
    into the k and v buffers, which only a separate append would have read."""
    dev, split, _ = decode
    histories = [1, 15, 16, 17, 100, 1000, 40]
    for splits in (1, 3, 0):
        case = DecodeCase(dev, dtype, head_dim, h_q, h_kv, histories, seed=29)
        new = NewTokens(case, h_q, h_kv, elsewhere=(6,), seed=30)
        q, k, v = new.split_rope(case)
        pages = upload(case.pages, dtype, dev)
        tvm_ffi.get_global_func(APPEND_KV)(pages, k, v, tvm.runtime.tensor(new.slots, dev))
        case.args[0], case.args[1] = q, pages
        what = f"fused decode {dtype} d{head_dim} {h_q}/{h_kv} splits={splits}"
        got = case.run(split, splits, rope=(ROPE_SCALE, ROPE_THETA))
        q_got, pages_got = download(q, dtype), download(pages, dtype)
        tol = ROPE_TOL[dtype]
        assert_close_or_both_nan(q_got, new.q, tol, f"{what}: q")
        assert_close_or_both_nan(pages_got, new.appended(case.pages), tol, f"{what}: pages")
        assert np.isnan(download(k, dtype)).all() and np.isnan(download(v, dtype)).all()
        # the attention, on the very q and keys the kernel rotated and rounded
        want = paged_reference(q_got, np.arange(len(histories) + 1), pages_got, case.page_indptr,
                               case.page_values, case.last, False, case.sm_scale)  # fmt: skip
        check(got, want, dtype, what)


def test_prefill_runs_the_deferred_rope_first_and_appends_after(kernels):
    """A prefill pass: split_rope, then the ragged prefill kernel (which rotates q and k into
    their buffers first, as one kernel), then append_kv (nothing pending: it copies k and v into
    their slots at once); then a decode pass whose attention call is the paged prefill kernel
    (a depth the cache runs it on): it does the pending RoPE and append before its own work."""
    dev, ragged, _ = kernels
    dtype, d, h_q, h_kv = "float16", 128, 8, 2
    case = DecodeCase(dev, dtype, d, h_q, h_kv, [5, 16, 33], seed=31)
    new = NewTokens(case, h_q, h_kv, seed=32)
    q, k, v = new.split_rope(case)
    indptr = tvm.runtime.tensor(np.arange(4, dtype="int32"), dev)
    out, lse = nan_rows(new.q.shape, dtype, dev), tvm.runtime.tensor(
        np.full(new.q.shape[:2], np.nan, np.float32), dev)  # fmt: skip
    ragged(0, q, indptr, k, v, indptr, *case.args[5:7], out, lse, 1, 0, ROPE_SCALE, ROPE_THETA,
           case.sm_scale)  # fmt: skip
    tol = ROPE_TOL[dtype]
    for buf, want, what in ((q, new.q, "q"), (k, new.k, "k"), (v, new.v, "v")):
        assert_close_or_both_nan(download(buf, dtype), want, tol, f"prefill: {what}")
    q_got, k_got, v_got = (download(buf, dtype) for buf in (q, k, v))
    want = reference(q_got, k_got, v_got, np.arange(4), np.arange(4), True, case.sm_scale)
    check((download(out, dtype), lse.numpy()), want, dtype, "prefill of the rotated rows")
    pages = upload(case.pages, dtype, dev)
    tvm_ffi.get_global_func(APPEND_KV)(pages, k, v, tvm.runtime.tensor(new.slots, dev))
    assert_close_or_both_nan(download(pages, dtype), new.appended(case.pages), tol, "appended")

    later = NewTokens(case, h_q, h_kv, seed=33)  # the same slots, new rows
    q, k, v = later.split_rope(case)
    tvm_ffi.get_global_func(APPEND_KV)(pages, k, v, tvm.runtime.tensor(later.slots, dev))
    paged = tvm_ffi.get_global_func(PREFILL_PAGED)
    out = nan_rows(later.q.shape, dtype, dev)
    paged(q, indptr, pages, *case.args[2:5], *case.args[5:7], out, lse, 0, 0, ROPE_SCALE,
          ROPE_THETA, case.sm_scale)  # fmt: skip
    pages_got = download(pages, dtype)
    assert_close_or_both_nan(pages_got, later.appended(case.pages), tol, "appended before paged")
    assert_close_or_both_nan(download(k, dtype), later.k, tol, "k before paged")
    want = paged_reference(download(q, dtype), np.arange(4), pages_got, case.page_indptr,
                           case.page_values, case.last, False, case.sm_scale)  # fmt: skip
    check((download(out, dtype), lse.numpy()), want, dtype, "paged prefill after the pending work")


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
    """Every row's logits against transformers: one ragged prefill of three sequences (230, 21
    and 147 tokens cut to 150, 1 and 77: the ragged kernel only), then the rest of all three in
    one pass (histories 150, 1 and 77: the paged kernel too, merged with the ragged one), then a
    fourth prompt of 230 tokens prefilled in chunks of 64 (histories 0, 64, 128, 192); then
    decode steps of all four together and of one alone (the decode kernel)."""
    import torch
    import transformers

    ckpt, art = attention_model(name)
    externs = json.loads((art / "manifest.json").read_text())["target"]["externs"]
    assert {PREFILL_RAGGED, PREFILL_PAGED, DECODE_PAGED, SPLIT_ROPE, APPEND_KV} <= set(externs)
    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype="float32").eval()
    runner = Runner(art, "cuda", max_batch_size=4, kv_tokens=1024)
    rng = np.random.default_rng(6)
    prompts = [
        [1, *rng.integers(3, runner.vocab_size, n - 1).tolist()] for n in (230, 21, 147, 230)
    ]

    def theirs(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return ref(torch.tensor([ids])).logits[0].numpy()

    def check_rows(rows: np.ndarray, cuts: list[tuple[int, int]], what: str) -> None:
        """rows: the logits of prompts[seq][start:end] for each (start, end), in order."""
        first = 0
        for seq, (start, end) in enumerate(cuts):
            expect = theirs(prompts[seq][:end])[start:]
            ours = rows[first : first + end - start]
            err = float(np.abs(ours - expect).max() / np.abs(expect).max())
            print(f"{name}: {what}, sequence {seq} (tokens {start}..{end}): max rel err {err:.2e}")
            assert err <= FP16_BOUND
            first += end - start

    for seq in range(len(prompts)):
        runner.kv.add(seq)
    cuts = [(0, 150), (0, 1), (0, 77)]
    rows = runner.prefill([0, 1, 2], [prompts[s][a:b] for s, (a, b) in enumerate(cuts)], True)
    check_rows(rows, cuts, "ragged prefill")
    cuts = [(150, 230), (1, 21), (77, 147)]
    rows = runner.prefill([0, 1, 2], [prompts[s][a:b] for s, (a, b) in enumerate(cuts)], True)
    check_rows(rows, cuts, "after cached prefixes")
    chunked = [runner.prefill([3], [prompts[3][a : a + 64]], True) for a in range(0, 230, 64)]
    expect = theirs(prompts[3])
    err = float(np.abs(np.concatenate(chunked) - expect).max() / np.abs(expect).max())
    print(f"{name}: 230 tokens in chunks of 64: max rel err {err:.2e}")
    assert err <= FP16_BOUND

    # Decode (Kiln's decode kernel): the four sequences a token each in one pass, three times,
    # then sequence 1 alone (the batch-1 entry point), three times.
    check_decodes(runner, ref, prompts, [[0, 1, 2, 3]] * 3 + [[1]] * 3, rng, name)


def check_decodes(runner, ref, histories, batches, rng, what: str) -> None:
    """A decode pass of each batch of sequences in `batches`, a random token each; every row's
    logits against transformers (`ref`) on the sequence's history, which the token extends."""
    import torch

    for seqs in batches:
        tokens = rng.integers(3, runner.vocab_size, len(seqs)).tolist()
        rows = runner.decode(seqs, tokens)
        for seq, token, row in zip(seqs, tokens, rows, strict=True):
            history = histories[seq]
            history.append(token)
            with torch.no_grad():
                expect = ref(torch.tensor([history])).logits[0, -1].numpy()
            err = float(np.abs(row - expect).max() / np.abs(expect).max())
            print(f"{what}: decode of sequence {seq} at {len(history)}: max rel err {err:.2e}")
            assert err <= FP16_BOUND


def test_forked_sequences_on_kilns_decode_kernel_match_transformers(attention_model):
    """Decode of sequences forked from a prefilled one (the prefix cache's way): the cache
    attends to each depth of its block tree apart (the shared block, then a child's own pages),
    the decode kernel on each, and merges them by their lse. A fork on a page boundary and one
    inside a page (the child's copy of that page), decoded together, alone and with their
    parent, each row against transformers' logits."""
    import transformers

    ckpt, art = attention_model("llama-hd128")
    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype="float32").eval()
    runner = Runner(art, "cuda", max_batch_size=4, kv_tokens=1024)
    rng = np.random.default_rng(8)
    prompt = [1, *rng.integers(3, runner.vocab_size, 99).tolist()]
    runner.kv.add(0)
    runner.prefill([0], [prompt])
    histories = {0: prompt}
    for child, at in ((1, 96), (2, 71)):  # page size 16: a boundary, then 7 tokens into a page
        runner.kv.fork(0, child, at)
        histories[child] = prompt[:at]
    check_decodes(runner, ref, histories, [[1, 2], [1, 2], [2], [0, 1, 2], [1]], rng, "forked")


def test_whole_step_graphs_on_kilns_decode_attention(attention_model):
    """kiln.runtime.step_graph where Kiln's decode attention runs (head_dim 128): its split
    scratch, grown by a page count's uncaptured first step, serves the captured ones."""
    _, art = attention_model("llama-hd128")
    check_step_graphs(art, [1, *np.random.default_rng(4).integers(3, 320, 44).tolist()])
