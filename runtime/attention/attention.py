"""Kiln's attention externs for CUDA artifacts: built from attention.cu, cached, loaded.

TVM's paged KV cache runs a prefill chunk's attention with two TIR kernels on CUDA cores (~6
TFLOP/s on an H100): `batch_prefill_ragged_kv` (the chunk's queries against its own keys) and
`batch_prefill_paged_kv` (against the keys its sequences already have in the cache's pages), and
merges the two; a decode step's with `batch_decode_paged_kv`, one thread block per sequence and
KV head (a quarter of an H100's SMs for one 32-head sequence). CUDA artifacts whose cache is fp16
or bf16 with head_dim 64 or 128 get `kiln.attention.prefill_ragged` and
`kiln.attention.prefill_paged` (one tensor-core kernel, flash_prefill.cuh) and
`kiln.attention.decode_paged` (keys split over blocks, flash_decode.cuh) in their place
(kiln.passes.lower_paged_kv_cache; the target decides, kiln.targets.cuda), each with the same
arguments as the kernel it replaces, and list them in their manifest (`target.externs`).

The library is device code, so it is built with nvcc: $CUDA_HOME's, the one on PATH,
/usr/local/cuda's, or pip's (`nvidia-cuda-nvcc`, in the `cuda` extra), for the artifact's archs
(SASS for each, PTX for the newest), against tvm-ffi's headers. It is cached under
$KILN_CACHE/attention (default ~/.cache/kiln/attention) by a hash of what went into it.
`kiln compile` puts the built library into the artifact (ARTIFACT_FILE) when it compiles for its
own platform, and the runner loads that copy, so the machine that runs the artifact needs no
compiler; otherwise `load_attention()` builds it there (or takes it from the cache).
`python -m kiln.runtime.attention --arch sm_90` builds it into the cache and prints its path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import tvm_ffi

from kiln.runtime import native
from kiln.runtime.errors import KilnError
from kiln.runtime.native import find_nvcc
from kiln.runtime.package import cache_root

_HERE = Path(__file__).resolve().parent
SOURCE = _HERE / "attention.cu"
# the .cu includes the kernels' headers and the host helpers it shares with runtime/gemv
SOURCES = (
    SOURCE,
    _HERE / "flash_prefill.cuh",
    _HERE / "flash_decode.cuh",
    _HERE / "rope_append.cuh",
    native.CUDA_EXTERN_HEADER,
)
WHAT = "Kiln's attention kernels"
PREFILL_RAGGED = "kiln.attention.prefill_ragged"  # TVM's batch_prefill_ragged_kv contract
PREFILL_PAGED = "kiln.attention.prefill_paged"  # TVM's batch_prefill_paged_kv contract
DECODE_PAGED = "kiln.attention.decode_paged"  # TVM's batch_decode_paged_kv contract
# TVM's fused_rope and tir_kv_cache_transpose_append contracts, deferred into the next attention
# call (attention.cu): a decode pass's RoPE and append run inside the decode kernel
SPLIT_ROPE = "kiln.attention.split_rope"
APPEND_KV = "kiln.attention.append_kv"
FUNCTIONS = (PREFILL_RAGGED, PREFILL_PAGED, DECODE_PAGED, SPLIT_ROPE, APPEND_KV)
ARTIFACT_FILE = "kiln-attention.so"  # the built extern, inside an artifact compiled on its platform
DTYPES = ("float16", "bfloat16")
HEAD_DIMS = (64, 128)
MIN_SM = 80  # mma.sync on bf16 and cp.async
DEFAULT_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
INSTALL_NVCC = "install the CUDA toolkit (or set CUDA_HOME), or pip install 'kiln[cuda]'"


def supports(archs: Sequence[str]) -> bool:
    """Whether the kernel runs on every one of `archs` ("sm_80", ...): sm_80 and newer."""
    return native.archs_at_least(archs, MIN_SM)


def _checked_archs(archs: Sequence[str] | None) -> list[str]:
    archs = list(archs or DEFAULT_ARCHS)
    if not supports(archs):
        raise KilnError(
            f"{WHAT} run on sm_{MIN_SM} and newer GPUs, not on {','.join(archs)}: their "
            "artifacts use TVM's attention kernels there"
        )
    return sorted(set(archs))


def library_key(archs: Sequence[str]) -> str:
    """What the library depends on: its source, the archs and the tvm-ffi it links against;
    never a path, nor the nvcc (a machine without one finds the library built elsewhere)."""
    return native.source_key(SOURCES, native.nvcc_flags(archs))


def library_path(archs: Sequence[str] | None = None) -> Path:
    archs = _checked_archs(archs)
    return cache_root() / "attention" / f"kiln_attention-{library_key(archs)}.so"


def _need_nvcc() -> Path:
    nvcc = find_nvcc()
    if nvcc is None:
        raise KilnError(f"building {WHAT} needs nvcc, found none: {INSTALL_NVCC}")
    return nvcc


def build(archs: Sequence[str] | None = None, force: bool = False) -> Path:
    """Compile attention.cu for `archs` (default: sm_80, 86, 89, 90) into the cache (once
    per key) and return the library's path."""
    archs = _checked_archs(archs)
    out = library_path(archs)
    if out.is_file() and not force:
        return out
    cmd = native.nvcc_command(_need_nvcc(), archs, SOURCE, WHAT)
    return native.compile_library(out, cmd, WHAT)


def load_attention(library: Path | None = None, archs: Sequence[str] | None = None) -> None:
    """Register `kiln.attention.*` (every extern: one library) in this process (once).
    `library`: the library built already (an artifact's copy); otherwise it is built here for
    `archs`, or taken from the cache."""
    if tvm_ffi.get_global_func(PREFILL_RAGGED, allow_missing=True) is not None:
        return
    if library is None:
        try:
            library = build(archs)
        except KilnError as e:
            raise KilnError(
                f"{e}\nOr build it on a machine that can (python -m kiln.runtime.attention "
                f"--arch {','.join(archs or DEFAULT_ARCHS)}) and copy {cache_root() / 'attention'}"
                " here (or point KILN_CACHE at a copy)"
            ) from None
    native.load_library(library, WHAT)
