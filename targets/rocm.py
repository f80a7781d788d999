"""AMD ROCm: AMDGPU code objects (hsaco) from TVM's LLVM, one library per gfx architecture.

TVM's amdgcn codegen emits a relocatable ELF object and hands it to the global callback
`tvm_callback_rocm_link` to become a code object. TVM's own callback looks for an `ld.lld` on
PATH, where Debian's lld 14 rejects the code-object version LLVM 22 emits ("unknown abi version").
Kiln installs its own callback (see `find_lld`): the LLD 22 in the `ziglang` wheel, a pip
dependency, so nothing outside pip is needed. The code objects are finished machine code: the ROCm
runtime loads them with hipModuleLoadData, no compiler at load.

A code object runs on one gfx architecture, and RDNA (gfx10+, wave32) and CDNA (gfx9, wave64)
need different schedules, so each --arch gets its own build and library; the manifest maps
arch -> library and the runtime picks the device's (kiln.runtime.artifact.Manifest.library_for).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tvm_ffi
from tvm.relax.backend.rocm import pipeline as rocm_pipeline
from tvm.target import Target, codegen

from kiln.runtime.errors import KilnError
from kiln.targets.base import TargetSpec
from kiln.targets.blob import Blob, kernel_names, split_device_payload
from kiln.targets.gpu import dlight_schedule, gpu_legalize

DEFAULT_ARCHS = "gfx90a,gfx942,gfx1100"  # MI250X, MI300X, RX 7900
_TRIPLE = "amdgcn-amd-amdhsa"
_GFX = re.compile(r"^gfx(\d+?)[0-9a-f]{2}$")  # gfx90a, gfx942, gfx1100: major version, 2 digits


def parse_archs(arch: str | None) -> list[str]:
    archs = list(dict.fromkeys(a.strip() for a in (arch or DEFAULT_ARCHS).split(",") if a.strip()))
    bad = [a for a in archs if not (_GFX.match(a) and codegen.llvm_is_valid_cpu(a, _TRIPLE))]
    if bad or not archs:
        raise KilnError(
            f"--arch {bad[0] if bad else arch!r} is not an AMD GPU architecture LLVM knows: give "
            f"a comma-separated list of gfx names such as {DEFAULT_ARCHS}"
        )
    return archs


def wave_size(arch: str) -> int:
    # RDNA (gfx10, gfx11, gfx12) runs wave32 by default, GCN/CDNA (gfx9) wave64; TVM's warp
    # shuffles must match what LLVM compiles for.
    return 32 if int(_GFX.match(arch)[1]) >= 10 else 64


def _make_target(arch: str | None) -> Target:
    archs = parse_archs(arch)
    if len(archs) != 1:
        raise ValueError(f"a ROCm build is for one gfx arch, got {archs} (a Kiln bug)")
    find_lld()  # a missing linker is an error now, not after codegen
    _install_callbacks()
    # 256 threads per block: without a GPU to ask, TVM's codegen marks every kernel
    # amdgpu-flat-work-group-size 1,256, so schedules must not launch more.
    return Target(
        {
            "kind": "rocm",
            "mcpu": archs[0],
            "max_num_threads": 256,
            "max_threads_per_block": 256,
            "max_shared_memory_per_block": 49152,  # TVM's default, said out loud (see cuda.py)
            "thread_warp_size": wave_size(archs[0]),
        },
        host={"kind": "llvm"},
    )


# -- linking -------------------------------------------------------------------------------


def find_lld() -> tuple[list[str], str]:
    """(command, where it comes from) of the ld.lld that links code objects: $KILN_LLD, else the
    ziglang wheel's LLD, else ld.lld-<TVM's LLVM major> on PATH (Debian's lld-22)."""
    if os.environ.get("KILN_LLD"):
        lld = shutil.which(os.environ["KILN_LLD"])
        if lld is None:
            raise KilnError(f"KILN_LLD={os.environ['KILN_LLD']} is not a program: fix or unset it")
        return [lld], "$KILN_LLD"
    try:
        import ziglang

        zig = Path(ziglang.__file__).parent / ("zig.exe" if sys.platform == "win32" else "zig")
        if zig.is_file():
            return [str(zig), "ld.lld"], "the ziglang wheel"
    except ImportError:
        pass
    name = f"ld.lld-{codegen.llvm_version_major()}"
    if shutil.which(name):
        return [shutil.which(name)], "PATH"
    raise KilnError(
        "compiling for --target rocm needs an LLD as new as TVM's LLVM "
        f"({codegen.llvm_version_major()}): `pip install ziglang` (a Kiln dependency), install "
        f"{name}, or point KILN_LLD at one"
    )


def describe_lld() -> str:
    """What `kiln targets` says about the linker."""
    try:
        cmd, origin = find_lld()
    except KilnError as e:
        return f"ld.lld: not found ({e})"
    out = subprocess.run([*cmd, "--version"], capture_output=True, text=True).stdout
    version = re.search(r"LLD (\S+)", out)
    return f"ld.lld {version[1] if version else '?'} from {origin} ({' '.join(cmd)})"


def link_code_object(obj: bytes) -> bytes:
    """Relocatable amdgcn object -> code object. --no-undefined: a kernel that calls a device
    library function (__ocml_*, __ockl_*) fails here, not when the GPU loads it."""
    cmd, _ = find_lld()
    with tempfile.TemporaryDirectory(prefix="kiln-rocm-") as tmp:
        src, out = Path(tmp) / "kernels.o", Path(tmp) / "kernels.hsaco"
        src.write_bytes(obj)
        done = subprocess.run(
            [*cmd, "--no-undefined", "-shared", str(src), "-o", str(out)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            why = done.stderr.strip()
            if "undefined symbol: __oc" in why:
                why += " (a kernel calls ROCm device-library math, which Kiln does not link: a bug)"
            raise KilnError(f"ld.lld could not link the ROCm kernels: {why}")
        return out.read_bytes()


@functools.cache
def _install_callbacks() -> None:
    """Replace TVM's ROCm link callbacks (process-wide) with Kiln's linker. Device libraries
    (ROCm's ocml/ockl bitcode) are not linked: TVM lowers the math Llama-family kernels use
    (exp, sqrt, ...) to LLVM intrinsics, and the link checks that nothing else is left."""
    tvm_ffi.register_global_func(
        "tvm_callback_rocm_link", lambda obj: link_code_object(bytes(obj)), override=True
    )
    tvm_ffi.register_global_func("tvm_callback_rocm_bitcode_path", lambda *_: [], override=True)


# -- code objects --------------------------------------------------------------------------

EM_AMDGPU = 224


@dataclass(frozen=True)
class CodeObject:
    """What an AMDGPU code object says about itself (its ELF header, metadata note, symbols)."""

    machine: int  # e_machine: EM_AMDGPU
    mach: int  # e_flags & 0xff: the EF_AMDGPU_MACH_* number of its gfx arch
    version: int  # code object version (e_ident ABI version + 2)
    target: str  # from the metadata note: TVM's triple and the arch, "amdgcn-amd-amdhsa-hcc-gfx942"
    defined: frozenset[str]
    undefined: frozenset[str]

    @property
    def arch(self) -> str:
        return self.target.rpartition("-")[2].split(":")[0]


def read_code_object(data: bytes) -> CodeObject:
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError("not a 64-bit ELF file")
    (machine,) = struct.unpack_from("<H", data, 18)
    (shoff,) = struct.unpack_from("<Q", data, 40)
    (flags,) = struct.unpack_from("<I", data, 48)
    shentsize, shnum = struct.unpack_from("<HH", data, 58)
    # (type, offset, size, link) of each section
    sections = [struct.unpack_from("<4xI16xQQI", data, shoff + i * shentsize) for i in range(shnum)]
    target, defined, undefined = "", set(), set()
    for kind, offset, size, link in sections:
        if kind == 7:  # SHT_NOTE: the AMDGPU metadata (msgpack) names the target id
            note = data[offset : offset + size]
            found = re.search(rb"amdgcn-amd-amdhsa-[a-z]*-gfx[0-9a-f]+(:[a-z]+[+-])*", note)
            target = found[0].decode() if found else target
        elif kind in (2, 11):  # SHT_SYMTAB, SHT_DYNSYM
            strtab = sections[link][1]
            for at in range(offset + 24, offset + size, 24):  # entry 0 is the null symbol
                name_at, shndx = struct.unpack_from("<I2xH", data, at)
                name = data[strtab + name_at : data.index(b"\0", strtab + name_at)].decode()
                (defined if shndx else undefined).add(name)
    return CodeObject(
        machine, flags & 0xFF, data[8] + 2, target, frozenset(defined), frozenset(undefined)
    )


def check_code_object(co: CodeObject, arch: str, kernels: list[str]) -> None:
    """Every kernel the host calls is defined (entry point + kernel descriptor), nothing is left
    undefined, and the code object is for `arch`."""
    missing = [k for k in kernels if k not in co.defined or f"{k}.kd" not in co.defined]
    problems = [
        f"it is for {co.arch or 'no gfx arch'}, not {arch}" if co.arch != arch else "",
        f"kernels {', '.join(missing[:3])} are missing" if missing else "",
        f"{', '.join(sorted(co.undefined)[:3])} are undefined" if co.undefined else "",
    ]
    if co.machine != EM_AMDGPU or any(problems):
        detail = "; ".join(p for p in problems if p) or "not an AMDGPU ELF"
        raise KilnError(f"the ROCm code object for {arch} is wrong ({detail}): a Kiln bug")


def export_library(
    executable: Any, path: str, arch: str | None, fcompile: Any = None
) -> dict[str, Any]:
    """Check the code object the build linked and write the host library around it; returns
    what the manifest records about it."""
    (gfx,) = parse_archs(arch)
    raw = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(executable.mod)
    blob = Blob.parse(bytes(raw.numpy()))
    payloads = [p for key, p in blob.modules if key == "hip" and p is not None]
    if not payloads:
        raise KilnError("the ROCm build produced no device kernels (a Kiln bug)")
    kernels: list[str] = []
    for payload in payloads:
        fmt, fmap, data = split_device_payload(payload)
        if fmt != "hsaco":
            raise KilnError(f"unexpected ROCm module format {fmt!r} from TVM's codegen")
        co = read_code_object(data)
        check_code_object(co, gfx, kernel_names(fmap))
        kernels += kernel_names(fmap)
    executable.export_library(path, **({"fcompile": fcompile} if fcompile else {}))
    return {
        "format": "hsaco",
        "isa": co.target,
        "code_object_version": co.version,
        "kernels": sorted(kernels),
    }


ROCM = TargetSpec(
    name="rocm",
    device="rocm",
    description="AMD GPUs: one code object (hsaco) and host library per gfx --arch",
    default_arch=DEFAULT_ARCHS,
    make_target=_make_target,
    library_dispatch=rocm_pipeline.library_dispatch_passes,
    legalize=gpu_legalize,
    schedule=dlight_schedule,
    dataflow_lower=rocm_pipeline.dataflow_lower_passes,
    finalize=rocm_pipeline.finalize_passes,
    export=export_library,
    platforms=("linux-x86_64",),
    split_arch=parse_archs,
    toolchain=describe_lld,
)
