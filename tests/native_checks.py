"""Running Kiln's native libraries (runtime/native.py) the way a device runs them, shared by
tests/runtime (pytest puts tests/ on the path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_without_compiler(
    code: str, cache: Path, build_module: str | None = None, unset: tuple[str, ...] = ()
) -> str:
    """Run `code` in a fresh Python with a runtime-only TVM, `cache` as KILN_CACHE, the `unset`
    variables removed and no C++ compiler to be found; first, with `build_module` (e.g.
    kiln.runtime.cublas), build the library into that cache where a compiler is. Returns the
    code's stdout; fails on an error."""
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1", "KILN_CACHE": str(cache)}
    for name in unset:
        env.pop(name, None)
    if build_module:
        made = subprocess.run(
            [sys.executable, "-m", build_module], env=env, capture_output=True, text=True
        )
        assert made.returncode == 0, made.stderr
    env["PATH"] = str(cache / "no-bin")
    env["CXX"] = "/nonexistent"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return out.stdout
