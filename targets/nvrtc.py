"""CUDA kernels compiled with NVRTC from pip (nvidia-cuda-nvrtc and the header packages), for
machines without the CUDA toolkit: `pip install kiln[cuda]`.

NVRTC builds one image per call (a cubin for an sm, or PTX for a compute arch); kiln.targets.
cuda.write_fatbin packs them into the same fatbin container nvcc writes.
"""

from __future__ import annotations

import ctypes
import functools
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kiln.runtime.errors import KilnError

_INSTALL = "pip install 'kiln[cuda]' (or put the CUDA toolkit's nvcc on PATH)"


def _cuda_root() -> Path | None:
    try:
        import nvidia
    except ImportError:
        return None
    for base in nvidia.__path__:
        for sub in sorted(Path(base).glob("cu*"), reverse=True):  # the newest CUDA first
            if list((sub / "lib").glob("libnvrtc.so*")):
                return sub
    return None


@functools.cache
def _library() -> tuple[ctypes.CDLL, list[str]]:
    root = _cuda_root()
    if root is None:
        raise KilnError(f"compiling for --target cuda needs nvcc or NVRTC: {_INSTALL}")
    lib = ctypes.CDLL(str(sorted((root / "lib").glob("libnvrtc.so.*"))[0]))
    includes = [root / "include", root / "include" / "cccl"]
    missing = [h for h in ("cuda_fp16.h", "crt/mma.h") if not (root / "include" / h).exists()]
    if missing:
        raise KilnError(f"NVRTC is installed but CUDA headers {missing} are not: {_INSTALL}")
    return lib, [f"-I{p}" for p in includes]


def available() -> bool:
    return _cuda_root() is not None


def version() -> str:
    lib, _ = _library()
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return f"nvrtc {major.value}.{minor.value}"


def _compile(source: bytes, arch: str) -> bytes:
    """One image: `arch` is sm_XX (cubin) or compute_XX (PTX, NUL-terminated)."""
    lib, includes = _library()
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source, b"kernels.cu", 0, None, None):
        raise KilnError("NVRTC could not create a program (out of memory?)")
    try:
        options = [f"-arch={arch}", "-std=c++17", "-default-device", "-w", *includes]
        argv = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        if lib.nvrtcCompileProgram(prog, len(options), argv):
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            errors = [ln for ln in log.value.decode(errors="replace").splitlines() if "error" in ln]
            raise KilnError(f"NVRTC could not compile the kernels for {arch}: {errors[:1]}")
        ptx = arch.startswith("compute_")
        get_size, get = (
            (lib.nvrtcGetPTXSize, lib.nvrtcGetPTX)
            if ptx
            else (lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN)
        )
        size = ctypes.c_size_t()
        get_size(prog, ctypes.byref(size))
        image = ctypes.create_string_buffer(size.value)
        get(prog, image)
        return image.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def compile_images(source: str, archs: Sequence[str]) -> list[tuple[str, int, bytes]]:
    """(kind, sm, image) for a cubin per arch and PTX for the newest, compiled in parallel
    (NVRTC releases the GIL)."""
    numbers = [a.removeprefix("sm_") for a in archs]
    jobs = [("elf", f"sm_{n}") for n in numbers] + [("ptx", f"compute_{numbers[-1]}")]
    with ThreadPoolExecutor() as pool:
        images = list(pool.map(lambda job: _compile(source.encode(), job[1]), jobs))
    return [
        (kind, int(re.sub(r"\D", "", arch)), image)
        for (kind, arch), image in zip(jobs, images, strict=True)
    ]
