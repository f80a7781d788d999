"""A linux-aarch64 package run as aarch64 code: Debian arm64's Python under qemu-user runs the
light runtime (kiln-runtime with numpy, tokenizers, jinja2 and apache-tvm-ffi wheels for
aarch64), which loads the package's aarch64 TVM runtime and the cross-compiled model library.
Its greedy tokens must equal those of the x86_64 artifact run natively.

Slow (an arm64 root, several minutes of emulation), so opt-in: KILN_EMULATION_TESTS=1. Needs
qemu-aarch64-static; the root comes from $KILN_ARM64_ROOT or is made once (as root, with
debootstrap: make_arm64_root.sh) in $KILN_CACHE/emulation/arm64-root.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import kiln
from kiln.compiler.package import build_package
from kiln.runtime.package import cache_root

pytestmark = [
    pytest.mark.emulated,
    pytest.mark.skipif(
        os.environ.get("KILN_EMULATION_TESTS") != "1",
        reason="runs aarch64 code under qemu: opt in with KILN_EMULATION_TESTS=1",
    ),
]

REPO = Path(__file__).resolve().parents[2]
QEMU = "qemu-aarch64-static"
PROMPT = [1, 5, 9, 30, 77]
TOKENS = 16


def run(cmd: list[str], **kwargs) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{cmd[:3]}: {done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def arm64_root() -> Path:
    if shutil.which(QEMU) is None:
        pytest.fail(f"{QEMU} is not installed (Debian: apt-get install qemu-user-static)")
    root = Path(os.environ.get("KILN_ARM64_ROOT") or cache_root() / "emulation" / "arm64-root")
    if not (root / "usr" / "bin" / "python3").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.parent.mkdir(parents=True, exist_ok=True)
        run(["sh", str(Path(__file__).with_name("make_arm64_root.sh")), str(root)])
    return root


def emulated_python(root: Path) -> list[str]:
    return [QEMU, "-L", str(root), str(root / "usr" / "bin" / "python3")]


@pytest.fixture(scope="module")
def site(arm64_root, tmp_path_factory) -> Path:
    """kiln-runtime and its dependencies' aarch64 wheels, unpacked for the root's Python."""
    version = run([*emulated_python(arm64_root), "-c",
                   "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"]).strip()
    work = tmp_path_factory.mktemp("aarch64-site")
    src = work / "src"
    shutil.copytree(REPO / "runtime-dist", src / "runtime-dist")
    shutil.copytree(REPO / "runtime", src / "runtime", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "__init__.py", src / "__init__.py")
    pip = [sys.executable, "-m", "pip"]
    run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(work / "wheels"),
         str(src / "runtime-dist")])  # fmt: skip
    (runtime_wheel,) = (work / "wheels").glob("kiln_runtime-*.whl")
    # pip matches --platform literally: name the older manylinux tags wheels are published for
    older = ("manylinux_2_28", "manylinux_2_17", "manylinux2014")
    tags = [f"--platform={t}_aarch64" for t in older]
    run([*pip, "download", "-q", "--only-binary=:all:", *tags, "--python-version", version,
         "-d", str(work / "wheels"), str(runtime_wheel)])  # fmt: skip
    out = work / "site"
    for wheel in (work / "wheels").glob("*.whl"):
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(out)
    return out


def test_aarch64_package_under_emulation(artifact, checkpoint, arm64_root, site, tmp_path):
    native = artifact("tiny-llama")
    want = kiln.load(native).generate_ids(PROMPT, max_tokens=TOKENS, temperature=0,
                                          ignore_eos=True)  # fmt: skip
    arm = kiln.compile(str(checkpoint("tiny-llama")), platform="linux-aarch64",
                       output=tmp_path / "aarch64")  # fmt: skip
    pkg = build_package([native, arm], tmp_path / "tiny.kiln")
    script = f"""
import json, platform, kiln
m = kiln.load({str(pkg)!r}, device="auto")
import tvm
print(json.dumps({{
    "machine": platform.machine(),
    "library": str(m.manifest.library),
    "tvm": tvm.__file__,
    "ids": m.generate_ids({PROMPT}, max_tokens={TOKENS}, temperature=0, ignore_eos=True),
}}))
"""
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(site),
           "KILN_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path)}  # fmt: skip
    out = json.loads(run([*emulated_python(arm64_root), "-c", script], env=env).splitlines()[-1])
    assert out["machine"] == "aarch64"
    assert "/lib/linux-aarch64/cpu/" in out["library"]
    assert "/runtime/linux-aarch64/tvm/" in out["tvm"]
    assert out["ids"] == want
