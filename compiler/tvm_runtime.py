"""The TVM runtime a package carries for each platform, taken from apache-tvm's wheel for it.

A device loads a package with only apache-tvm-ffi installed, so the package brings the rest of
TVM's runtime: `libtvm_runtime` and the vendor runtimes (`libtvm_runtime_cuda.so` on Linux,
`libtvm_runtime_metal.dylib` on macOS; the Linux wheels have no ROCm runtime) and the pure-Python
`tvm` modules that a runtime-only `import tvm` reads (about 1 MB; no tvm.relax, no compiler
library). They come from the wheel of the same apache-tvm version for that platform: the installed
one for this machine's platform, otherwise a wheel fetched once with `pip download` into
$KILN_CACHE/wheels (put one there by hand where there is no network). apache-tvm is Apache-2.0;
its LICENSE, NOTICE and third-party notices go into the package too.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

from kiln.runtime.errors import KilnError
from kiln.runtime.host import host_platform
from kiln.runtime.package import cache_root

# platform -> (pip --platform tag, how the wheel's file name starts its tag, how it ends)
WHEEL_TAGS = {
    "linux-x86_64": ("manylinux_2_28_x86_64", "manylinux", "_x86_64.whl"),
    "linux-aarch64": ("manylinux_2_28_aarch64", "manylinux", "_aarch64.whl"),
    "macos-arm64": ("macosx_11_0_arm64", "macosx", "_arm64.whl"),
}
# Runtime libraries Kiln loads (libtvm_runtime_extra holds disco, which Kiln does not use).
_LIBRARIES = tuple(f"libtvm_runtime{v}" for v in ("", "_cuda", "_rocm", "_metal"))
_LICENSES = ("LICENSE", "NOTICE")

# What the probe imports: everything the runtime needs from tvm, in runtime-only mode.
_PROBE = """
import json, os, sys
os.environ["TVM_USE_RUNTIME_LIB"] = "1"
import kiln.runtime.engine, kiln.runtime.model, kiln.runtime.runner
from tvm.runtime import vm
import tvm
root = os.path.dirname(tvm.__file__)
files = [m.__file__ for n, m in list(sys.modules.items()) if n == "tvm" or n.startswith("tvm.")]
print(json.dumps(sorted(os.path.relpath(f, root) for f in files if f)))
"""


@functools.cache
def python_files() -> tuple[str, ...]:
    """Paths under `tvm/` of the Python files a runtime-only import of Kiln's runtime reads,
    with all of tvm/runtime (parts of it are imported lazily)."""
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise KilnError(f"could not list the TVM runtime's Python files ({tail}): a Kiln bug")
    return tuple(json.loads(done.stdout.strip().splitlines()[-1]))


def _wanted(rel: str, modules: frozenset[str]) -> str | None:
    """Where a file of the wheel's `tvm/` goes in the package ("lib/..", "py", "license"),
    or None when the runtime does not need it."""
    name = rel.rsplit("/", 1)[-1]
    stem = name.split(".")[0]
    if rel.startswith("lib/") and rel.count("/") == 1 and stem in _LIBRARIES:
        return "runtime"
    if rel.endswith(".py") and (rel in modules or rel.startswith("runtime/")):
        return "runtime"
    if rel in _LICENSES or rel.startswith("licenses/"):
        return "license"
    return None


def _installed(version: str) -> Path | None:
    """This machine's installed `tvm` package, when it is apache-tvm `version`."""
    try:
        if importlib.metadata.version("apache-tvm") != version:
            return None
    except importlib.metadata.PackageNotFoundError:
        return None
    import tvm

    return Path(tvm.__file__).parent


def wheel(platform: str, version: str) -> Path:
    """apache-tvm `version`'s wheel for `platform`, from the cache or fetched with pip."""
    tag, start, end = WHEEL_TAGS[platform]
    folder = cache_root() / "wheels"

    def find() -> Path | None:
        hits = sorted(folder.glob(f"apache_tvm-{version}-py3-none-{start}*{end}"))
        return hits[0] if hits else None

    found = find()
    if found is None:
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--only-binary=:all:", "--platform", tag, "-d", str(folder),
               f"apache-tvm=={version}"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        found = find()
        if done.returncode != 0 or found is None:
            tail = (done.stderr.strip().splitlines() or ["no wheel came"])[-1]
            raise KilnError(
                f"could not fetch the apache-tvm {version} wheel for {platform} ({tail}): "
                f"check the network, or put the wheel ({tag}) into {folder}"
            )
    return found


def collect(platform: str, version: str) -> list[tuple[str, str, Callable[[], bytes]]]:
    """(kind, path under tvm/, reader) of every file the package takes for `platform`:
    kind "runtime" (goes to runtime/<platform>/tvm/) or "license"."""
    modules = frozenset(python_files())
    out: list[tuple[str, str, Callable[[], bytes]]] = []
    installed = _installed(version) if platform == host_platform() else None
    if installed is not None:
        for path in sorted(installed.rglob("*")):
            rel = path.relative_to(installed).as_posix()
            kind = _wanted(rel, modules) if path.is_file() else None
            if kind:
                out.append((kind, rel, path.read_bytes))
    else:
        whl = wheel(platform, version)
        zf = zipfile.ZipFile(whl)
        for info in zf.infolist():
            if info.filename.startswith("tvm/") and not info.is_dir():
                rel = info.filename[len("tvm/") :]
                kind = _wanted(rel, modules)
                if kind:
                    out.append((kind, rel, functools.partial(zf.read, info)))
    libs = [rel for kind, rel, _ in out if rel.startswith("lib/libtvm_runtime.")]
    if not libs:
        raise KilnError(f"the apache-tvm {version} files for {platform} have no libtvm_runtime")
    return out
