"""The ROCm target on a machine without an AMD GPU: one library per gfx arch, each carrying a
linked code object for that arch that defines every kernel the host code launches.

Loading and running needs an AMD GPU and a TVM runtime built with ROCm (the PyPI wheel has none),
so what is checked here is the code itself: its ELF header and symbols, and (where an
llvm-objdump new enough for code-object v6 is installed, e.g. Debian's llvm-22) its disassembly.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

import kiln
from kiln.compiler.cli import main
from kiln.runtime.artifact import read_manifest
from kiln.runtime.errors import KilnError
from kiln.targets import amd_gpu_archs, detect_target, rocm
from kiln.targets.blob import kernel_names, split_device_payload

ARCHS = ["gfx90a", "gfx942", "gfx1100"]
# EF_AMDGPU_MACH_* (the low byte of e_flags) and the wavefront size each arch's code runs with
MACH = {"gfx90a": 0x3F, "gfx942": 0x4C, "gfx1100": 0x41}
WAVE = {"gfx90a": 64, "gfx942": 64, "gfx1100": 32}
# every family once, spread over the archs; tiny-llama gets all three (rocm_all)
FAMILIES = {"llama": "gfx942", "llama3": "gfx1100", "mistral": "gfx90a", "mixtral": "gfx942"}


def code_object(library: Path) -> tuple[list[str], bytes]:
    """(kernel names, code object) of the ROCm module embedded in a compiled library."""
    data = library.read_bytes()
    at = data.index((5).to_bytes(8, "little") + b"hsaco")
    size = int.from_bytes(data[at - 8 : at], "little")
    fmt, fmap, hsaco = split_device_payload(data[at : at + size])
    assert fmt == "hsaco"
    return kernel_names(fmap), hsaco


def check_library(library: Path, arch: str) -> list[str]:
    names, hsaco = code_object(library)
    co = rocm.read_code_object(hsaco)
    assert co.machine == 224  # EM_AMDGPU
    assert (co.mach, co.arch, co.version) == (MACH[arch], arch, 6)
    assert names and not [n for n in names if n not in co.defined or f"{n}.kd" not in co.defined]
    # nothing left to resolve at load: no device-library calls (__ocml_*, __ockl_*), no others
    assert not co.undefined
    waves = set(re.findall(rb"\xaf\.wavefront_size(.)", hsaco))  # msgpack: fixstr key, fixint
    assert waves == {bytes([WAVE[arch]])}
    return names


@pytest.fixture(scope="module")
def rocm_all(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rocm") / "tiny"
    return kiln.compile(
        str(checkpoint("tiny-llama")), target="rocm", quantization="q0f16", output=out
    )


def test_one_library_per_arch_each_with_its_code_object(rocm_all):
    manifest = read_manifest(rocm_all)  # checks every file's sha256
    data = manifest.data
    assert data["libraries"] == {a: f"model-rocm-{a}.so" for a in ARCHS}
    assert data["library"] == "model-rocm-gfx90a.so"
    assert data["target"]["arch"] == ",".join(ARCHS)
    for arch in ARCHS:
        recorded = data["target"]["device_code"][arch]
        assert (recorded["format"], recorded["code_object_version"]) == ("hsaco", 6)
        assert json.loads(recorded["tvm_target"])["mcpu"] == arch
        names = check_library(rocm_all / data["libraries"][arch], arch)
        assert sorted(names) == recorded["kernels"]


def test_runtime_picks_the_library_for_the_device_arch(rocm_all, artifact):
    manifest = read_manifest(rocm_all, verify=False)
    for arch in ARCHS:
        assert manifest.library_for(arch) == rocm_all / f"model-rocm-{arch}.so"
    with pytest.raises(KilnError, match="--arch gfx1030"):
        manifest.library_for("gfx1030")
    cpu = read_manifest(artifact("tiny-llama"), verify=False)
    assert cpu.library_for(None) == cpu.library


def llvm_objdump() -> str | None:
    """An llvm-objdump that reads code-object v6 for gfx942/gfx1100 (LLVM 19 or newer)."""
    for name in [*(f"llvm-objdump-{v}" for v in range(30, 18, -1)), "llvm-objdump"]:
        path = shutil.which(name)
        if path:
            out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
            found = re.search(r"LLVM version (\d+)", out)
            if found and int(found[1]) >= 19:
                return path
    return None


@pytest.mark.skipif(llvm_objdump() is None, reason="needs llvm-objdump >= 19 (Debian llvm-22)")
def test_code_objects_disassemble_for_their_arch(rocm_all, tmp_path):
    for arch in ARCHS:
        names, hsaco = code_object(rocm_all / f"model-rocm-{arch}.so")
        path = tmp_path / f"{arch}.hsaco"
        path.write_bytes(hsaco)
        done = subprocess.run(
            [llvm_objdump(), "-d", f"--mcpu={arch}", str(path)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        assert "elf64-amdgpu" in done.stdout and "<unknown>" not in done.stdout
        labels = set(re.findall(r"^[0-9a-f]+ <(\w+)>:$", done.stdout, re.M))
        assert set(names) <= labels, (arch, sorted(set(names) - labels)[:3])


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_compiles_for_rocm(name, checkpoint, tmp_path):
    arch = FAMILIES[name]
    art = kiln.compile(
        str(checkpoint(name)), target="rocm", quantization="q0f16", output=tmp_path / "a",
        arch=arch,
    )  # fmt: skip
    assert read_manifest(art).data["libraries"] == {arch: f"model-rocm-{arch}.so"}
    check_library(art / f"model-rocm-{arch}.so", arch)


def test_a_broken_code_object_is_caught(rocm_all):
    names, hsaco = code_object(rocm_all / "model-rocm-gfx942.so")
    co = rocm.read_code_object(hsaco)
    rocm.check_code_object(co, "gfx942", names)
    with pytest.raises(KilnError, match="not gfx90a"):
        rocm.check_code_object(co, "gfx90a", names)
    with pytest.raises(KilnError, match="nope_kernel are missing"):
        rocm.check_code_object(co, "gfx942", [*names, "nope_kernel"])
    with pytest.raises(KilnError, match=r"ld\.lld could not link"):
        rocm.link_code_object(b"not an object file")


@pytest.mark.parametrize("arch", ["sm_90", "gfx", "gfx9999", "x86-64", ","])
def test_bad_arch_is_a_clear_error(arch):
    with pytest.raises(KilnError, match="not an AMD GPU architecture"):
        rocm.parse_archs(arch)


def test_archs_and_wave_sizes():
    assert rocm.parse_archs(None) == ARCHS
    assert rocm.parse_archs("gfx942, gfx90a,gfx942") == ["gfx942", "gfx90a"]
    assert {a: rocm.wave_size(a) for a in [*ARCHS, "gfx908", "gfx1030", "gfx1201"]} == {
        **WAVE, "gfx908": 64, "gfx1030": 32, "gfx1201": 32
    }  # fmt: skip


def test_linker_comes_from_the_ziglang_wheel(monkeypatch):
    cmd, origin = rocm.find_lld()
    assert origin == "the ziglang wheel" and cmd[-1] == "ld.lld"
    assert "LLD 22" in subprocess.run([*cmd, "--version"], capture_output=True, text=True).stdout
    monkeypatch.setenv("KILN_LLD", "/bin/true")
    assert rocm.find_lld() == (["/bin/true"], "$KILN_LLD")
    monkeypatch.setenv("KILN_LLD", "/no/such/ld.lld")
    with pytest.raises(KilnError, match=r"KILN_LLD=/no/such/ld\.lld is not a program"):
        rocm.ROCM.target("gfx942")


def test_amd_gpus_are_found_in_the_kfd_topology(tmp_path):
    assert amd_gpu_archs(tmp_path) == []
    nodes = tmp_path / "sys/class/kfd/kfd/topology/nodes"
    for i, version in enumerate([0, 90402, 110000, 90010]):  # node 0 is the CPU
        (nodes / str(i)).mkdir(parents=True)
        (nodes / str(i) / "properties").write_text(
            f"cpu_cores_count 0\ngfx_target_version {version}\n"
        )
    assert amd_gpu_archs(tmp_path) == []  # no /dev/kfd: the driver is not loaded
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/kfd").touch()
    assert amd_gpu_archs(tmp_path) == ["gfx942", "gfx1100", "gfx90a"]


def test_kiln_targets_lists_archs_and_tools():
    out = CliRunner().invoke(main, ["targets"]).output
    rows = {line.split()[0]: line for line in out.splitlines() if line[:1].strip()}
    assert set(rows) == {"cpu", "cuda", "rocm", "metal", "auto"}
    assert "default arch: gfx90a,gfx942,gfx1100" in out
    assert re.search(r"needs: ld\.lld 22[\d.]* from the ziglang wheel", out)
    assert re.search(r"needs: zig 0\.\d+\.\d+ from the ziglang wheel", out)
    assert f"(here: {detect_target()})" in rows["auto"]
