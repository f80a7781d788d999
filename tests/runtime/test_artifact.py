"""Loading a damaged or mismatched artifact: `kiln run` prints one `error:` line and exits
non-zero without a traceback; `kiln.load` raises KilnError with the same message."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_contract import invoke, one_error

import kiln
from kiln.runtime.artifact import MANIFEST, read_manifest
from kiln.runtime.errors import KilnError


def params_file(art: Path) -> Path:
    return art / read_manifest(art, verify=False).params[0]["file"]


def flip_byte(art: Path) -> Path:
    path = params_file(art)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return path


def truncate(art: Path) -> Path:
    path = params_file(art)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    return path


def edit_manifest(change: Callable[[dict], object]) -> Callable[[Path], Path]:
    def damage(art: Path) -> Path:
        path = art / MANIFEST
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
        return path

    return damage


def break_manifest(art: Path) -> Path:
    path = art / MANIFEST
    path.write_text("{")
    return path


def delete_library(art: Path) -> Path:
    path = read_manifest(art, verify=False).library
    path.unlink()
    return path


# damage(artifact) -> the file it touched; needles may name it as "{path}" / "{name}".
DAMAGE = {
    "tampered": (flip_byte, ["{path}", "sha256"]),
    "truncated": (truncate, ["{path}", "bytes", "truncated"]),
    "future-format": (edit_manifest(lambda m: m.update(format_version=999)), ["999", "recompile"]),
    "manifest-not-json": (break_manifest, ["{path}", "corrupt"]),
    "library-deleted": (delete_library, ["{name}", "missing"]),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_run_damaged_artifact(case, artifact, tmp_path):
    damage, needles = DAMAGE[case]
    art = shutil.copytree(artifact("tiny-llama"), tmp_path / "art")
    touched = damage(art)
    needles = [n.format(path=touched, name=touched.name) for n in needles]
    line = one_error(*invoke("run", art, "--prompt", "hi"), *needles)
    with pytest.raises(KilnError) as caught:
        kiln.load(art)
    assert line == f"error: {caught.value}"


def test_run_wrong_paths_and_options(artifact, tmp_path):
    missing = tmp_path / "nope"
    one_error(*invoke("run", missing, "--prompt", "hi"), str(missing), "does not exist")
    (tmp_path / "notes.txt").write_text("not an artifact")
    one_error(*invoke("run", tmp_path, "--prompt", "hi"), str(tmp_path), "not a Kiln artifact")

    art = artifact("tiny-llama")
    one_error(*invoke("run", art, "--prompt", "hi", "--device", "tpu"), "'tpu'", "cuda")
    one_error(*invoke("run", art, "--prompt", "hi", "--device", "cuda"), "compiled for cpu")
    one_error(*invoke("run", art, "--prompt", "hi", "--temperature", "-1"), "temperature", ">= 0")
    with pytest.raises(KilnError, match="compiled for cpu"):
        kiln.load(art, device="cuda")


def test_tampered_artifact_on_the_console(artifact, tmp_path):
    art = shutil.copytree(artifact("tiny-llama"), tmp_path / "art")
    path = flip_byte(art)
    env = {k: v for k, v in os.environ.items() if k != "KILN_DEBUG"}
    proc = subprocess.run(
        [sys.executable, "-m", "kiln.compiler.cli", "run", str(art), "--prompt", "hi"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    one_error(proc.returncode, proc.stdout, proc.stderr, str(path), "sha256")
