"""Kiln's attention externs for CUDA artifacts (kiln.runtime.attention.attention)."""

from kiln.runtime.attention.attention import (
    APPEND_KV,
    ARTIFACT_FILE,
    DECODE_PAGED,
    DTYPES,
    FUNCTIONS,
    HEAD_DIMS,
    INSTALL_NVCC,
    PREFILL_PAGED,
    PREFILL_RAGGED,
    SPLIT_ROPE,
    build,
    find_nvcc,
    load_attention,
    supports,
)

__all__ = [
    "APPEND_KV",
    "ARTIFACT_FILE",
    "DECODE_PAGED",
    "DTYPES",
    "FUNCTIONS",
    "HEAD_DIMS",
    "INSTALL_NVCC",
    "PREFILL_PAGED",
    "PREFILL_RAGGED",
    "SPLIT_ROPE",
    "build",
    "find_nvcc",
    "load_attention",
    "supports",
]
