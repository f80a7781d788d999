"""Kiln's cuBLAS extern for CUDA artifacts: built from cublas.cc, cached, loaded.

The apache-tvm wheel has no cuBLAS contrib. CUDA artifacts call `kiln.cublas.matmul(x, w, out)`
(out = x @ w^T) for their fp16/bf16 GEMMs (kiln.passes.dispatch_matmul) and record that in
their manifest (`target.externs`). `kiln compile` puts the built library into the artifact
(ARTIFACT_FILE) when it compiles for its own platform, and the runner loads that copy before the
VM starts. Otherwise `load_cublas()` compiles cublas.cc against tvm-ffi's headers and cuBLASLt's
(kiln.runtime.native), caches the library under $KILN_CACHE/cublas (default
~/.cache/kiln/cublas) by a hash of what went into it, and loads it. Either way the library is
pointed at the cuBLASLt found here: $KILN_CUBLAS (the library or its folder), CUDA 13's from pip
(`nvidia-cublas`, the `cublas` extra), the CUDA toolkit's, or CUDA 12's from pip
(`nvidia-cublas-cu12`, which torch brings). cuBLASLt is opened with dlopen, so one build serves
either. A machine without a compiler can also copy the cache directory from one that has it
(`python -m kiln.runtime.cublas` prints the library's path).
"""

from __future__ import annotations

import os
from pathlib import Path

import tvm_ffi

from kiln.runtime import native
from kiln.runtime.errors import KilnError
from kiln.runtime.package import cache_root

_HERE = Path(__file__).resolve().parent
SOURCE = _HERE / "cublas.cc"
WHAT = "Kiln's cuBLAS extern"
MATMUL = "kiln.cublas.matmul"  # out = x @ w^T, the function CUDA artifacts call
ARTIFACT_FILE = "kiln-cublas.so"  # the built extern, inside an artifact compiled on its platform
# Newest first; the C API Kiln uses is the same in both.
SONAMES = ("libcublasLt.so.13", "libcublasLt.so.12")
INSTALL_CUBLAS = (
    "pip install 'kiln[cublas]' (or nvidia-cublas), or set KILN_CUBLAS to libcublasLt.so's path"
)


def _cublas_homes() -> list[Path]:
    """Folders that may hold cuBLAS (lib/ and include/), most specific first."""
    nvidia = native.nvidia_dirs()
    homes = [p / "cu13" for p in nvidia]  # nvidia-cublas (CUDA 13)
    homes += native.cuda_roots()  # the CUDA toolkit
    homes += [p / "cublas" for p in nvidia]  # nvidia-cublas-cu12 (CUDA 12, as torch has it)
    return list(dict.fromkeys([*homes, Path("/usr/local"), Path("/usr")]))


def cublas_library() -> Path:
    """The cuBLASLt this machine runs GEMMs with."""
    override = os.environ.get("KILN_CUBLAS")
    if override:
        path = Path(override)
        found = [path / n for n in SONAMES if (path / n).is_file()] if path.is_dir() else [path]
        if not found or not found[0].is_file():
            raise KilnError(
                f"KILN_CUBLAS is {override}, which is not libcublasLt.so.13 or .so.12 nor a "
                "folder holding one: point it at the library (or unset it)"
            )
        return found[0]
    for soname in SONAMES:
        for home in _cublas_homes():
            for lib in ("lib", "lib64", "lib/x86_64-linux-gnu", "targets/x86_64-linux/lib"):
                if (home / lib / soname).is_file():
                    return home / lib / soname
    raise KilnError(
        f"the CUDA artifact runs its matrix multiplications on cuBLAS, found none here "
        f"({' or '.join(SONAMES)}): {INSTALL_CUBLAS}"
    )


def cublas_include() -> Path:
    for home in _cublas_homes():
        for inc in native.include_dirs(home):
            if (inc / "cublasLt.h").is_file():
                return inc
    raise KilnError(f"building {WHAT} needs cuBLAS's headers (cublasLt.h), found none: "
                    f"{INSTALL_CUBLAS}")  # fmt: skip


def library_key() -> str:
    """What the compiled library depends on: its source and the tvm-ffi it links against (not
    cuBLAS, which it opens at run time; not TVM's libraries, which it does not use)."""
    return native.source_key([SOURCE])


def library_path() -> Path:
    return cache_root() / "cublas" / f"kiln_cublas-{library_key()}.so"


def build(force: bool = False) -> Path:
    """Compile cublas.cc into the cache (once per key) and return the library's path."""
    out = library_path()
    if out.is_file() and not force:
        return out
    cudart = native.cudart_library(WHAT)
    ffi_lib = Path(tvm_ffi.libinfo.find_libtvm_ffi()).parent
    cmd = [
        native.compiler(WHAT),
        *native.FLAGS,
        str(SOURCE),
        f"-I{tvm_ffi.libinfo.find_include_path()}",
        f"-I{cublas_include()}",
        f"-I{native.cuda_include(WHAT)}",
        f"-L{ffi_lib}",
        "-ltvm_ffi",
        str(cudart),
        "-ldl",
        f"-Wl,-rpath,{ffi_lib}:{cudart.parent}",
    ]
    return native.compile_library(out, cmd, WHAT)


def load_cublas(library: Path | None = None) -> int:
    """Register `kiln.cublas.*` in this process (once) with this machine's cuBLASLt; returns
    cuBLASLt's version (e.g. 130100 for 13.1.0). `library`: the extern built already (an
    artifact's copy); otherwise it is built here, or taken from the cache."""
    lt = cublas_library()  # first: a machine without cuBLAS should hear that, not about builds
    if tvm_ffi.get_global_func("kiln.cublas.load", allow_missing=True) is None:
        if library is None:
            try:
                library = build()
            except KilnError as e:
                raise KilnError(
                    f"{e}\nOr build it on a machine that can (python -m kiln.runtime.cublas) and "
                    f"copy {library_path().parent} here (or point KILN_CACHE at a copy)"
                ) from None
        native.load_library(library, WHAT)
    try:
        return int(tvm_ffi.get_global_func("kiln.cublas.load")(str(lt)))
    except RuntimeError as e:
        raise KilnError(f"cannot use cuBLAS from {lt}: {e}") from None
