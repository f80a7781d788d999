"""Kiln's attention externs for CUDA artifacts (kiln.runtime.attention.attention)."""

from kiln.runtime.attention.attention import (
    ARTIFACT_FILE,
    DECODE_PAGED,
    DTYPES,
    FUNCTIONS,
    HEAD_DIMS,
    INSTALL_NVCC,
    PREFILL_PAGED,
    PREFILL_RAGGED,
    build,
    find_nvcc,
    load_attention,
    supports,
)

__all__ = [
    "ARTIFACT_FILE",
    "DECODE_PAGED",
    "DTYPES",
    "FUNCTIONS",
    "HEAD_DIMS",
    "INSTALL_NVCC",
    "PREFILL_PAGED",
    "PREFILL_RAGGED",
    "build",
    "find_nvcc",
    "load_attention",
    "supports",
]
