"""Kiln's native libraries: C++ built on first use, cached, loaded (shared by runtime/disco,
runtime/cublas, and, built with nvcc, runtime/attention and runtime/gemv).

Each library is one C++ file compiled with the machine's g++ against the headers of the
installed wheels (tvm-ffi's, TVM's, an NVIDIA package's) into $KILN_CACHE/<kind>/ (default
~/.cache/kiln) under a name keyed by what went into it (`source_key`: the sources, the TVM it
links against, the flags; never a path), so a library built on one machine loads on another with
the same TVM: copy the cache directory. Loading it (ctypes, RTLD_GLOBAL) runs its static
initializers, which register its global functions with tvm-ffi.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import tvm
import tvm_ffi

from kiln.runtime.errors import KilnError

FLAGS = ["-std=c++17", "-O2", "-fPIC", "-shared", "-fvisibility=hidden", "-Wl,--no-undefined"]
INSTALL_CUDA = "install the CUDA toolkit (or set CUDA_HOME), or pip install 'kiln[cuda]'"
# Host helpers the nvcc-built extern libraries (runtime/attention, runtime/gemv) include: one of
# each library's sources
CUDA_EXTERN_HEADER = Path(__file__).resolve().parent / "cuda_extern.cuh"
_ARCH = re.compile(r"^sm_(\d+)(a?)$")


def tvm_lib_dir() -> Path:
    # Where `import tvm` found libtvm_runtime (TVM_LIBRARY_PATH may point elsewhere).
    loaded = getattr(tvm.base, "_LOADED_LIBS", {}).get("tvm_runtime")
    if loaded is not None:
        return Path(loaded._name).resolve().parent
    return Path(tvm.__file__).resolve().parent / "lib"


def nvidia_dirs() -> list[Path]:
    """The `nvidia` package directories where pip puts NVIDIA's libraries (torch's too)."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):  # an import hook that refuses it: the sys.path scan remains
        spec = None
    found = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    # Not only the namespace package's: an `nvidia/__init__.py` somewhere would hide the rest.
    found += [Path(p) / "nvidia" for p in sys.path if p and (Path(p) / "nvidia").is_dir()]
    return list(dict.fromkeys(found))


def cuda_roots() -> list[Path]:
    """Where a CUDA toolkit or pip's CUDA 13 / CUDA 12 runtime packages may be, most specific
    first: $CUDA_HOME, the nvcc on PATH, /usr/local/cuda, pip's cu13/ and cuda_runtime/."""
    roots = [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(Path(nvcc).resolve().parent.parent)
    roots.append(Path("/usr/local/cuda"))
    for p in nvidia_dirs():  # nvidia-cuda-runtime: cu13/ (CUDA 13), cuda_runtime/ (CUDA 12)
        roots += [p / "cu13", p / "cuda_runtime"]
    return roots


def include_dirs(root: Path) -> list[Path]:
    return [root / "include", root / "targets" / "x86_64-linux" / "include"]


def cuda_include(what: str) -> Path:
    """CUDA runtime headers (cuda_runtime.h): the toolkit, else pip's."""
    for root in cuda_roots():
        for inc in include_dirs(root):
            if (inc / "cuda_runtime.h").is_file():
                return inc
    raise KilnError(
        f"building {what} needs the CUDA runtime headers (cuda_runtime.h), found none: "
        f"{INSTALL_CUDA}"
    )


def cudart_library(what: str) -> Path:
    """The CUDA runtime TVM's CUDA runtime links (libtvm_runtime_cuda.so needs libcudart.so.13)."""
    include = cuda_include(what)
    for lib in ("lib64", "lib"):
        if (include.parent / lib / "libcudart.so.13").is_file():
            return (include.parent / lib / "libcudart.so.13").resolve()
    raise KilnError(
        f"building {what} needs libcudart.so.13 next to {include}: install the CUDA 13 toolkit "
        "(or set CUDA_HOME), or pip install 'kiln[cuda]'"
    )


def find_nvcc() -> Path | None:
    """nvcc from $CUDA_HOME, PATH, /usr/local/cuda or pip's nvidia-cuda-nvcc, in that order."""
    for root in cuda_roots():
        if (root / "bin" / "nvcc").is_file():
            return root / "bin" / "nvcc"
    return None


def archs_at_least(archs: Sequence[str], min_sm: int) -> bool:
    """Whether there are `archs` ("sm_80", "sm_90a", ...) and each is sm_`min_sm` or newer."""
    numbers = [_ARCH.match(a) for a in archs]
    return bool(numbers) and all(m is not None and int(m[1]) >= min_sm for m in numbers)


def nvcc_flags(archs: Sequence[str], defines: Sequence[str] = ()) -> list[str]:
    """nvcc's flags for a library of device code (CUDA runtime from TVM's, not linked in): SASS
    for every arch and PTX for the newest, as kiln.targets.cuda builds the model's. An
    arch-specific one (sm_90a) gets its SASS; the PTX is then the plain arch's (compute_90),
    since arch-specific PTX runs on no other GPU. `defines` (NAME or NAME=VALUE) go to -D."""
    ordered = sorted(set(archs), key=lambda a: (int(_ARCH.match(a)[1]), a))
    gencode = []
    for i, arch in enumerate(ordered):
        name = arch.removeprefix("sm_")
        number = _ARCH.match(arch)[1]
        if i < len(ordered) - 1:
            gencode += ["-gencode", f"arch=compute_{name},code=sm_{name}"]
        elif name == number:
            gencode += ["-gencode", f"arch=compute_{name},code=[sm_{name},compute_{name}]"]
        else:
            gencode += ["-gencode", f"arch=compute_{name},code=sm_{name}"]
            gencode += ["-gencode", f"arch=compute_{number},code=compute_{number}"]
    return [
        "-std=c++17", "-O3", "--threads", "0", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden",
        "-Xlinker", "--no-undefined", "-cudart", "none", *gencode, *(f"-D{d}" for d in defines),
    ]  # fmt: skip


def nvcc_command(
    nvcc: Path, archs: Sequence[str], source: Path, what: str, defines: Sequence[str] = ()
) -> list[str]:
    """`nvcc` compiling `source` (tvm-ffi functions) into a library for `archs`, against
    tvm-ffi and the CUDA runtime TVM's CUDA runtime uses; `compile_library` runs it."""
    cudart = cudart_library(what)
    ffi_lib = Path(tvm_ffi.libinfo.find_libtvm_ffi()).parent
    return [
        str(nvcc),
        *nvcc_flags(archs, defines),
        str(source),
        f"-I{tvm_ffi.libinfo.find_include_path()}",
        f"-L{ffi_lib}",
        "-ltvm_ffi",
        # pip's CUDA runtime has no unversioned libcudart.so for -lcudart to find
        "-Xlinker",
        str(cudart),
        "-Xlinker",
        f"-rpath,{ffi_lib}:{cudart.parent}",
    ]


def compiler(what: str) -> str:
    for cxx in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cxx and shutil.which(cxx):
            return cxx
    raise KilnError(f"building {what} needs a C++ compiler: install g++ (or set CXX)")


def source_key(files: Iterable[Path], flags: Sequence[str] = FLAGS) -> str:
    """What a compiled library depends on: its source files (and headers), the TVM it links
    against and the flags; 16 hex digits."""
    h = hashlib.sha256()
    for path in files:
        h.update(path.read_bytes())
    # Module versions, not distribution metadata: a runtime-only copy of tvm has none.
    h.update(f"tvm {tvm.__version__} tvm_ffi {tvm_ffi.__version__}".encode())
    h.update(" ".join(flags).encode())
    return h.hexdigest()[:16]


def compile_library(out: Path, cmd: Sequence[str], what: str) -> Path:
    """Run `cmd -o out` (cmd: `compiler(what)`, `FLAGS`, sources and libraries), atomically:
    concurrent builders each write a temporary file of their own and rename it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so", delete=False) as tmp:
        pass
    proc = subprocess.run([*cmd, "-o", tmp.name], capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp.name)
        raise KilnError(
            f"building {what} failed ({cmd[0]} exited {proc.returncode}):\n"
            f"{proc.stderr.strip()[-4000:]}"
        )
    os.chmod(tmp.name, 0o755)  # the temporary file was made private
    os.replace(tmp.name, out)
    return out


def load_library(path: Path, what: str) -> None:
    try:
        ctypes.CDLL(str(path), mode=os.RTLD_GLOBAL)
    except OSError as e:
        raise KilnError(f"cannot load {what} ({e})") from None
