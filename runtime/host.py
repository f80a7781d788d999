"""The machine Kiln runs on: its platform, the GPUs its drivers expose, and the platform a
compiled library was built for (read from its header). No TVM import: a package's loader asks
these questions before it decides which TVM runtime to import."""

from __future__ import annotations

import ctypes
import platform as _platform
import struct
import sys
from pathlib import Path

# Platforms Kiln builds for and packages carry TVM runtimes of.
PLATFORMS = ("linux-x86_64", "linux-aarch64", "macos-arm64")

_ELF_MACHINES = {0x3E: "linux-x86_64", 0xB7: "linux-aarch64"}
_MACHO_ARM64 = 0x0100000C


def host_platform() -> str:
    """This machine's platform name ("linux-x86_64", ...); other systems get a descriptive name
    that matches no package library."""
    machine = _platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    if sys.platform == "darwin":
        return "macos-arm64" if machine == "aarch64" else f"macos-{machine}"
    return f"{sys.platform}-{machine}"


def library_platform(path: Path) -> str | None:
    """The platform of a compiled library from its ELF or Mach-O header (None: neither)."""
    with open(path, "rb") as f:
        head = f.read(20)
    if head[:4] == b"\x7fELF" and len(head) >= 20:
        (machine,) = struct.unpack_from("<H", head, 18)
        return _ELF_MACHINES.get(machine)
    if len(head) >= 8 and struct.unpack_from("<I", head, 0)[0] == 0xFEEDFACF:
        return "macos-arm64" if struct.unpack_from("<I", head, 4)[0] == _MACHO_ARM64 else None
    return None


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


def has_hip() -> bool:
    return _loads("libamdhip64.so", "/opt/rocm/lib/libamdhip64.so") is not None


def devices() -> list[str]:
    """Device kinds this machine can run, best first: an NVIDIA GPU (the driver answers), an
    AMD GPU (the amdgpu driver lists one and HIP is installed), Apple Silicon, the CPU."""
    found = []
    if nvidia_gpus() > 0:
        found.append("cuda")
    if amd_gpu_archs() and has_hip():
        found.append("rocm")
    if host_platform() == "macos-arm64":
        found.append("metal")
    return [*found, "cpu"]
