"""`kiln compile --platform`: host code for another OS or CPU, linked by the ziglang wheel.

Checked on the files: the ELF header and what the library needs from the system (glibc no newer
than the 2.28 the apache-tvm wheels need). That the aarch64 code runs is checked under emulation
(tests/runtime/test_package_emulated.py).
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
from pathlib import Path

import pytest
from cli_contract import invoke, one_error

import kiln
from kiln.runtime.host import host_platform, library_platform

EM_AARCH64, ET_DYN = 0xB7, 3


def elf_header(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:20]
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not a 64-bit ELF"  # ELFCLASS64
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    return e_type, e_machine


def needs(path: Path) -> tuple[set[str], set[str]]:
    """Shared libraries and glibc symbol versions a library needs (readelf)."""
    dynamic = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True).stdout
    versions = subprocess.run(["readelf", "-V", str(path)], capture_output=True, text=True).stdout
    return set(re.findall(r"NEEDED.*\[(.+)\]", dynamic)), set(re.findall(r"GLIBC_[\d.]+", versions))


def manifest(art: Path) -> dict:
    return json.loads((art / "manifest.json").read_text())


@pytest.mark.skipif(host_platform() == "linux-aarch64", reason="cross-compiles from elsewhere")
def test_cpu_library_for_linux_aarch64(checkpoint, tmp_path):
    art = kiln.compile(str(checkpoint("tiny-llama")), platform="linux-aarch64", output=tmp_path)
    data = manifest(art)
    lib = art / data["library"]
    assert data["target"]["platform"] == "linux-aarch64"
    assert elf_header(lib) == (ET_DYN, EM_AARCH64)
    assert library_platform(lib) == "linux-aarch64"
    libs, glibc = needs(lib)
    assert libs <= {"libc.so.6", "libm.so.6"}, libs
    newest = max(tuple(map(int, v.removeprefix("GLIBC_").split("."))) for v in glibc)
    assert newest <= (2, 28), glibc


def test_cuda_library_for_a_jetson(checkpoint, tmp_path, monkeypatch):
    """aarch64 host code and sm_87 SASS: what a Jetson Orin runs."""
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    art = kiln.compile(
        str(checkpoint("tiny-llama")),
        target="cuda",
        arch="sm_87",
        platform="linux-aarch64",
        output=tmp_path / "jetson",
    )
    data = manifest(art)
    assert data["target"]["platform"] == "linux-aarch64"
    assert data["target"]["device_code"]["images"] == ["elf:sm_87", "ptx:sm_87"]
    assert elf_header(art / data["library"]) == (ET_DYN, EM_AARCH64)


def cli_error(*args: object) -> str:
    """The one error line of a kiln command that must fail as a user mistake (exit 1)."""
    code, out, err = invoke(*args)
    assert code == 1, (out, err)
    return one_error(code, out, err)


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--platform", "windows-x86_64"], ["unknown platform", "linux-aarch64", "macos-arm64"]),
        (["--target", "metal", "--platform", "linux-x86_64"], ["metal", "runs on macos-arm64"]),
        (["--target", "rocm", "--platform", "linux-aarch64"], ["rocm", "runs on linux-x86_64"]),
        (["--platform", "linux-aarch64", "--arch", "skylake"], ["skylake", "aarch64"]),
    ],
)
def test_platform_mistakes_are_one_line(args, needles, checkpoint, tmp_path):
    line = cli_error("compile", checkpoint("tiny-llama"), *args, "-o", tmp_path / "out")
    for needle in needles:
        assert needle in line, line
    assert not (tmp_path / "out").exists()
