"""Writing an artifact directory and its manifest (the format is in kiln.runtime.artifact)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from kiln.runtime.artifact import FORMAT, FORMAT_VERSION, MANIFEST, file_entry

# Files a checkpoint may carry that the runtime's tokenizer and chat templates read.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)


def copy_tokenizer(model_dir: Path, out: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out / name)
            copied.append(name)
    return copied


def kiln_externs(executable: Any) -> list[str]:
    """Kiln's own functions (named kiln.*, e.g. kiln.cublas.matmul) that the compiled VM code
    calls: the manifest lists them under target.externs, and the runtime registers them before
    it runs the library (kiln.runtime.runner)."""
    # The VM's function table, one `@NAME packed_func;` line per function it calls by name.
    names = (
        line[1:].split()[0]
        for line in executable.as_text().splitlines()
        if line.startswith("@") and line.rstrip().endswith(" packed_func;")
    )
    return sorted({name for name in names if name.startswith("kiln.")})


def write_manifest(out: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Record every file under `out` with its sha256, then write manifest.json last, so a
    half-written artifact has no manifest and is never loaded."""
    files = {
        str(p.relative_to(out)): file_entry(p)
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **data, "files": files}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    tmp.replace(out / MANIFEST)
    return manifest
