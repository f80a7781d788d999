"""The artifact directory: its manifest, and checking every file before anything is trusted.

Layout (written by kiln.compiler.artifact):
    manifest.json            format version, model, quantization, target, entry points,
                             KV-cache geometry, versions, and sha256 + size of every file
    model-<target>.so        the compiled library (Relax VM executable + kernels); targets whose
                             code runs on one arch only build one per arch (model-rocm-gfx942.so),
                             listed under "libraries" (arch -> file)
    params/                  weights as safetensors shards + params-index.json; a
                             tensor-parallel artifact has one folder per GPU (params/rank-R/)
    tokenizer.json ...       the checkpoint's tokenizer files, when it had them
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.runtime.errors import KilnError

FORMAT = "kiln-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


@dataclass(frozen=True)
class Manifest:
    root: Path
    data: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return self.data["model"]["config"]

    @property
    def device(self) -> str:
        return self.data["target"]["device"]

    @property
    def model_dtype(self) -> str:
        return self.data["quantization"]["model_dtype"]

    @property
    def kv_cache(self) -> dict[str, Any]:
        return self.data["kv_cache"]

    @property
    def library(self) -> Path:
        return self.root / self.data["library"]

    def library_for(self, arch: str | None) -> Path:
        """The library to load on a device of `arch` (its gfx name on ROCm, else None)."""
        libraries = self.data.get("libraries")
        if not libraries:
            return self.library
        if arch not in libraries:
            raise KilnError(
                f"{self.root} has code for {', '.join(libraries)}, not for this {arch} device: "
                f"compile it again with --arch {arch}"
            )
        return self.root / libraries[arch]

    @property
    def params(self) -> list[dict[str, Any]]:
        """Each parameter's name, shape and dtype (one GPU's, when tensor-parallel) and file."""
        return self.data["params"]

    @property
    def tensor_parallel(self) -> int:
        """How many GPUs the model is sharded over (1: it is not)."""
        return int(self.data.get("tensor_parallel", 1))

    def param_files(self, entry: dict[str, Any]) -> list[str]:
        """The files holding parameter `entry`, one per rank: rank r's copy is in the r-th."""
        files = entry["files"] if "files" in entry else [entry["file"]]
        if len(files) != self.tensor_parallel:
            raise KilnError(
                f"{self.root / MANIFEST} lists {len(files)} files for {entry['name']}, one per "
                f"GPU of {self.tensor_parallel}: compile the artifact again"
            )
        return files


def read_manifest(root: str | Path, verify: bool = True) -> Manifest:
    """Read and check an artifact. With `verify`, every file's size and sha256 must match."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise KilnError(
            f"artifact {root} does not exist: compile one with `kiln compile MODEL --output {root}`"
        )
    path = root / MANIFEST
    if not path.is_file():
        raise KilnError(f"{root} is not a Kiln artifact (no {MANIFEST}): compile it with kiln")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KilnError(f"{path} is corrupt ({e}): compile the artifact again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise KilnError(f"{path} is not a Kiln manifest: compile the artifact again")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise KilnError(
            f"{root} has artifact format {version}, this Kiln reads format {FORMAT_VERSION}: "
            "recompile it with this version of kiln"
        )
    if verify:
        _verify_files(root, data.get("files", {}))
    return Manifest(root, data)


def _verify_files(root: Path, files: dict[str, dict[str, Any]]) -> None:
    if not files:
        raise KilnError(f"{root / MANIFEST} lists no files: compile the artifact again")
    for rel, entry in files.items():
        path = (root / rel).resolve()
        if root.resolve() not in path.parents:
            raise KilnError(f"{root / MANIFEST} names a file outside the artifact: {rel}")
        if not path.is_file():
            raise KilnError(f"artifact file {rel} is missing from {root}: compile it again")
        size = path.stat().st_size
        if size != entry["size"]:
            raise KilnError(
                f"artifact file {path} has {size} bytes, the manifest says {entry['size']}: "
                "it is truncated or was modified; compile or copy the artifact again"
            )
        if sha256_file(path) != entry["sha256"]:
            raise KilnError(
                f"artifact file {path} does not match its sha256 in the manifest: it was "
                "modified or corrupted; compile or copy the artifact again"
            )
