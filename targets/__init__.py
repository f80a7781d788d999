"""Compilation targets: one file per vendor behind the `TargetSpec` contract."""

from __future__ import annotations

import ctypes
import platform
import sys
from pathlib import Path

from kiln.runtime.errors import KilnError
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


def _loads(*names: str) -> ctypes.CDLL | None:
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def nvidia_gpus() -> int:
    cuda = _loads("libcuda.so.1", "libcuda.so") if sys.platform == "linux" else None
    count = ctypes.c_int(0)
    if cuda is None or cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def amd_gpu_archs(root: Path = Path("/")) -> list[str]:
    """gfx names of the GPUs the amdgpu kernel driver exposes (/dev/kfd and its topology);
    gfx_target_version 90010 is gfx90a, 90402 gfx942, 110000 gfx1100."""
    nodes = root / "sys/class/kfd/kfd/topology/nodes"
    if not (root / "dev/kfd").exists() or not nodes.is_dir():
        return []
    archs = []
    for properties in sorted(nodes.glob("*/properties")):
        fields = dict(line.split()[:2] for line in properties.read_text().splitlines() if line)
        version = int(fields.get("gfx_target_version", 0))
        if version:  # CPU nodes have none
            major, minor, step = version // 10000, version // 100 % 100, version % 100
            archs.append(f"gfx{major}{minor:x}{step:x}")
    return archs
