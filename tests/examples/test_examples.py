"""The scripts in examples/ run as a user would run them."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_quickstart_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "logits: (10, 2048)" in out.stdout
    assert (tmp_path / "build" / "tiny-llama" / "manifest.json").is_file()


def test_tiny_checkpoint_is_reproducible(tmp_path):
    """The shipped checkpoint's weights and config are what its generator makes."""
    subprocess.run(
        [sys.executable, str(EXAMPLES / "make_tiny_checkpoint.py"), "--output", str(tmp_path)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    for name in ("model.safetensors", "config.json", "tokenizer_config.json"):
        digest = [
            hashlib.sha256((d / name).read_bytes()).hexdigest()
            for d in (tmp_path, EXAMPLES / "tiny-llama")
        ]
        assert digest[0] == digest[1], name
