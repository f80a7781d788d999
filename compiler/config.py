"""Finding a checkpoint (local directory or hub id) and reading its config.json."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from kiln.runtime.errors import KilnError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a compile needs from a hub repository: never pickles, never other formats.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]


def resolve_model(model: str | Path) -> Path:
    """A local checkpoint directory, or a hub id fetched into the normal Hugging Face cache."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise KilnError(f"{path} is a file: pass the checkpoint directory that holds it")
        return path
    text = str(model)
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise KilnError(
            f"model path {text!r} does not exist: pass a checkpoint directory "
            "(with config.json and *.safetensors) or a hub id such as org/name"
        )
    return _download(text)


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # the hub client raises many types; all mean "could not fetch"
        raise KilnError(
            f"{repo_id!r} is not a local directory and could not be fetched from the hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); check "
            "the id and your network, or set HF_HUB_OFFLINE=1 to use the local cache only"
        ) from None


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise KilnError(
            f"{model_dir} has no config.json: point Kiln at a Hugging Face checkpoint directory"
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KilnError(f"{path} is not valid JSON ({e}): re-download it") from None
    if not isinstance(config, dict):
        raise KilnError(f"{path} must hold a JSON object")
    return config
