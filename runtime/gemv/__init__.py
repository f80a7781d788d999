"""Kiln's decode GEMV externs for CUDA artifacts (kiln.runtime.gemv.gemv)."""

from kiln.runtime.gemv.gemv import (
    ARTIFACT_FILE,
    DEFAULT_ARCHS,
    F16_SWIGLU,
    FUNCTIONS,
    MAX_ROWS,
    MIN_SM,
    Q4,
    Q4_BATCHED,
    Q4_SWIGLU,
    build,
    library_key,
    library_path,
    load_gemv,
    supports,
)

__all__ = [
    "ARTIFACT_FILE",
    "DEFAULT_ARCHS",
    "F16_SWIGLU",
    "FUNCTIONS",
    "MAX_ROWS",
    "MIN_SM",
    "Q4",
    "Q4_BATCHED",
    "Q4_SWIGLU",
    "build",
    "library_key",
    "library_path",
    "load_gemv",
    "supports",
]
