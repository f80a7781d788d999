"""Tensor parallelism on TVM Disco: Kiln's NCCL backend for it (kiln.runtime.disco.nccl)."""

from kiln.runtime.disco.nccl import build, disco_module, load_nccl, nccl_session

__all__ = ["build", "disco_module", "load_nccl", "nccl_session"]
