"""Apple Metal: Metal Shading Language kernels in a macOS arm64 host library, built on any OS.

TVM's Metal codegen emits MSL source per kernel; on the Mac, Metal.framework (part of macOS, not
an SDK) compiles it when the library is loaded. The host side is LLVM code for arm64-apple-macos,
which the system C compiler cannot link on Linux; the `ziglang` wheel (a pip dependency) brings a
Mach-O linker that can: `zig cc -target aarch64-macos -shared -undefined dynamic_lookup`, the
same flags TVM uses on a Mac. The TVM runtime's symbols are looked up in the process that loads
the library (the macOS apache-tvm wheel); half-float helpers bind to libSystem.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import tvm_ffi
from tvm.relax.backend.gpu_generic import pipeline as gpu_pipeline
from tvm.target import Target, codegen

from kiln.runtime.errors import KilnError
from kiln.targets.base import TargetSpec
from kiln.targets.blob import Blob, kernel_names, split_metal_payload
from kiln.targets.gpu import dlight_schedule, gpu_legalize

HOST_TRIPLE = "arm64-apple-macos"
ZIG_TARGET = "aarch64-macos.11.0"  # the first macOS on Apple Silicon
DEFAULT_ARCH = "apple-m1"  # host CPU; apple-m1 code runs on every Apple Silicon Mac


def _make_target(arch: str | None) -> Target:
    cpu = arch or DEFAULT_ARCH
    if not codegen.llvm_is_valid_cpu(cpu, HOST_TRIPLE):
        raise KilnError(
            f"--arch {cpu!r} is not an Apple CPU LLVM knows: use apple-m1 (runs on every Apple "
            "Silicon Mac), apple-m2, apple-m3 or apple-m4"
        )
    zig()  # a missing linker is an error now, not after codegen
    # TVM's "apple/m1-gpu-restricted" limits: a Metal pipeline may allow fewer than 1024 threads
    # per threadgroup, so schedules stay within 256; SIMD groups are 32 wide.
    return Target(
        {
            "kind": "metal",
            "max_num_threads": 256,
            "max_threads_per_block": 256,
            "max_shared_memory_per_block": 32768,
            "thread_warp_size": 32,
        },
        host={"kind": "llvm", "mtriple": HOST_TRIPLE, "mcpu": cpu},
    )


def zig() -> str:
    try:
        import ziglang
    except ImportError:
        raise KilnError(
            "compiling for --target metal needs the ziglang wheel as a macOS linker: "
            "`pip install ziglang` (a Kiln dependency)"
        ) from None
    return str(Path(ziglang.__file__).parent / ("zig.exe" if sys.platform == "win32" else "zig"))


def describe_linker() -> str:
    """What `kiln targets` says about the linker."""
    try:
        cmd = zig()
    except KilnError as e:
        return str(e)
    version = subprocess.run([cmd, "version"], capture_output=True, text=True).stdout.strip()
    return f"zig {version} from the ziglang wheel links the macOS arm64 dylib ({cmd} cc)"


def link_dylib(output: str, objects: list[str], **_options: Any) -> None:
    """TVM's `fcompile` hook: link the host objects (Mach-O arm64) into a dylib."""
    name = Path(output).name
    done = subprocess.run(
        [zig(), "cc", "-target", ZIG_TARGET, "-shared", "-undefined", "dynamic_lookup",
         f"-Wl,-install_name,@rpath/{name}", "-o", output, *objects],
        capture_output=True,
        text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise KilnError(f"zig could not link the macOS library: {done.stderr.strip()}")


link_dylib.get_target_triple = lambda: HOST_TRIPLE  # type: ignore[attr-defined]


def export_library(
    executable: Any, path: str, _arch: str | None, fcompile: Any = None
) -> dict[str, Any]:
    """Check that every kernel the host calls has its MSL source, and link the dylib; returns
    what the manifest records about the device code."""
    raw = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(executable.mod)
    blob = Blob.parse(bytes(raw.numpy()))
    kernels: list[str] = []
    for key, payload in blob.modules:
        if key != "metal" or payload is None:
            continue
        fmt, fmap, sources = split_metal_payload(payload)
        names = kernel_names(fmap)
        missing = [n for n in names if f"kernel void {n}(" not in sources.get(n, "")]
        if fmt != "metal" or missing:
            raise KilnError(f"TVM's Metal codegen left no MSL for {missing[:3] or fmt}: a Kiln bug")
        kernels += names
    if not kernels:
        raise KilnError("the Metal build produced no device kernels (a Kiln bug)")
    executable.export_library(path, fcompile=link_dylib)
    return {"format": "metal", "host": HOST_TRIPLE, "kernels": sorted(kernels)}


METAL = TargetSpec(
    name="metal",
    device="metal",
    description="Apple Silicon GPUs: MSL kernels in a macOS arm64 library (--arch: host CPU)",
    default_arch=DEFAULT_ARCH,
    make_target=_make_target,
    library_dispatch=gpu_pipeline.library_dispatch_passes,
    legalize=gpu_legalize,
    schedule=dlight_schedule,
    dataflow_lower=gpu_pipeline.dataflow_lower_passes,
    finalize=gpu_pipeline.finalize_passes,
    export=export_library,
    library_suffix=".dylib",
    # Metal has no float64, and bfloat16 only from Apple7 GPUs with macOS 14.
    dtypes=("float32", "float16"),
    toolchain=describe_linker,
    platforms=("macos-arm64",),  # its host code is always built for the Mac, on any OS
)
