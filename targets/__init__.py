"""Compilation targets: one file per vendor behind the `TargetSpec` contract."""

from __future__ import annotations

import platform
import sys

from kiln.runtime.errors import KilnError

# Device detection lives in the runtime (no TVM import); the names stay here for callers.
from kiln.runtime.host import _loads, amd_gpu_archs, nvidia_gpus
from kiln.targets.base import TargetSpec
from kiln.targets.cpu import CPU
from kiln.targets.cuda import CUDA
from kiln.targets.metal import METAL
from kiln.targets.rocm import ROCM

TARGETS: dict[str, TargetSpec] = {"cpu": CPU, "cuda": CUDA, "rocm": ROCM, "metal": METAL}


def get_target(name: str) -> TargetSpec:
    """The target called `name`; "auto" is the best one this machine has (`detect_target`)."""
    if name == "auto":
        name = detect_target()
    if name not in TARGETS:
        raise KilnError(f"unknown target {name!r}: choose one of {', '.join(TARGETS)} or auto")
    return TARGETS[name]


def detect_target() -> str:
    """An NVIDIA GPU (the driver's libcuda answers), an AMD GPU (the amdgpu driver's KFD lists
    one and HIP is installed), Apple Silicon (Metal), else the CPU."""
    if nvidia_gpus() > 0:
        return "cuda"
    if amd_gpu_archs() and _loads("libamdhip64.so", "/opt/rocm/lib/libamdhip64.so"):
        return "rocm"
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "metal"
    return "cpu"
