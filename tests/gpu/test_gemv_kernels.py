"""Kiln's decode GEMV kernels (`kiln.gemv.q4`, `q4_swiglu`, `f16_swiglu`) on a real GPU, against
float64 NumPy references of the weights they read: q4 with 1 and 4 rows of x on the Llama-2-7B
shapes (12288 x 4096, 4096 x 11008) and an odd one (100 x 96); the SwiGLU forms at I = 11008,
K = 4096 and at small odd I (K with and without a partial last super-step, scales read one by
one or eight at a time, warps with one to three super-steps); each int4 form's default and every
variant (kiln.gemv.q4_tiled, q4_swiglu_tiled: 16 or 32 weight rows a block, with and without
prefetching), and in a CUDA graph (kiln.gemv.q4_graph_time); 8 rows of x, and 9 to 64 (a
kernel per 8); the batched decode's q4 (kiln.gemv.q4_batched) and its kernel for 9 to 64 rows
(kiln.gemv.q4_gemm); a mixture of experts' MLP reading only the routed experts
(kiln.gemv.q4_moe_swiglu, q4_moe) and its router (kiln.gemv.moe_route); the residual add with
its RMSNorm (kiln.gemv.add_rms_norm); arguments they refuse; and TVM's current stream.

Random data as a decode step sees it: x ~ N(0, 1), q4 scales ~ U(0.001, 0.02), nibbles uniform,
f16 weights ~ N(0, 1 / K) (so that the gate's silu is not saturated).

Tolerance: max |kernel - reference| / max |reference| <= 2e-3. The sums are fp32 (tensor cores),
so the error is the result's one rounding to fp16 (at most 2^-11 of a value, 4.9e-4 of the
largest) plus, for q4, each weight's rounding to fp16 as it enters the MMA ((nib - 8) * scale,
relative 2^-11 at most, independent from weight to weight: ~1e-4 of the largest result over K
terms; 3.7e-4 in all on 512 x 4096 in NumPy). 2e-3 leaves room for fp32 rounding but catches a
wrong nibble, scale or row (errors of order 1) and fp16 sums over K (9e-3 there).

The library comes from KILN_GPU_ARTIFACTS (tests/gpu/build_artifacts.py --gemv-only writes it),
so the GPU machine needs only the TVM runtime; without it, it is built here (nvcc).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tvm
import tvm_ffi
from moe_reference import route_reference

from kiln.runtime import cublas
from kiln.runtime.cublas import load_cublas
from kiln.runtime.device import open_device
from kiln.runtime.gemv import (
    ADD_RMS_NORM,
    ARTIFACT_FILE,
    F16_SWIGLU,
    MOE_ROUTE,
    Q4,
    Q4_BATCHED,
    Q4_MOE,
    Q4_MOE_SWIGLU,
    Q4_SWIGLU,
    load_gemv,
)

pytestmark = pytest.mark.gpu

TOL = 2e-3  # see the module docstring
VARIANTS = (1, 2, 3, 4)  # gemv.cu's kVariants: 16 or 32 weight rows a block, +2: prefetching


@pytest.fixture(scope="module")
def dev():
    device = open_device("cuda:0")  # TVM's CUDA runtime before the extern (it shares libcudart)
    prebuilt = os.environ.get("KILN_GPU_ARTIFACTS")
    library = Path(prebuilt) / ARTIFACT_FILE if prebuilt else None
    if library is not None and not library.is_file():
        pytest.fail(f"{library} is missing: run tests/gpu/build_artifacts.py again")
    load_gemv(library)
    # kiln.gemv.q4_batched's GEMM path calls the cuBLAS extern
    load_cublas(Path(prebuilt) / cublas.ARTIFACT_FILE if prebuilt else None)
    return device


def q4_weight(rng, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(qweight (n, k / 8) uint32, scale (n, k / 32) float16): uniform nibbles."""
    qweight = rng.integers(0, 2**32, (n, k // 8), dtype=np.uint32)
    scale = rng.uniform(0.001, 0.02, (n, k // 32)).astype(np.float16)
    return qweight, scale


def dequantize(qweight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(n, k) float64: (nib - 8) * scale, eight nibbles a word, lowest first."""
    shifts = np.arange(8, dtype=np.uint32) * 4
    nibbles = ((qweight[..., None] >> shifts) & 0xF).reshape(len(qweight), -1)
    return (nibbles - 8.0) * np.repeat(scale.astype(np.float64), 32, axis=1)


def swiglu(y: np.ndarray) -> np.ndarray:
    """(..., 2 I) gate then up -> (..., I) silu(gate) * up."""
    a, b = np.split(y, 2, axis=-1)
    return a / (1 + np.exp(-a)) * b


def error(got, want: np.ndarray) -> float:
    got = got.numpy().astype(np.float64)
    assert got.shape == want.shape and np.isfinite(got).all()
    return float(np.abs(got - want).max() / np.abs(want).max())


def run(dev, fn, x: np.ndarray, weights: list[np.ndarray], n: int, lead=()):
    """fn(x, *weights, out) on the device; out (x's leading dims, n) float16."""
    out = tvm.runtime.empty((*x.shape[:-1], n), "float16", dev)
    fn(*lead, *(tvm.runtime.tensor(a, dev) for a in (x, *weights)), out)
    return out


# (x's leading dimensions, rows N, K): Llama-2-7B's qkv and down projections, an odd one
Q4_CASES = [((m,), n, k) for m in (1, 4) for n, k in [(12288, 4096), (4096, 11008), (100, 96)]]


@pytest.mark.parametrize("lead,n,k", Q4_CASES)
def test_q4_equals_float64(dev, lead, n, k):
    rng = np.random.default_rng(n + k + lead[0])
    x = rng.standard_normal((*lead, k)).astype(np.float16)
    qweight, scale = q4_weight(rng, n, k)
    want = x.astype(np.float64) @ dequantize(qweight, scale).T
    assert error(run(dev, tvm_ffi.get_global_func(Q4), x, [qweight, scale], n), want) <= TOL
    tiled = tvm_ffi.get_global_func("kiln.gemv.q4_tiled")
    for variant in VARIANTS:
        got = run(dev, tiled, x, [qweight, scale], n, lead=(variant,))
        assert error(got, want) <= TOL, variant


# (x's leading dimensions, I, K): I = 11008 (Llama-2-7B's MLP), odd I; K of 3, 25 and 136 groups
# (q4: 8 scales a load needs a multiple of 8 groups; a super-step is 16)
SWIGLU_CASES = [
    ((1,), 11008, 4096),
    ((4,), 11008, 4096),
    ((1,), 37, 96),
    ((2, 2), 37, 800),
    ((4,), 21, 4352),
    ((8,), 5, 4096),
    ((2, 4), 33, 1120),
    ((2,), 45, 9472),  # 296 groups: warps 0-2 take three super-steps, the last one partial
]


@pytest.mark.parametrize("lead,inter,k", SWIGLU_CASES)
def test_q4_swiglu_equals_float64(dev, lead, inter, k):
    rng = np.random.default_rng(inter + k + lead[0])
    x = rng.standard_normal((*lead, k)).astype(np.float16)
    qweight, scale = q4_weight(rng, 2 * inter, k)
    want = swiglu(x.astype(np.float64) @ dequantize(qweight, scale).T)
    got = run(dev, tvm_ffi.get_global_func(Q4_SWIGLU), x, [qweight, scale], inter)
    assert error(got, want) <= TOL
    tiled = tvm_ffi.get_global_func("kiln.gemv.q4_swiglu_tiled")
    for variant in VARIANTS:  # 8 or 16 outputs a block, with and without prefetching
        got = run(dev, tiled, x, [qweight, scale], inter, lead=(variant,))
        assert error(got, want) <= TOL, variant


# One row of x takes F16SwiGLURow (a warp a weight row): K of 100 and 1184 pieces of 16 bytes
# (partial rounds of the lanes' loads), the smallest K, and one output (the other warps' rows
# clamped and dropped)
F16_ROW_CASES = [((1,), 37, 800), ((1, 1), 45, 9472), ((1,), 5, 32), ((1,), 1, 4096)]


@pytest.mark.parametrize("lead,inter,k", SWIGLU_CASES + F16_ROW_CASES)
def test_f16_swiglu_equals_float64(dev, lead, inter, k):
    rng = np.random.default_rng(inter + k + lead[0] + 1)
    x = rng.standard_normal((*lead, k)).astype(np.float16)
    w = (rng.standard_normal((2 * inter, k)) / np.sqrt(k)).astype(np.float16)
    want = swiglu(x.astype(np.float64) @ w.astype(np.float64).T)
    got = run(dev, tvm_ffi.get_global_func(F16_SWIGLU), x, [w], inter)
    assert error(got, want) <= TOL


def test_q4_with_8_rows_and_an_odd_n(dev):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 4, 512)).astype(np.float16)
    qweight, scale = q4_weight(rng, 333, 512)
    want = x.astype(np.float64) @ dequantize(qweight, scale).T
    assert error(run(dev, tvm_ffi.get_global_func(Q4), x, [qweight, scale], 333), want) <= TOL


@pytest.mark.parametrize("lead", [(9,), (13,), (4, 16)])
def test_more_than_8_rows_run_8_at_a_time(dev, lead):
    """A batched decode's rows (one per sequence): a kernel per 8 of them, the last partial;
    q4 on Llama-2-7B's qkv, both SwiGLU forms on an odd I."""
    rng = np.random.default_rng(sum(lead))
    k, n, inter = 4096, 12288, 37
    x = rng.standard_normal((*lead, k)).astype(np.float16)
    qweight, scale = q4_weight(rng, n, k)
    want = x.astype(np.float64) @ dequantize(qweight, scale).T
    assert error(run(dev, tvm_ffi.get_global_func(Q4), x, [qweight, scale], n), want) <= TOL
    qweight, scale = q4_weight(rng, 2 * inter, k)
    want = swiglu(x.astype(np.float64) @ dequantize(qweight, scale).T)
    got = run(dev, tvm_ffi.get_global_func(Q4_SWIGLU), x, [qweight, scale], inter)
    assert error(got, want) <= TOL
    w = (rng.standard_normal((2 * inter, k)) / np.sqrt(k)).astype(np.float16)
    want = swiglu(x.astype(np.float64) @ w.astype(np.float64).T)
    assert error(run(dev, tvm_ffi.get_global_func(F16_SWIGLU), x, [w], inter), want) <= TOL


def run_scratch(dev, fn, x: np.ndarray, qweight: np.ndarray, scale: np.ndarray):
    """fn(x, qweight, scale, out, w) with w (N, K) float16 scratch: q4_batched, q4_gemm."""
    n, k = len(qweight), x.shape[-1]
    out = tvm.runtime.empty((*x.shape[:-1], n), "float16", dev)
    scratch = tvm.runtime.empty((n, k), "float16", dev)
    fn(*(tvm.runtime.tensor(a, dev) for a in (x, qweight, scale)), out, scratch)
    return out


@pytest.mark.parametrize("lead", [(5,), (12,), (17,), (64,), (2, 40), (100,), (130,)])
def test_q4_batched_equals_float64(dev, lead):
    """The batched decode's q4: up to 8 rows the GEMV, up to 64 kiln.gemv.q4_gemm (128 where it
    runs on the warpgroup MMAs, 65 to 128 in one kernel of two warpgroups a block), more the
    dequantized weight (written into the scratch it is given) and cuBLAS; Llama-2-7B's qkv and
    an odd shape."""
    rng = np.random.default_rng(sum(lead) + 5)
    batched = tvm_ffi.get_global_func(Q4_BATCHED)
    for n, k in [(12288, 4096), (100, 96)]:
        x = rng.standard_normal((*lead, k)).astype(np.float16)
        qweight, scale = q4_weight(rng, n, k)
        want = x.astype(np.float64) @ dequantize(qweight, scale).T
        assert error(run_scratch(dev, batched, x, qweight, scale), want) <= TOL, (lead, n, k)


# (rows of x, N, K): Llama-2-7B's o (K split over many blocks), down and qkv; N not a multiple of
# a block's 256 rows, or of 4 (the splits added one output a thread), K with a partial last
# sub-step of 128 (4128 = 32 x 129), K of one group
GEMM_CASES = [(m, 4096, 4096) for m in (9, 16, 24, 33, 64)] + [
    (40, 4096, 11008),
    (64, 12288, 4096),
    (33, 4094, 4096),
    (17, 300, 4128),
    (64, 1000, 4128),
    (70, 100, 32),
    (128, 4096, 4096),
    (200, 520, 256),
]


@pytest.mark.parametrize("entry", ["q4_gemm", "q4_gemm_mma"])
@pytest.mark.parametrize("m,n,k", GEMM_CASES)
def test_q4_gemm_equals_float64(dev, m, n, k, entry):
    """kiln.gemv.q4_gemm, the batched decode's kernel for 9 to 64 rows: 16, 32 or 64 rows of x a
    kernel (any more, as here: a kernel per 64, each reading the weight), K split over blocks
    whose sums meet in the scratch; run twice: the splits' counters must be back at zero. On a
    compute capability 9.0 GPU it runs on the warpgroup MMAs where K % 128 == 0; q4_gemm_mma is
    the mma.sync kernel, which runs everywhere else."""
    rng = np.random.default_rng(m + n + k)
    gemm = tvm_ffi.get_global_func(f"kiln.gemv.{entry}")
    x = rng.standard_normal((m, k)).astype(np.float16)
    qweight, scale = q4_weight(rng, n, k)
    want = x.astype(np.float64) @ dequantize(qweight, scale).T
    first = run_scratch(dev, gemm, x, qweight, scale)
    assert error(first, want) <= TOL, (m, n, k)
    np.testing.assert_array_equal(run_scratch(dev, gemm, x, qweight, scale).numpy(), first.numpy())


@pytest.mark.parametrize("m", [40, 100])
@pytest.mark.parametrize("splits", range(1, 9))
def test_q4_wgmma_splits_meet_in_the_cluster(dev, splits, m):
    """Q4Wgmma with K split over 1 to 8 blocks of a cluster, each count forced (the rule picks
    only some for the shapes above): the splits' sums, added through distributed shared memory,
    equal float64. 40 rows of x (kN = 64, 24 of them padding; blocks of 256 weight rows) and 100
    (kN = 128, 28 of them padding; blocks of 128), N not a multiple of 4 (the last column's sums
    written one at a time), and K of 86 sub-steps (uneven splits)."""
    if not tvm_ffi.get_global_func("kiln.gemv.q4_gemm_wgmma")(dev.index):
        pytest.skip("Q4Wgmma runs on compute capability 9.0 GPUs")
    rng = np.random.default_rng(splits + m)
    n, k = 1002, 11008
    x = rng.standard_normal((m, k)).astype(np.float16)
    qweight, scale = q4_weight(rng, n, k)
    want = x.astype(np.float64) @ dequantize(qweight, scale).T
    forced = tvm_ffi.get_global_func("kiln.gemv.q4_gemm_splits")

    def fn(*args):
        forced(splits, *args)

    assert error(run_scratch(dev, fn, x, qweight, scale), want) <= TOL, (splits, m)


def test_q4_gemm_takes_the_warpgroup_mmas_on_hopper(dev):
    """The library is built for sm_90a wherever it is for sm_90 (kiln.runtime.gemv.build_flags),
    so on a compute capability 9.0 GPU q4_gemm must run Q4Wgmma (what the test above checks
    there), and nowhere else."""
    hopper = dev.compute_version == "9.0"
    assert tvm_ffi.get_global_func("kiln.gemv.q4_gemm_wgmma")(dev.index) == hopper


def test_q4_dequantize_is_the_fp16_weight(dev):
    """What the GEMM path multiplies by: (nib - 8) * scale rounded to fp16 once, bit for bit
    as NumPy's fp16 product."""
    rng = np.random.default_rng(6)
    qweight, scale = q4_weight(rng, 48, 256)
    w = tvm.runtime.empty((48, 256), "float16", dev)
    tvm_ffi.get_global_func("kiln.gemv.q4_dequantize")(
        tvm.runtime.tensor(qweight, dev), tvm.runtime.tensor(scale, dev), w
    )
    shifts = np.arange(8, dtype=np.uint32) * 4
    nibbles = ((qweight[..., None] >> shifts) & 0xF).reshape(48, -1).astype(np.int32) - 8
    want = nibbles.astype(np.float16) * np.repeat(scale, 32, axis=1)
    np.testing.assert_array_equal(w.numpy(), want)


def test_default_variant_is_one_of_them(dev):
    pick = tvm_ffi.get_global_func("kiln.gemv.q4_default_variant")
    for rows, k, swiglu in [(4096, 4096, False), (4096, 11008, False), (11008, 4096, True)]:
        assert pick(rows, k, swiglu) in VARIANTS


@pytest.mark.parametrize("gated", [False, True])
def test_graph_time_runs_the_kernels(dev, gated):
    """kiln.gemv.q4_graph_time (bench/gemv.py), q4 and (gated) q4 SwiGLU: a CUDA graph of the
    kernel over weight copies returns a time, and its last launch (copy (reps - 1) % copies)
    leaves that copy's result."""
    graph_time = tvm_ffi.get_global_func("kiln.gemv.q4_graph_time")
    rng = np.random.default_rng(11)
    n, k = 512, 4096
    x = rng.standard_normal((1, k)).astype(np.float16)
    weights = [q4_weight(rng, n, k) for _ in range(3)]
    qweight, scale = weights[(5 - 1) % 3]
    want = x.astype(np.float64) @ dequantize(qweight, scale).T
    if gated:
        want = swiglu(want)
    for variant in (0, *VARIANTS):
        out = tvm.runtime.empty((1, n // 2 if gated else n), "float16", dev)
        on = [[tvm.runtime.tensor(a, dev) for a in w] for w in weights]
        us = graph_time(variant, gated, tvm.runtime.tensor(x, dev), [q for q, _ in on],
                        [s for _, s in on], out, 5)  # fmt: skip
        assert 0 < us < 1e4
        assert error(out, want) <= TOL, variant


# (x's leading dimensions, experts, routed per row, I, K): Mixtral-8x7B's shape at batch 1, a
# few rows, I and K of partial super-steps, one expert; an odd row takes the row before's
# experts, so that with 3 rows or fewer some experts have none
MOE_CASES = [
    ((1, 1), 8, 2, 14336, 4096),
    ((3,), 8, 2, 512, 1024),
    ((8,), 4, 2, 224, 96),
    ((2,), 1, 1, 64, 800),
    ((2,), 6, 2, 160, 4352),
]


@pytest.mark.parametrize("lead,experts,top,inter,k", MOE_CASES)
def test_q4_moe_equals_float64(dev, lead, experts, top, inter, k):
    """h = q4_moe_swiglu(x, gate, gate_up_e...), out = q4_moe(h, gate, down_e...) against the
    dense mixture in float64: sum over e of gate[m, e] * (swiglu(x @ gate_up_e^T) @ down_e^T).
    h starts as NaN: the experts no row is routed to must stay unwritten and unread."""
    rng = np.random.default_rng(experts + inter + k)
    rows = int(np.prod(lead))
    x = rng.standard_normal((*lead, k)).astype(np.float16)
    gate = np.zeros((rows, experts))
    for m in range(rows):
        if m % 2 == 0:  # an odd row takes the row before's experts: some experts get no row
            chosen = rng.choice(experts, top, replace=False)
        gate[m, chosen] = rng.dirichlet(np.ones(top))
    gate = gate.astype(np.float16)
    routed = np.flatnonzero((gate != 0).any(axis=0))
    gate_up = [q4_weight(rng, 2 * inter, k) for _ in range(experts)]
    down = [q4_weight(rng, k, inter) for _ in range(experts)]
    x64 = x.reshape(rows, k).astype(np.float64)
    hidden = {e: swiglu(x64 @ dequantize(*gate_up[e]).T) for e in routed}
    # the down reads h as the kernel rounded it, fp16
    want = sum(
        gate[:, e, None].astype(np.float64)
        * (hidden[e].astype(np.float16).astype(np.float64) @ dequantize(*down[e]).T)
        for e in routed
    )

    def on(a):
        return tvm.runtime.tensor(a, dev)

    h = on(np.full((experts, *lead, inter), np.nan, np.float16))
    gate_dev = on(gate.reshape(*lead, experts))
    tvm_ffi.get_global_func(Q4_MOE_SWIGLU)(on(x), gate_dev, *(on(a) for w in gate_up for a in w), h)
    got_h = h.numpy().reshape(experts, rows, inter)
    for e in range(experts):
        if e in hidden:
            assert error(on(got_h[e]), hidden[e]) <= TOL, e
        else:
            assert np.isnan(got_h[e]).all(), e
    out = tvm.runtime.empty((*lead, k), "float16", dev)
    tvm_ffi.get_global_func(Q4_MOE)(h, gate_dev, *(on(a) for w in down for a in w), out)
    assert error(out, want.reshape(*lead, k)) <= TOL


def test_q4_moe_refuses_wrong_arguments(dev):
    moe = tvm_ffi.get_global_func(Q4_MOE)
    swiglu_moe = tvm_ffi.get_global_func(Q4_MOE_SWIGLU)

    def on_gpu(shape, dtype="float16"):
        return tvm.runtime.tensor(np.zeros(shape, dtype), dev)

    w, s = on_gpu((64, 8), "uint32"), on_gpu((64, 2))
    with pytest.raises(ValueError, match=r"takes \(x, gate, qweight_0, scale_0, ..., out\)"):
        moe(on_gpu((2, 1, 64)), on_gpu((1, 2)), w, s, w, on_gpu((1, 64)))
    with pytest.raises(ValueError, match="gate must be"):
        moe(on_gpu((2, 1, 64)), on_gpu((1, 3)), w, s, w, s, on_gpu((1, 64)))
    with pytest.raises(ValueError, match="takes 1 to 8 rows of x, not 9"):
        swiglu_moe(on_gpu((9, 64)), on_gpu((9, 1)), w, s, on_gpu((1, 9, 32)))
    with pytest.raises(ValueError, match="expert 1's qweight must be"):
        moe(on_gpu((2, 1, 64)), on_gpu((1, 2)), w, s, on_gpu((32, 8), "uint32"), s,
            on_gpu((1, 64)))  # fmt: skip


def route(dev, x: np.ndarray, gate: np.ndarray, top_k: int) -> np.ndarray:
    out = tvm.runtime.empty((*x.shape[:-1], len(gate)), "float16", dev)
    on = [tvm.runtime.tensor(a, dev) for a in (x, gate)]
    tvm_ffi.get_global_func(MOE_ROUTE)(*on, top_k, out)
    return out.numpy().astype(np.float64)


# (x's leading dimensions, experts, top k, K): Mixtral's, rows up to 8, 16 experts, odd counts
ROUTE_CASES = [
    ((1, 1), 8, 2, 4096),
    ((3,), 8, 2, 4096),
    ((8,), 16, 4, 1024),
    ((2,), 6, 1, 4352),
    ((1,), 1, 1, 96),
    ((5,), 3, 3, 64),
]


@pytest.mark.parametrize("lead,experts,top,k", ROUTE_CASES)
def test_moe_route_equals_the_router(dev, lead, experts, top, k):
    rng = np.random.default_rng(experts * k + top)
    x = rng.standard_normal((*lead, k)).astype(np.float16)
    gate = rng.normal(0, 2 / np.sqrt(k), (experts, k)).astype(np.float16)  # logits ~ N(0, 4)
    got, want = route(dev, x, gate, top), route_reference(x, gate, top)
    assert np.isfinite(got).all()
    assert ((got != 0) == (want != 0)).all()  # the same experts chosen in every row
    assert (np.count_nonzero(got, axis=-1) == top).all()
    np.testing.assert_allclose(got, want, atol=5e-3)


def test_moe_route_breaks_ties_to_the_lower_index(dev):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 256)).astype(np.float16)
    gate = rng.normal(0, 0.01, (8, 256)).astype(np.float16)
    gate[5] = gate[2] = 4 * np.sign(x[0]) / 256  # experts 2 and 5: equal, and the largest
    top1, top2 = route(dev, x, gate, 1), route(dev, x, gate, 2)
    assert np.flatnonzero(top1[0]).tolist() == [2] and top1[0, 2] == 1
    assert np.flatnonzero(top2[0]).tolist() == [2, 5]
    np.testing.assert_allclose(top2, route_reference(x, gate, 2), atol=5e-3)


def test_moe_route_refuses_wrong_arguments(dev):
    fn = tvm_ffi.get_global_func(MOE_ROUTE)

    def on_gpu(shape, dtype="float16"):
        return tvm.runtime.tensor(np.zeros(shape, dtype), dev)

    with pytest.raises(ValueError, match=r"gate must be \(E, K\) with x's K = 64"):
        fn(on_gpu((1, 64)), on_gpu((8, 32)), 2, on_gpu((1, 8)))
    with pytest.raises(ValueError, match=r"E = 1 \.\. 16"):
        fn(on_gpu((1, 64)), on_gpu((17, 64)), 2, on_gpu((1, 17)))
    with pytest.raises(ValueError, match=r"top_k is 9; it must be 1 \.\. 8"):
        fn(on_gpu((1, 64)), on_gpu((8, 64)), 9, on_gpu((1, 8)))
    with pytest.raises(ValueError, match="out must be shaped as x"):
        fn(on_gpu((1, 64)), on_gpu((8, 64)), 2, on_gpu((1, 4)))


def test_refuses_wrong_arguments(dev):
    q4 = tvm_ffi.get_global_func(Q4)
    f16 = tvm_ffi.get_global_func(F16_SWIGLU)

    def on_gpu(shape, dtype="float16"):
        return tvm.runtime.tensor(np.zeros(shape, dtype), dev)

    w, s, out = on_gpu((64, 8), "uint32"), on_gpu((64, 2)), on_gpu((1, 64))
    with pytest.raises(TypeError, match="x must be float16"):
        q4(on_gpu((1, 64), "float32"), w, s, out)
    with pytest.raises(TypeError, match="qweight must be uint32"):
        q4(on_gpu((1, 64)), on_gpu((64, 8), "int32"), s, out)
    with pytest.raises(TypeError, match="scale must be float16"):
        q4(on_gpu((1, 64)), w, on_gpu((64, 2), "float32"), out)
    with pytest.raises(ValueError, match="must be a positive multiple of 32"):
        q4(on_gpu((1, 48)), on_gpu((64, 6), "uint32"), on_gpu((64, 1)), out)
    with pytest.raises(ValueError, match=r"takes 1 to 2\^24 rows of x .* not 0"):
        q4(on_gpu((0, 64)), w, s, on_gpu((0, 64)))
    with pytest.raises(ValueError, match="out must be shaped as x"):
        q4(on_gpu((1, 64)), w, s, on_gpu((1, 32)))
    with pytest.raises(ValueError, match="w must be"):
        f16(on_gpu((1, 64)), on_gpu((64, 32)), on_gpu((1, 32)))
    with pytest.raises(ValueError, match="x must be on cuda:0"):
        q4(tvm.runtime.tensor(np.zeros((1, 64), "float16")), w, s, out)
    tiled = tvm_ffi.get_global_func("kiln.gemv.q4_tiled")
    with pytest.raises(ValueError, match=r"the variant must be 0 \(the default\) to 4, not 5"):
        tiled(5, on_gpu((1, 64)), w, s, out)


def test_runs_on_tvms_current_stream(dev):
    """On a torch stream set as TVM's current one, after a long kernel on that stream that
    writes x: run on any other stream, the GEMV would read x before it is written."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    rng = np.random.default_rng(5)
    inter, k = 4096, 4096
    src = torch.tensor(rng.standard_normal((1, k)), dtype=torch.float16, device="cuda")
    host_w = (rng.standard_normal((2 * inter, k)) / np.sqrt(k)).astype(np.float16)
    w = torch.tensor(host_w, device="cuda")
    x = torch.zeros_like(src)
    out = torch.zeros((1, inter), dtype=torch.float16, device="cuda")
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), tvm_ffi.use_torch_stream():
        torch.cuda._sleep(200_000_000)  # ~0.1 s of spinning on `stream`
        x.copy_(src)
        tvm_ffi.get_global_func(F16_SWIGLU)(x, w, out)
    stream.synchronize()
    want = swiglu(src.double().cpu().numpy() @ host_w.astype(np.float64).T)
    got = out.double().cpu().numpy()
    assert np.abs(got - want).max() / np.abs(want).max() <= TOL


# (shape of x, epsilon): a decode's row of Llama-2-7B and 64 of them, Mixtral's 5120 over two
# leading dimensions, the largest H, the smallest, one that leaves most threads without a piece
NORM_CASES = [((1, 1, 4096), 1e-5), ((64, 1, 4096), 1e-6), ((3, 5, 5120), 1e-5),
              ((2, 16384), 1e-5), ((1, 8), 1e-5), ((7, 96), 0.0)]  # fmt: skip


@pytest.mark.parametrize("shape,epsilon", NORM_CASES)
def test_add_rms_norm_equals_numpy(dev, shape, epsilon):
    """s = x + r rounded to fp16 (NumPy's fp16 add: the same bits), y against float64 from s."""
    rng = np.random.default_rng(shape[-1] + len(shape))
    x, r = (rng.normal(0, 2, shape).astype(np.float16) for _ in range(2))
    w = rng.normal(1, 0.5, shape[-1]).astype(np.float16)
    s, y = (tvm.runtime.empty(shape, "float16", dev) for _ in range(2))
    args = [tvm.runtime.tensor(a, dev) for a in (x, r, w)]
    tvm_ffi.get_global_func(ADD_RMS_NORM)(*args, epsilon, s, y)
    total = x + r
    np.testing.assert_array_equal(s.numpy(), total)
    f = total.astype(np.float64)
    want = f / np.sqrt((f * f).mean(-1, keepdims=True) + epsilon) * w.astype(np.float64)
    assert error(y, want) <= TOL
