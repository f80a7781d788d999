"""`kiln package`: artifacts of one model -> one `.kiln` file (the format: kiln.runtime.package).

The artifacts may be built for several targets and platforms (CUDA on x86_64 and on a Jetson,
ROCm, Metal, the CPU), but must hold the same weights: the package keeps one copy of the weights
and the tokenizer, each library, and the TVM runtime of every platform among them.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import kiln
from kiln.compiler import tvm_runtime
from kiln.runtime.artifact import MANIFEST, Manifest, read_manifest
from kiln.runtime.errors import KilnError
from kiln.runtime.host import PLATFORMS, library_platform
from kiln.runtime.package import PACKAGE_FORMAT, PACKAGE_VERSION

# Artifact fields every library of a package must agree on (they describe the weights).
SHARED = ("model", "quantization", "entry_points", "params", "kv_cache", "tokenizer")


def _shared(m: Manifest) -> dict[str, Any]:
    data = {k: m.data.get(k) for k in SHARED}
    data["model"] = {k: v for k, v in data["model"].items() if k != "source"}
    return data


def _shared_files(m: Manifest) -> dict[str, dict[str, Any]]:
    """The weights and tokenizer files: everything but the libraries."""
    libs = {m.data["library"], *(m.data.get("libraries") or {}).values()}
    return {rel: e for rel, e in m.data["files"].items() if rel not in libs}


def _libraries(m: Manifest) -> list[dict[str, Any]]:
    """One entry per library of an artifact: its platform (recorded at compile time, checked
    against the file's header), device, arch (ROCm: one library per gfx) and target details."""
    target = m.data["target"]
    per_arch = m.data.get("libraries") or {None: m.data["library"]}
    out = []
    for arch, rel in per_arch.items():
        found = library_platform(m.root / rel)
        recorded = target.get("platform", found)
        if found is None or found != recorded:
            raise KilnError(
                f"{m.root / rel} is built for {found or 'an unknown platform'}, its manifest "
                f"says {recorded}: compile the artifact again"
            )
        out.append(
            {
                "platform": found,
                "device": target["device"],
                "arch": arch,
                "file": f"lib/{found}/{target['device']}/{Path(rel).name}",
                "source": str(m.root / rel),
                "target": target,
                "versions": m.data.get("versions", {}),
            }
        )
    return out


def _plan(artifacts: Sequence[Manifest]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    first = artifacts[0]
    shared, files = _shared(first), _shared_files(first)
    libraries: list[dict[str, Any]] = []
    for m in artifacts:
        if _shared(m) != shared or _shared_files(m) != files:
            raise KilnError(
                f"{m.root} and {first.root} hold different weights (model, quantization or "
                "converted files differ): package artifacts compiled from the same checkpoint "
                "with the same --quantization"
            )
        for lib in _libraries(m):
            clash = [x for x in libraries if (x["platform"], x["device"], x["arch"]) ==
                     (lib["platform"], lib["device"], lib["arch"])]  # fmt: skip
            if clash:
                raise KilnError(
                    f"{clash[0]['source']} and {lib['source']} are both {lib['platform']} "
                    f"{lib['device']} libraries: give one (for CUDA, compile one library with "
                    "every --arch you need)"
                )
            libraries.append(lib)
    versions = {x["versions"].get("tvm") for x in libraries}
    if len(versions) != 1 or None in versions:
        raise KilnError(
            f"the artifacts were built with different TVM versions ({sorted(map(str, versions))}):"
            " compile them all with this Kiln"
        )
    return {"shared": shared, "files": files, "tvm": versions.pop()}, libraries


class _Writer:
    """Adds members to the zip and records their sha256 and size for the manifest."""

    def __init__(self, zf: zipfile.ZipFile):
        self.zf, self.files = zf, {}

    def add(self, name: str, data: bytes | Path, compress: bool = True) -> None:
        if name in self.files:
            raise KilnError(f"two package members would be named {name} (a Kiln bug)")
        method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
        info.compress_type = method
        info.external_attr = 0o100644 << 16  # a regular file
        digest, size = hashlib.sha256(), 0
        with self.zf.open(info, "w", force_zip64=True) as out:
            if isinstance(data, Path):
                with open(data, "rb") as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
            else:
                digest.update(data)
                size = len(data)
                out.write(data)
        self.files[name] = {"sha256": digest.hexdigest(), "size": size}


def build_package(
    artifacts: Sequence[str | Path],
    output: str | Path,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write one `.kiln` package from `artifacts` (directories of one model); returns its path."""
    say = progress or (lambda _msg: None)
    if not artifacts:
        raise KilnError("give at least one artifact directory to package")
    manifests = [read_manifest(a) for a in artifacts]  # every file checked
    plan, libraries = _plan(manifests)
    output = Path(output).expanduser().resolve()
    if output.is_dir():
        raise KilnError(f"output {output} is a directory: give a file path such as model.kiln")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.{os.getpid()}.partial"
    platforms = sorted({lib["platform"] for lib in libraries}, key=PLATFORMS.index)
    try:
        with zipfile.ZipFile(staging, "w") as zf:
            w = _Writer(zf)
            for rel in plan["files"]:
                say(f"adding {rel}")
                w.add(rel, manifests[0].root / rel, compress=not rel.startswith("params/"))
            for lib in libraries:
                say(f"adding the {lib['platform']} {lib['device']} library")
                w.add(lib["file"], Path(lib["source"]))
            runtimes, licenses = {}, set()
            for platform in platforms:
                say(f"adding the TVM {plan['tvm']} runtime for {platform}")
                for kind, rel, read in tvm_runtime.collect(platform, plan["tvm"]):
                    name = f"runtime/{platform}/tvm/{rel}" if kind == "runtime" else None
                    if name is None and rel not in licenses:
                        licenses.add(rel)
                        w.add(f"licenses/tvm/{rel}", read())
                    elif name is not None:
                        w.add(name, read())
                runtimes[platform] = {
                    "path": f"runtime/{platform}",
                    "tvm": plan["tvm"],
                    "source": f"apache-tvm {plan['tvm']} wheel for {platform}",
                }
            manifest = {
                "format": PACKAGE_FORMAT,
                "format_version": PACKAGE_VERSION,
                "kiln": kiln.__version__,
                "artifact": plan["shared"],
                "shared_files": sorted(plan["files"]),
                "libraries": [
                    {k: v for k, v in lib.items() if k != "source"} for lib in libraries
                ],
                "runtimes": runtimes,
                "licenses": sorted(f"licenses/tvm/{rel}" for rel in licenses),
                "files": w.files,
            }
            w_manifest = json.dumps(manifest, indent=1).encode()
            info = zipfile.ZipInfo(MANIFEST, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = 0o100644 << 16
            zf.writestr(info, w_manifest, compress_type=zipfile.ZIP_DEFLATED)
        staging.replace(output)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    say(f"wrote {output}")
    return output
