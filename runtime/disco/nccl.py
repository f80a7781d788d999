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

import ctypes
import hashlib
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import tvm
import tvm_ffi
from tvm import libinfo

from kiln.runtime.device import open_device
from kiln.runtime.errors import KilnError
from kiln.runtime.package import cache_root

_HERE = Path(__file__).resolve().parent
SOURCE = _HERE / "nccl.cc"
# Headers the wheel's tvm/runtime/tensor.h includes but the wheel does not ship.
SHIM_INCLUDE = _HERE / "include"
FLAGS = ["-std=c++17", "-O2", "-fPIC", "-shared", "-fvisibility=hidden", "-Wl,--no-undefined"]
INSTALL_NCCL = "pip install 'kiln[tp]' (or nvidia-nccl-cu13), or set KILN_NCCL_HOME"


def _tvm_lib_dir() -> Path:
    # Where `import tvm` found libtvm_runtime (TVM_LIBRARY_PATH may point elsewhere).
    loaded = getattr(tvm.base, "_LOADED_LIBS", {}).get("tvm_runtime")
    if loaded is not None:
        return Path(loaded._name).resolve().parent
    return Path(tvm.__file__).resolve().parent / "lib"


def _nccl_homes() -> list[Path]:
    """Directories with include/nccl.h and/or lib/libnccl.so.2, most specific first."""
    homes = [Path(os.environ[v]) for v in ("KILN_NCCL_HOME", "NCCL_HOME") if os.environ.get(v)]
    homes += [p / "nccl" for p in _nvidia_dirs()]  # pip's NCCL, cu12 and cu13: nvidia/nccl/
    return [*homes, Path("/usr/local"), Path("/usr")]  # a system install (libnccl-dev)


def _nvidia_dirs() -> list[Path]:
    """The `nvidia` package directories where pip puts NVIDIA's libraries (torch's NCCL too)."""
    spec = importlib.util.find_spec("nvidia")
    found = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    # Not only the namespace package's: an `nvidia/__init__.py` somewhere would hide the rest.
    found += [Path(p) / "nvidia" for p in sys.path if p and (Path(p) / "nvidia").is_dir()]
    return list(dict.fromkeys(found))


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


def cuda_include() -> Path:
    """CUDA runtime headers (nccl.h includes cuda_runtime.h): the toolkit, else pip's."""
    roots = [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(Path(nvcc).resolve().parent.parent)
    roots.append(Path("/usr/local/cuda"))
    for p in _nvidia_dirs():  # nvidia-cuda-runtime: cu13/ (CUDA 13), cuda_runtime/ (CUDA 12)
        roots += [p / "cu13", p / "cuda_runtime"]
    for root in roots:
        for inc in (root / "include", root / "targets" / "x86_64-linux" / "include"):
            if (inc / "cuda_runtime.h").is_file():
                return inc
    raise KilnError(
        "building Kiln's NCCL backend needs the CUDA runtime headers (cuda_runtime.h), found "
        "none: install the CUDA toolkit (or set CUDA_HOME), or pip install 'kiln[cuda]'"
    )


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


def cudart_library() -> Path:
    """The CUDA runtime TVM's CUDA runtime links (libtvm_runtime_cuda.so needs libcudart.so.13)."""
    include = cuda_include()
    for lib in ("lib64", "lib"):
        if (include.parent / lib / "libcudart.so.13").is_file():
            return (include.parent / lib / "libcudart.so.13").resolve()
    raise KilnError(
        f"building Kiln's NCCL backend needs libcudart.so.13 next to {include}: install the CUDA "
        "13 toolkit (or set CUDA_HOME), or pip install 'kiln[cuda]'"
    )


def _compiler() -> str:
    for cxx in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cxx and shutil.which(cxx):
            return cxx
    raise KilnError("building Kiln's NCCL backend needs a C++ compiler: install g++ (or set CXX)")


def library_key() -> str:
    """What the compiled library depends on: its sources and the TVM it links against.

    Not the NCCL version: its C API is stable, and the library binds to whichever libnccl.so.2
    is loaded first."""
    h = hashlib.sha256()
    for path in (SOURCE, *sorted(SHIM_INCLUDE.rglob("*.h"))):
        h.update(path.read_bytes())
    # Module versions, not distribution metadata: a runtime-only copy of tvm has none.
    h.update(f"tvm {tvm.__version__} tvm_ffi {tvm_ffi.__version__}".encode())
    h.update(" ".join(FLAGS).encode())
    return h.hexdigest()[:16]


def library_path() -> Path:
    return cache_root() / "disco" / f"kiln_nccl-{library_key()}.so"


def build(force: bool = False) -> Path:
    """Compile nccl.cc into the cache (once per key) and return the library's path."""
    out = library_path()
    if out.is_file() and not force:
        return out
    lib_dir, nccl, cudart = _tvm_lib_dir(), nccl_library(), cudart_library()
    cmd = [
        _compiler(),
        *FLAGS,
        str(SOURCE),
        f"-I{SHIM_INCLUDE}",
        f"-I{tvm_ffi.libinfo.find_include_path()}",
        f"-I{tvm_include()}",
        f"-I{nccl_include()}",
        f"-I{cuda_include()}",
        f"-L{lib_dir}",
        f"-L{Path(tvm_ffi.libinfo.find_libtvm_ffi()).parent}",
        "-ltvm_runtime_extra",
        "-ltvm_runtime",
        "-ltvm_ffi",
        str(nccl),
        str(cudart),
        f"-Wl,-rpath,{lib_dir}:{nccl.parent}:{cudart.parent}",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so", delete=False) as tmp:
        pass
    proc = subprocess.run([*cmd, "-o", tmp.name], capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp.name)
        raise KilnError(
            f"building Kiln's NCCL backend failed ({cmd[0]} exited {proc.returncode}):\n"
            f"{proc.stderr.strip()[-4000:]}"
        )
    os.chmod(tmp.name, 0o755)  # the temporary file was made private
    os.replace(tmp.name, out)  # atomic: concurrent builders each write their own temp file
    return out


def _load_library(path: Path, what: str) -> None:
    try:
        ctypes.CDLL(str(path), mode=os.RTLD_GLOBAL)
    except OSError as e:
        raise KilnError(f"cannot load {what} ({e})") from None


def disco_module() -> ModuleType:
    """`tvm.runtime.disco`, usable: with its C++ half (libtvm_runtime_extra) loaded.

    `import tvm` loads libtvm_runtime_extra after importing tvm.runtime, whose `disco` import
    fails then and is left as None; a runtime-only `import tvm` never loads the library, and its
    `tvm.runtime.disco` has none of the C++ functions and no registered classes."""
    if tvm_ffi.get_global_func("runtime.disco.SessionThreaded", allow_missing=True) is None:
        extra = _tvm_lib_dir() / "libtvm_runtime_extra.so"
        if not extra.is_file():
            raise KilnError(
                f"this TVM installation has no Disco runtime ({extra.name} is missing): "
                "install the apache-tvm wheel Kiln pins"
            )
        _load_library(extra, "TVM's Disco runtime")
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
        _load_library(nccl_library(), "NCCL")  # first, so that the backend binds to this one
        _load_library(build(), "Kiln's NCCL backend")
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
