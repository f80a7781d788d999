"""Kiln's NCCL backend for TVM Disco: built from nccl.cc on first use, cached, loaded.

The apache-tvm wheel has Disco but no `runtime.disco.nccl.*` functions, so
`Session.init_ccl("nccl", ...)` fails there. `load_nccl()` compiles nccl.cc (next to this file)
against the wheel's headers and the NCCL of the `nvidia-nccl-cu13` package (or any NCCL found),
caches the library under $KILN_CACHE/disco (default ~/.cache/kiln/disco) by a hash of what
went into it, and loads it, which registers the functions. A library built on one machine loads
on another with the same TVM: copy the cache directory (the GPU kit has no TVM headers to build
with).

    sess = nccl_session([0, 1])                # one Disco worker per GPU, NCCL initialized
    sess.allreduce(x, y, "sum")
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import tvm
import tvm_ffi
from tvm import libinfo

from kiln.runtime import native
from kiln.runtime.device import open_device
from kiln.runtime.errors import KilnError
from kiln.runtime.package import cache_root

_HERE = Path(__file__).resolve().parent
SOURCE = _HERE / "nccl.cc"
# Headers the wheel's tvm/runtime/tensor.h includes but the wheel does not ship.
SHIM_INCLUDE = _HERE / "include"
WHAT = "Kiln's NCCL backend"
INSTALL_NCCL = "pip install 'kiln[tp]' (or nvidia-nccl-cu13), or set KILN_NCCL_HOME"


def _nccl_homes() -> list[Path]:
    """Directories with include/nccl.h and/or lib/libnccl.so.2, most specific first."""
    homes = [Path(os.environ[v]) for v in ("KILN_NCCL_HOME", "NCCL_HOME") if os.environ.get(v)]
    homes += [p / "nccl" for p in native.nvidia_dirs()]  # pip's NCCL, cu12 and cu13: nvidia/nccl/
    return [*homes, Path("/usr/local"), Path("/usr")]  # a system install (libnccl-dev)


def nccl_library() -> Path:
    for home in _nccl_homes():
        for lib in ("lib", "lib64", "lib/x86_64-linux-gnu"):
            if (home / lib / "libnccl.so.2").is_file():
                return home / lib / "libnccl.so.2"
    raise KilnError(f"tensor parallelism needs NCCL (libnccl.so.2), found none: {INSTALL_NCCL}")


def nccl_include() -> Path:
    for home in _nccl_homes():
        if (home / "include" / "nccl.h").is_file():
            return home / "include"
    raise KilnError(f"building Kiln's NCCL backend needs nccl.h, found none: {INSTALL_NCCL}")


def tvm_include() -> Path:
    try:
        include = Path(libinfo.find_include_path())
    except RuntimeError:
        include = None
    if include is None or not (include / "tvm/runtime/disco/disco_worker.h").is_file():
        raise KilnError(
            "building Kiln's NCCL backend needs TVM's C++ headers (tvm/include of the "
            "apache-tvm wheel), which this TVM installation lacks: build the library where "
            f"apache-tvm is installed (python -m kiln.runtime.disco) and copy "
            f"{library_path().parent} here (or point KILN_CACHE at a copy)"
        )
    return include


def library_key() -> str:
    """What the compiled library depends on: its sources and the TVM it links against.

    Not the NCCL version: its C API is stable, and the library binds to whichever libnccl.so.2
    is loaded first."""
    return native.source_key([SOURCE, *sorted(SHIM_INCLUDE.rglob("*.h"))])


def library_path() -> Path:
    return cache_root() / "disco" / f"kiln_nccl-{library_key()}.so"


def build(force: bool = False) -> Path:
    """Compile nccl.cc into the cache (once per key) and return the library's path."""
    out = library_path()
    if out.is_file() and not force:
        return out
    lib_dir, nccl, cudart = native.tvm_lib_dir(), nccl_library(), native.cudart_library(WHAT)
    cmd = [
        native.compiler(WHAT),
        *native.FLAGS,
        str(SOURCE),
        f"-I{SHIM_INCLUDE}",
        f"-I{tvm_ffi.libinfo.find_include_path()}",
        f"-I{tvm_include()}",
        f"-I{nccl_include()}",
        f"-I{native.cuda_include(WHAT)}",  # nccl.h includes cuda_runtime.h
        f"-L{lib_dir}",
        f"-L{Path(tvm_ffi.libinfo.find_libtvm_ffi()).parent}",
        "-ltvm_runtime_extra",
        "-ltvm_runtime",
        "-ltvm_ffi",
        str(nccl),
        str(cudart),
        f"-Wl,-rpath,{lib_dir}:{nccl.parent}:{cudart.parent}",
    ]
    return native.compile_library(out, cmd, WHAT)


def disco_module() -> ModuleType:
    """`tvm.runtime.disco`, usable: with its C++ half (libtvm_runtime_extra) loaded.

    `import tvm` loads libtvm_runtime_extra after importing tvm.runtime, whose `disco` import
    fails then and is left as None; a runtime-only `import tvm` never loads the library, and its
    `tvm.runtime.disco` has none of the C++ functions and no registered classes."""
    if tvm_ffi.get_global_func("runtime.disco.SessionThreaded", allow_missing=True) is None:
        extra = native.tvm_lib_dir() / "libtvm_runtime_extra.so"
        if not extra.is_file():
            raise KilnError(
                f"this TVM installation has no Disco runtime ({extra.name} is missing): "
                "install the apache-tvm wheel Kiln pins"
            )
        native.load_library(extra, "TVM's Disco runtime")
    disco = importlib.import_module("tvm.runtime.disco")
    ffi_api = importlib.import_module("tvm.runtime.disco._ffi_api")
    if not hasattr(ffi_api, "SessionThreaded"):  # imported before the library was loaded
        tvm_ffi.init_ffi_api("runtime.disco", ffi_api.__name__)
        from tvm.runtime.disco import session

        for name in ("DRef", "Session", "ThreadedSession", "ProcessSession", "SocketSession"):
            tvm_ffi.register_object(f"runtime.disco.{name}")(getattr(session, name))
    tvm.runtime.disco = disco
    return disco


def load_nccl() -> ModuleType:
    """Register `runtime.disco.nccl.*` in this process (once) and return `tvm.runtime.disco`."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # keep NVLink multicast off on shared hosts
    disco = disco_module()
    if tvm_ffi.get_global_func("runtime.disco.nccl.init_ccl", allow_missing=True) is None:
        native.load_library(nccl_library(), "NCCL")  # first, so that the backend binds to this one
        native.load_library(build(), "Kiln's NCCL backend")
    return disco


def nccl_session(devices: Sequence[int], kind: str = "process") -> Any:
    """A Disco session with one worker per CUDA device in `devices`, NCCL initialized.

    kind="process": workers 1.. are processes (python -m kiln.runtime.disco.worker), worker 0
    runs in this one; kind="threaded": every worker is a thread of this process."""
    if not devices or len(set(devices)) != len(devices):
        raise KilnError(f"a tensor-parallel session needs distinct GPUs, got {list(devices)}")
    if kind not in ("process", "threaded"):
        raise KilnError(f"unknown Disco session kind {kind!r}: use process or threaded")
    for d in devices:  # first: TVM's CUDA runtime picks the libcudart the backend then shares
        open_device(f"cuda:{d}")
    disco = load_nccl()
    if kind == "process":
        sess = disco.ProcessSession(len(devices), entrypoint="kiln.runtime.disco.worker")
    else:
        sess = disco.ThreadedSession(len(devices))
    sess.init_ccl("nccl", *devices)
    return sess
