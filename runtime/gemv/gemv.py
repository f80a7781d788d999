"""Kiln's decode GEMV externs for CUDA artifacts: built from gemv.cu, cached, loaded.

TVM's GEMV schedules read an int4 weight at 40-65% of an H100's copy bandwidth (bench/gemv.py);
these kernels read it with 16-byte loads, dequantize on the ALUs with the magic-number trick and
multiply on the tensor cores (fp32 sums). Destination-passing functions, outputs last:

- `kiln.gemv.q4(x, qweight, scale, out)`: x (..., K) float16 with M rows (the product of its
  leading dimensions; a kernel takes 8, a batched decode's more run 8 at a time), the q4f16
  weight qweight (N, K / 8) uint32 and scale (N, K / 32) float16, out (..., N) float16 =
  x @ W^T.
- `kiln.gemv.q4_swiglu(x, qweight, scale, out)`: the MLP's gate and up projections in one
  weight of 2 I rows (gate first); out (..., I) = silu(x @ gate^T) * (x @ up^T).
- `kiln.gemv.f16_swiglu(x, w, out)`: the same with a float16 weight w (2 I, K).
- `kiln.gemv.q4_batched(x, qweight, scale, out, w)`: `q4` for a batched decode, with `w` (N, K)
  float16 scratch the caller provides: up to 8 rows of x, the GEMV; 9 to 64, one kernel that
  reads the weight once for all of them (a tensor-core GEMM with the dequantize in its main
  loop; its K splits add up in `w`; on Hopper, Q4Wgmma on the warpgroup MMAs, its splits a
  cluster's blocks adding up in shared memory, up to 128 rows in one kernel); more, the weight
  dequantized into `w` and multiplied on `kiln.cublas.matmul`
  (kiln.runtime.cublas, which must be loaded).
- `kiln.gemv.q4_moe_swiglu(x, gate, qweight_0, scale_0, ..., qweight_E-1, scale_E-1, out)` and
  `kiln.gemv.q4_moe(h, gate, qweight_0, scale_0, ..., out)`: a mixture of E experts' MLP for up
  to 8 rows of x, reading only the experts some row is routed to. gate (..., E) float16 holds
  each row's weight per expert (0: not routed); q4_moe_swiglu writes h (E, ..., I), expert e's
  SwiGLU at e (not written where no row is routed to e); q4_moe writes out (..., N) = sum over
  e of gate[..., e] * (h[e] @ down_e^T), the sum in float32.
- `kiln.gemv.moe_route(x, gate, top_k, out)`: the mixture's router, the `gate` above from x
  (..., K) float16 and the router's weight gate (E, K) float16: out (..., E) = softmax(x @
  gate^T) (fp32, the logits rounded to fp16 first) at each row's top_k experts (ties to the lower
  index), renormalized to sum to one over them, 0 elsewhere.
- `kiln.gemv.add_rms_norm(x, r, w, epsilon, s, y)`: a transformer block's residual add and the
  RMSNorm of its sum (kiln.passes.fuse_add_rms_norm), x, r, s, y (..., H) float16, w (H,):
  s = x + r (fp16), y = rms_norm(s) * w (fp32 from s on, rounded once), one read of x and r.

K must be a multiple of 32; gemv.cu says how the kernels work and what they round.
(For benchmarks: `kiln.gemv.q4_tiled(variant, ...)` and `q4_swiglu_tiled(variant, ...)` run
one of the kernels' variants, `q4_default_variant(rows, K, swiglu)` names the default's, and
`q4_graph_time(...)` times one in a CUDA graph; gemv.cu's kVariants lists them.
`q4_gemm(x, qweight, scale, out, w)` runs q4_batched's 9-to-64-row kernel for any rows,
`q4_gemm_mma(...)` its mma.sync form (what runs off Hopper), `q4_gemm_wgmma(device)` says
whether q4_gemm takes the warpgroup MMAs there, `q4_gemm_splits(splits, ...)` runs those with
K split over a cluster of that many blocks, `q4_gemm_plan(m, N, K, device)` says how many
q4_gemm takes, and `q4_dequantize(qweight, scale, w)` is the dequantize: bench/q4_batched.py
times each way.)

The library is device code, so it is built with nvcc, as Kiln's prefill attention is
(kiln.runtime.attention; kiln.runtime.native finds nvcc and builds both alike), for the
artifact's archs, against tvm-ffi's headers, and cached under $KILN_CACHE/gemv (default
~/.cache/kiln/gemv) by a hash of what went into it. An artifact carries its copy as
ARTIFACT_FILE; `load_gemv()` takes that copy, or builds the library here (or takes it from the
cache). `python -m kiln.runtime.gemv --arch sm_90` builds it into the cache and prints its path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import tvm_ffi

from kiln.runtime import native
from kiln.runtime.errors import KilnError
from kiln.runtime.native import find_nvcc
from kiln.runtime.package import cache_root

SOURCE = Path(__file__).resolve().parent / "gemv.cu"
SOURCES = (SOURCE, native.CUDA_EXTERN_HEADER)
WHAT = "Kiln's decode GEMV kernels"
Q4 = "kiln.gemv.q4"
Q4_SWIGLU = "kiln.gemv.q4_swiglu"
F16_SWIGLU = "kiln.gemv.f16_swiglu"
Q4_BATCHED = "kiln.gemv.q4_batched"
Q4_MOE_SWIGLU = "kiln.gemv.q4_moe_swiglu"
Q4_MOE = "kiln.gemv.q4_moe"
MOE_ROUTE = "kiln.gemv.moe_route"
ADD_RMS_NORM = "kiln.gemv.add_rms_norm"
FUNCTIONS = (
    Q4, Q4_SWIGLU, F16_SWIGLU, Q4_BATCHED, Q4_MOE_SWIGLU, Q4_MOE, MOE_ROUTE, ADD_RMS_NORM
)  # fmt: skip
MAX_NORM_HIDDEN = 16384  # add_rms_norm's rows (gemv.cu: 8 kNormThreads kNormPieces)
ARTIFACT_FILE = "kiln-gemv.so"  # the built extern, inside an artifact compiled on its platform
MAX_ROWS = 8  # of x: the MMA's N
MAX_EXPERTS = 16  # of the mixture externs (gemv.cu's kMaxExperts)
MIN_SM = 80  # mma.sync m16n8k16 with fp32 accumulators
DEFAULT_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
INSTALL_NVCC = native.INSTALL_CUDA


def supports(archs: Sequence[str]) -> bool:
    """Whether the kernels run on every one of `archs` ("sm_80", ...): sm_80 and newer."""
    return native.archs_at_least(archs, MIN_SM)


def _checked_archs(archs: Sequence[str] | None) -> list[str]:
    archs = list(archs or DEFAULT_ARCHS)
    if not supports(archs):
        raise KilnError(
            f"{WHAT} run on sm_{MIN_SM} and newer GPUs, not on {','.join(archs)}: artifacts for "
            "them use TVM's GEMVs"
        )
    return sorted(set(archs))


def build_flags(archs: Sequence[str]) -> tuple[list[str], list[str]]:
    """The archs and defines the library is compiled with: sm_90 becomes sm_90a (SASS that every
    compute capability 9.0 GPU runs), and then gemv.cu's batched q4 may take Hopper's warpgroup
    MMAs (KILN_GEMV_WGMMA: Q4Wgmma)."""
    built = sorted({"sm_90a" if a == "sm_90" else a for a in archs})
    return built, ["KILN_GEMV_WGMMA"] if "sm_90a" in built else []


def library_key(archs: Sequence[str]) -> str:
    """What the library depends on: its source, the archs and the tvm-ffi it links against;
    never a path, nor the nvcc (a machine without one finds the library built elsewhere)."""
    return native.source_key(SOURCES, native.nvcc_flags(*build_flags(archs)))


def library_path(archs: Sequence[str] | None = None) -> Path:
    archs = _checked_archs(archs)
    return cache_root() / "gemv" / f"kiln_gemv-{library_key(archs)}.so"


def build(archs: Sequence[str] | None = None, force: bool = False) -> Path:
    """Compile gemv.cu for `archs` (default: sm_80, 86, 89, 90) into the cache (once per key)
    and return the library's path."""
    archs = _checked_archs(archs)
    out = library_path(archs)
    if out.is_file() and not force:
        return out
    nvcc = find_nvcc()
    if nvcc is None:
        raise KilnError(f"building {WHAT} needs nvcc, found none: {INSTALL_NVCC}")
    built, defines = build_flags(archs)
    command = native.nvcc_command(nvcc, built, SOURCE, WHAT, defines)
    return native.compile_library(out, command, WHAT)


def load_gemv(library: Path | None = None, archs: Sequence[str] | None = None) -> None:
    """Register `kiln.gemv.*` (all three: one library) in this process (once). `library`: the
    library built already (an artifact's copy); otherwise it is built here for `archs`, or
    taken from the cache."""
    if tvm_ffi.get_global_func(Q4, allow_missing=True) is not None:
        return
    if library is None:
        try:
            library = build(archs)
        except KilnError as e:
            raise KilnError(
                f"{e}\nOr build it on a machine that can (python -m kiln.runtime.gemv "
                f"--arch {','.join(archs or DEFAULT_ARCHS)}) and copy {cache_root() / 'gemv'}"
                " here (or point KILN_CACHE at a copy)"
            ) from None
    native.load_library(library, WHAT)
