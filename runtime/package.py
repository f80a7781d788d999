"""Loading a `.kiln` package: one zip with libraries for several platforms and vendors, one copy
of the weights and tokenizer, and the TVM runtime of every platform in it.

Layout (written by kiln.compiler.package):
    manifest.json                  format version, the artifact fields all libraries share
                                   (model, quantization, params, KV cache), the libraries
                                   (platform, device, arch -> file), the runtimes, and the sha256
                                   and size of every other member
    params/ tokenizer.json ...     as in an artifact, once
    lib/<platform>/<device>/...    each compiled library
    runtime/<platform>/tvm/...     the Python files a runtime-only `import tvm` reads and the
                                   runtime libraries (libtvm_runtime, the vendor runtimes), from
                                   the apache-tvm wheel of that platform
    licenses/                      TVM's LICENSE, NOTICE and third-party notices

A package is untrusted input. Before anything in it is used, every member must be a regular file
named in the manifest with a plain relative path and the listed size, and its bytes must hash to
the listed sha256 as they are extracted; nothing else is written. The members go to
$KILN_CACHE/packages/<manifest hash>/ (default ~/.cache/kiln), and a later load of the same
package checks the package again and then the copy it loads.

The package's TVM runtime is put first on sys.path (in runtime-only mode) unless this process
has already imported TVM, which must then be the same version. So a device needs only NumPy,
tokenizers, jinja2 and apache-tvm-ffi (the `kiln-runtime` distribution), no apache-tvm.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from kiln.runtime import host
from kiln.runtime.artifact import FORMAT, FORMAT_VERSION, MANIFEST, Manifest, _verify_files
from kiln.runtime.errors import KilnError

PACKAGE_FORMAT = "kiln-package"
PACKAGE_VERSION = 1
SUFFIX = ".kiln"
_MAX_MANIFEST = 64 << 20
_COMPLETE = ".complete"  # written last into an extracted package


def cache_root() -> Path:
    root = os.environ.get("KILN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kiln"
    )
    return Path(root)


def is_package(path: str | Path) -> bool:
    """A file (not an artifact directory): loaders treat it as a package and check it."""
    return Path(path).expanduser().is_file()


# -- checking the zip ----------------------------------------------------------------------


def _refuse(package: Path, problem: str) -> KilnError:
    return KilnError(
        f"package {package} is refused: {problem}; it is damaged or was tampered with, get or "
        "build it again with `kiln package`"
    )


def _check_name(package: Path, name: str) -> None:
    """A member name must be a plain relative POSIX path that stays inside the folder."""
    parts = PurePosixPath(name).parts
    if (
        not name
        or "\\" in name
        or "\0" in name
        or name.startswith("/")
        or ":" in parts[0]
        or any(p in ("", ".", "..") for p in name.split("/"))
    ):
        raise _refuse(package, f"member {name!r} has a path outside the extraction folder")


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _read_manifest(package: Path, zf: zipfile.ZipFile) -> tuple[bytes, dict[str, Any]]:
    try:
        info = zf.getinfo(MANIFEST)
    except KeyError:
        raise _refuse(package, f"it has no {MANIFEST}") from None
    if info.file_size > _MAX_MANIFEST or _is_symlink(info):
        raise _refuse(package, f"its {MANIFEST} is not a plain file of reasonable size")
    raw = zf.read(info)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _refuse(package, f"its {MANIFEST} is not JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != PACKAGE_FORMAT:
        raise KilnError(f"{package} is not a Kiln package: make one with `kiln package`")
    if data.get("format_version") != PACKAGE_VERSION:
        raise KilnError(
            f"{package} has package format {data.get('format_version')}, this Kiln reads format "
            f"{PACKAGE_VERSION}: package it again with this version of kiln"
        )
    files = data.get("files")
    if not isinstance(files, dict) or not files:
        raise _refuse(package, f"its {MANIFEST} lists no files")
    for name, entry in files.items():
        _check_name(package, name)
        if (
            name == MANIFEST
            or not isinstance(entry, dict)
            or not isinstance(entry.get("size"), int)
            or not isinstance(entry.get("sha256"), str)
        ):
            raise _refuse(package, f"its {MANIFEST} has a bad entry for {name!r}")
    return raw, data


def _check_members(package: Path, zf: zipfile.ZipFile, files: dict[str, Any]) -> None:
    """Every member a regular file listed in the manifest with its size; none missing."""
    seen: set[str] = set()
    for info in zf.infolist():
        name = info.filename
        _check_name(package, name.rstrip("/") if info.is_dir() else name)
        if name in seen:
            raise _refuse(package, f"member {name} appears twice")
        seen.add(name)
        if _is_symlink(info):
            raise _refuse(package, f"member {name} is a symbolic link")
        if info.is_dir():
            raise _refuse(package, f"member {name} is a directory entry")
        if name == MANIFEST:
            continue
        if name not in files:
            raise _refuse(package, f"member {name} is not in the manifest")
        if info.file_size != files[name]["size"]:
            raise _refuse(
                package,
                f"member {name} has {info.file_size} bytes, the manifest says "
                f"{files[name]['size']} (truncated or modified)",
            )
    missing = sorted(set(files) - seen)
    if missing:
        raise _refuse(package, f"member {missing[0]} is missing (truncated?)")


def _copy_checked(
    package: Path, zf: zipfile.ZipFile, name: str, entry: dict[str, Any], out: Path | None
) -> None:
    """Stream one member, hashing it; write it to `out` unless None. Never reads past the
    listed size, so a member that lies about its size cannot fill the disk."""
    digest, size = hashlib.sha256(), 0
    dest = open(out, "xb") if out is not None else None  # closed below
    try:
        with zf.open(name) as src:
            while chunk := src.read(1 << 22):
                size += len(chunk)
                if size > entry["size"]:
                    break
                digest.update(chunk)
                if dest is not None:
                    dest.write(chunk)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise _refuse(package, f"member {name} cannot be read ({e})") from None
    finally:
        if dest is not None:
            dest.close()
    if size != entry["size"]:
        raise _refuse(package, f"member {name} has more or fewer bytes than the manifest says")
    if digest.hexdigest() != entry["sha256"]:
        raise _refuse(package, f"member {name} does not match its sha256 in the manifest")


def extract(package: str | Path) -> tuple[Path, dict[str, Any], bool]:
    """Check `package` member by member and extract it into the cache (once).
    Returns (folder, manifest data, whether this call extracted it)."""
    package = Path(package).expanduser()
    try:
        zf = zipfile.ZipFile(package)
    except (zipfile.BadZipFile, OSError) as e:
        with open(package, "rb") as f:
            if f.read(4) == b"PK\x03\x04":
                raise _refuse(package, "it is not a complete zip file (truncated?)") from None
        raise KilnError(
            f"{package} is not a Kiln package or artifact ({e}): give an artifact directory or "
            "a .kiln file made by `kiln package`"
        ) from None
    with zf:
        raw, data = _read_manifest(package, zf)
        files = data["files"]
        _check_members(package, zf, files)
        dest = cache_root() / "packages" / hashlib.sha256(raw).hexdigest()[:32]
        cached = (dest / _COMPLETE).is_file()
        staging = None
        if not cached:
            staging = dest.parent / f".{dest.name}.{os.getpid()}.partial"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        try:
            for name, entry in files.items():
                out = None
                if staging is not None:
                    out = staging / name
                    out.parent.mkdir(parents=True, exist_ok=True)
                _copy_checked(package, zf, name, entry, out)
            if staging is not None:
                (staging / MANIFEST).write_bytes(raw)
                (staging / _COMPLETE).write_text("")
                if dest.exists():  # an interrupted extraction left it without its marker
                    shutil.rmtree(dest, ignore_errors=True)
                try:
                    staging.rename(dest)
                except OSError:  # another process finished the same package first
                    shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise
    return dest, data, not cached


# -- choosing a library --------------------------------------------------------------------


def _describe(lib: dict[str, Any]) -> str:
    arch = lib.get("arch")
    return f"{lib['platform']} {lib['device']}" + (f" ({arch})" if arch else "")


def choose(package: Path, data: dict[str, Any], device: str) -> tuple[list[dict[str, Any]], str]:
    """The libraries (one, or one per GPU arch) that serve `device` on this machine, and the
    device to open ("auto": the best kind this machine has that the package serves)."""
    here = host.host_platform()
    libraries = data.get("libraries") or []
    mine = [lib for lib in libraries if lib.get("platform") == here]
    kind, _, index = device.partition(":")
    if kind not in ("auto", "cpu", "cuda", "rocm", "metal") or (index and not index.isdigit()):
        raise KilnError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N, rocm or metal")
    if kind == "auto":
        found = host.devices()
        for candidate in found:
            picked = [lib for lib in mine if lib["device"] == candidate]
            if picked:
                return picked, candidate
        wanted = f"this {here} machine has {', '.join(found)}"
    else:
        picked = [lib for lib in mine if lib["device"] == kind]
        if picked:
            return picked, device
        wanted = f"device {device} was asked for on this {here} machine"
    has = ", ".join(_describe(lib) for lib in libraries) or "none"
    raise KilnError(
        f"package {package} has no library for this machine: it has {has}; {wanted}. Compile "
        f"the model for it (kiln compile --target {kind if kind != 'auto' else 'cpu'} "
        f"--platform {here}) and add that artifact to the package"
    )


def _view(root: Path, data: dict[str, Any], picked: list[dict[str, Any]]) -> Manifest:
    """The artifact manifest the runner reads: the shared fields, the chosen library (or one per
    arch) and, under "files", everything it loads, the package's TVM runtime included."""
    shared = data["artifact"]
    lib = picked[0]
    view = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **shared,
        "target": lib["target"],
        "library": lib["file"],
        "versions": lib.get("versions", {}),
    }
    if lib.get("arch") is not None and lib["device"] == "rocm":
        view["libraries"] = {x["arch"]: x["file"] for x in picked}
    runtime = data["runtimes"].get(lib["platform"], {}).get("path", "")
    needed = set(data.get("shared_files", [])) | {x["file"] for x in picked}
    view["files"] = {
        name: entry
        for name, entry in data["files"].items()
        if name in needed or (runtime and name.startswith(runtime + "/"))
    }
    return Manifest(root, view)


# -- the TVM runtime -----------------------------------------------------------------------


def activate_runtime(root: Path, data: dict[str, Any], platform: str) -> None:
    """Make `import tvm` load the package's runtime for `platform` (runtime-only mode), or check
    that the TVM this process already imported is the version the package was built with."""
    runtime = data.get("runtimes", {}).get(platform)
    if runtime is None:
        raise KilnError(
            f"the package has no TVM runtime for {platform}: package it again with kiln package"
        )
    if "tvm" in sys.modules:
        have = getattr(sys.modules["tvm"], "__version__", "?")
        if have != runtime["tvm"]:
            raise KilnError(
                f"this process already imported TVM {have}, the package was built with "
                f"{runtime['tvm']}: load the package in a new Python process"
            )
        return
    try:
        import tvm_ffi  # noqa: F401  (the light install's one compiled dependency)
    except ImportError:
        raise KilnError(
            "loading a Kiln package needs apache-tvm-ffi: pip install kiln-runtime (or kiln)"
        ) from None
    path = str(root / runtime["path"])
    if path not in sys.path:
        sys.path.insert(0, path)
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"


def open_package(path: str | Path, device: str, verify: bool = True) -> tuple[Manifest, str]:
    """Check and extract a package, pick the library for `device`, make its TVM runtime the one
    `import tvm` loads; returns the artifact manifest to run and the device to open."""
    package = Path(path).expanduser().resolve()
    root, data, fresh = extract(package)
    try:
        picked, device = choose(package, data, device)
        manifest = _view(root, data, picked)
    except (KeyError, TypeError) as e:
        raise _refuse(package, f"its manifest is incomplete ({e})") from None
    if verify and not fresh:  # the cached copy is what loads: check it too
        _verify_files(root, manifest.data["files"])
    activate_runtime(root, data, picked[0]["platform"])
    return manifest, device


def peek(path: str | Path) -> dict[str, Any]:
    """The fields all of a package's libraries share (model, params, KV cache), unchecked."""
    package = Path(path).expanduser()
    try:
        with zipfile.ZipFile(package) as zf:
            return _read_manifest(package, zf)[1]["artifact"]
    except (zipfile.BadZipFile, OSError, KeyError) as e:
        raise KilnError(
            f"{package} is not a Kiln package or artifact ({e}): give an artifact directory or "
            "a .kiln file made by `kiln package`"
        ) from None
