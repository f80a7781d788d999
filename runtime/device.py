"""Devices: parsing "cuda:1", loading the TVM runtime library that drives a GPU vendor."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import tvm
import tvm_ffi

from kiln.runtime.errors import KilnError

KINDS = ("cpu", "cuda", "rocm", "metal")


def parse_device(device: str) -> tuple[str, int]:
    kind, _, index = device.partition(":")
    if kind not in KINDS or (index and not index.isdigit()):
        raise KilnError(
            f"unknown device {device!r}: use auto, cpu, cuda, cuda:N, rocm, rocm:N or metal"
        )
    return kind, int(index or 0)


# The device-module loader each vendor runtime registers (ROCm's is named after its format).
_LOADER = {"cuda": "cuda", "rocm": "hsaco", "metal": "metal"}


def _ensure_vendor_runtime(kind: str) -> None:
    """The vendor part of the TVM runtime is a separate library that runtime-only installs do
    not load by themselves (and it needs the vendor driver to load at all)."""
    if kind == "cpu" or tvm_ffi.get_global_func(
        f"ffi.Module.load_from_bytes.{_LOADER[kind]}", True
    ):
        return
    suffix = ".dylib" if kind == "metal" else ".so"
    lib = Path(tvm.__file__).parent / "lib" / f"libtvm_runtime_{kind}{suffix}"
    if not lib.is_file():
        hint = ""
        if kind == "rocm":  # what a package cannot bring: see kiln.compiler.tvm_runtime
            hint = " (the apache-tvm wheels have none): use a TVM built with ROCm"
        raise KilnError(
            f"this TVM installation has no {kind} runtime ({lib.name} is missing){hint}"
        )
    try:
        ctypes.CDLL(str(lib), mode=os.RTLD_GLOBAL)
    except OSError as e:
        raise KilnError(
            f"cannot load TVM's {kind} runtime ({e}); is the {kind} driver installed?"
        ) from None


def open_device(device: str) -> Any:
    kind, index = parse_device(device)
    _ensure_vendor_runtime(kind)
    dev = tvm.runtime.device(kind, index)
    if kind != "cpu" and not dev.exist:
        raise KilnError(f"no {kind} device {index} on this machine")
    return dev


def device_count(kind: str) -> int:
    """How many devices of `kind` this machine has (0 when TVM cannot drive them here)."""
    try:
        _ensure_vendor_runtime(kind)
    except KilnError:
        return 0
    count = 0
    while tvm.runtime.device(kind, count).exist:
        count += 1
    return count


def device_arch(dev: Any) -> str | None:
    """The architecture an artifact may have one library per: the gfx name of a ROCm GPU."""
    if dev.dlpack_device_type() != 10:  # kDLROCM
        return None
    # device attribute 10 (kGcnArch): hipDeviceProp_t.gcnArchName, "gfx90a:sramecc+:xnack-"
    return str(dev._GetDeviceAttr(10, dev.index, 10)).split(":")[0]
