"""Kiln's cuBLAS extern for CUDA artifacts (kiln.runtime.cublas.cublas)."""

from kiln.runtime.cublas.cublas import ARTIFACT_FILE, MATMUL, build, cublas_library, load_cublas

__all__ = ["ARTIFACT_FILE", "MATMUL", "build", "cublas_library", "load_cublas"]
