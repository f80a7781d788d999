""".kiln packages: one file with a linux-x86_64 CPU library and a macOS Metal library over one
copy of the weights, the TVM runtime of both platforms (the macOS one from apache-tvm's macOS
wheel) and TVM's license notices.

Checked here: the package generates the same greedy tokens as the artifact it came from, in this
process and in a fresh virtual environment with only the light runtime (no apache-tvm); `auto`
picks the library for this machine and a device it has no library for is one clear error; the
macOS half is structurally right (it has not run on a Mac); damaged, truncated and malicious
packages are refused with one clear message before anything is written or loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import venv
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_contract import invoke, one_error

import kiln
from kiln.compiler.artifact import write_manifest
from kiln.compiler.package import build_package
from kiln.runtime.artifact import MANIFEST
from kiln.runtime.errors import KilnError

REPO = Path(__file__).resolve().parents[2]
PROMPT = [1, 5, 9, 30, 77]
TOKENS = 16


@pytest.fixture(scope="module")
def metal_artifact(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("metal") / "artifact"
    return kiln.compile(str(checkpoint("tiny-llama")), target="metal", output=out)


@pytest.fixture(scope="module")
def package(artifact, metal_artifact, tmp_path_factory):
    """linux-x86_64 CPU + macos-arm64 Metal, one package (wheels come from the Kiln cache)."""
    out = tmp_path_factory.mktemp("pkg") / "tiny.kiln"
    return build_package([artifact("tiny-llama"), metal_artifact], out)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Each test extracts into its own cache, so none reuses another's extraction."""
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("KILN_DEBUG", raising=False)


@pytest.fixture(scope="module")
def expected(artifact):
    """Greedy ids and text of the original artifact, run by the normal runtime."""
    m = kiln.load(artifact("tiny-llama"))
    return {
        "ids": m.generate_ids(PROMPT, max_tokens=TOKENS, temperature=0, ignore_eos=True),
        "text": m.generate("def main():", max_tokens=TOKENS, temperature=0),
    }


def members(pkg: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(pkg) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def manifest_of(pkg: Path) -> dict:
    return json.loads(members(pkg)["manifest.json"])


# -- loading ---------------------------------------------------------------------------------


def test_package_generates_what_the_artifact_does(package, expected):
    for device in ("auto", "cpu"):
        m = kiln.load(package, device=device)
        assert m.manifest.library.name == "model-cpu.so"
        assert "linux-x86_64" in m.manifest.library.parts
        ids = m.generate_ids(PROMPT, max_tokens=TOKENS, temperature=0, ignore_eos=True)
        assert ids == expected["ids"]
        assert m.generate("def main():", max_tokens=TOKENS, temperature=0) == expected["text"]


def test_a_device_the_package_does_not_serve(package):
    with pytest.raises(KilnError) as caught:
        kiln.load(package, device="cuda")
    message = str(caught.value)
    for needle in ("linux-x86_64 cpu", "macos-arm64 metal", "device cuda", "kiln compile"):
        assert needle in message, message
    line = one_error(*invoke("run", package, "--prompt", "hi", "--device", "metal"))
    assert "macos-arm64 metal" in line and "device metal" in line


def test_light_runtime_in_a_fresh_venv(package, expected, tmp_path):
    """The kiln-runtime distribution in a new virtual environment (no system site-packages):
    numpy, tokenizers, jinja2 and apache-tvm-ffi, and no apache-tvm."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "runtime-dist", src / "runtime-dist")
    shutil.copytree(REPO / "runtime", src / "runtime", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "__init__.py", src / "__init__.py")
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    run([*pip, "-w", str(tmp_path / "wheel"), str(src / "runtime-dist")])
    (wheel,) = (tmp_path / "wheel").glob("kiln_runtime-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    python = str(env_dir / "bin" / "python")
    run([python, "-m", "pip", "install", "-q", str(wheel)])
    script = f"""
import importlib.metadata, json, sys
try:
    importlib.metadata.version("apache-tvm")
    sys.exit("apache-tvm is installed")
except importlib.metadata.PackageNotFoundError:
    pass
import kiln
m = kiln.load({str(package)!r}, device="auto")
import tvm
print(json.dumps({{
    "ids": m.generate_ids({PROMPT}, max_tokens={TOKENS}, temperature=0, ignore_eos=True),
    "text": m.generate("def main():", max_tokens={TOKENS}, temperature=0),
    "tvm": tvm.__file__,
    "compiler": "libtvm_compiler" in open("/proc/self/maps").read(),
}}))
"""
    out = json.loads(run([python, "-c", script], cwd=tmp_path).splitlines()[-1])
    assert out["ids"] == expected["ids"]
    assert out["text"] == expected["text"]
    assert out["tvm"].startswith(str(tmp_path / "cache" / "packages")), out["tvm"]
    assert not out["compiler"]


def run(cmd: list[str], **kwargs) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


# -- what is inside ----------------------------------------------------------------------------

MH_MAGIC_64, CPU_TYPE_ARM64, MH_DYLIB = 0xFEEDFACF, 0x0100000C, 6


def test_macos_half_is_complete(package):
    """Not run on a Mac: the Mach-O headers, the Metal runtime and the manifest are checked."""
    data = members(package)
    manifest = json.loads(data.pop("manifest.json"))
    # Every member is listed with its size and sha256, and nothing else is.
    assert set(manifest["files"]) == set(data)
    for name, entry in manifest["files"].items():
        assert entry == {"sha256": hashlib.sha256(data[name]).hexdigest(), "size": len(data[name])}
    (metal,) = [lib for lib in manifest["libraries"] if lib["device"] == "metal"]
    assert metal["platform"] == "macos-arm64" and metal["file"].endswith(".dylib")
    runtime = manifest["runtimes"]["macos-arm64"]["path"]
    dylibs = [n for n in data if n.endswith(".dylib")]
    assert f"{runtime}/tvm/lib/libtvm_runtime.dylib" in dylibs
    assert f"{runtime}/tvm/lib/libtvm_runtime_metal.dylib" in dylibs
    assert not [n for n in data if "libtvm_compiler" in n or "/relax/" in n]
    for name in [metal["file"], *dylibs]:
        magic, cputype, _, filetype = struct.unpack_from("<IiiI", data[name])
        assert (magic, cputype, filetype) == (MH_MAGIC_64, CPU_TYPE_ARM64, MH_DYLIB), name
    # Both platforms' runtimes carry the same runtime-only Python files.
    py = {p: sorted(n.split("/tvm/", 1)[1] for n in data if n.startswith(f"runtime/{p}/") and
                    n.endswith(".py")) for p in manifest["runtimes"]}  # fmt: skip
    assert py["macos-arm64"] == py["linux-x86_64"] and "runtime/vm.py" in py["macos-arm64"]
    # One copy of the weights; TVM's license and notice.
    assert sum(n.startswith("params/") and n.endswith(".safetensors") for n in data) == 1
    assert {"licenses/tvm/LICENSE", "licenses/tvm/NOTICE"} <= set(manifest["licenses"])
    assert b"Apache License" in data["licenses/tvm/LICENSE"]


def test_packaging_refuses_different_weights(artifact, tmp_path):
    """An artifact whose weights differ (one value changed, its manifest rewritten to match)."""
    other = shutil.copytree(artifact("tiny-llama"), tmp_path / "other")
    data = json.loads((other / MANIFEST).read_text())
    weights = other / data["params"][0]["file"]
    raw = bytearray(weights.read_bytes())
    raw[-4] ^= 0x40
    weights.write_bytes(bytes(raw))
    write_manifest(other, {k: v for k, v in data.items() if k not in ("format", "files")})
    code, out, err = invoke("package", artifact("tiny-llama"), other, "-o", tmp_path / "x.kiln")
    one_error(code, out, err, "different weights", "same checkpoint")
    assert not (tmp_path / "x.kiln").exists()


# -- untrusted packages ------------------------------------------------------------------------


def rewrite(
    pkg: Path,
    out: Path,
    member: Callable[[str, bytes], bytes] = lambda _n, b: b,
    manifest: Callable[[dict], object] = lambda _m: None,
    extra: tuple[tuple[zipfile.ZipInfo, bytes], ...] = (),
) -> Path:
    """A copy of `pkg` with members changed, the manifest edited and members added, written as
    a well-formed zip (so only Kiln's checks can catch it)."""
    data = members(pkg)
    m = json.loads(data.pop("manifest.json"))
    manifest(m)
    with zipfile.ZipFile(out, "w") as zf:
        for name, raw in data.items():
            zf.writestr(name, member(name, raw))
        for info, raw in extra:
            zf.writestr(info, raw)
        zf.writestr("manifest.json", json.dumps(m))
    return out


def params_name(pkg: Path) -> str:
    return next(n for n in manifest_of(pkg)["files"] if n.endswith(".safetensors"))


def flip(pkg, out):
    name = params_name(pkg)
    return rewrite(pkg, out, lambda n, b: b[:100] + bytes([b[100] ^ 1]) + b[101:] if n == name
                   else b)  # fmt: skip


def cut_member(pkg, out):
    name = params_name(pkg)
    return rewrite(pkg, out, lambda n, b: b[:-10] if n == name else b)


def cut_file(pkg, out):
    out.write_bytes(pkg.read_bytes()[:-5000])
    return out


def listed(name: str, raw: bytes, mode: int = 0o100644) -> tuple[zipfile.ZipInfo, bytes, Callable]:
    info = zipfile.ZipInfo(name)
    info.external_attr = mode << 16
    entry = {"sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}
    return info, raw, lambda m: m["files"].__setitem__(name, entry)


def add(name: str, raw: bytes = b"escaped", mode: int = 0o100644, in_manifest: bool = True):
    def damage(pkg, out):
        info, data, note = listed(name, raw, mode)
        return rewrite(pkg, out, manifest=note if in_manifest else lambda _m: None,
                       extra=((info, data),))  # fmt: skip

    return damage


def lie_about_size(pkg, out):
    name = params_name(pkg)
    return rewrite(pkg, out, manifest=lambda m: m["files"][name].update(size=123))


DAMAGE = {
    "tampered": (flip, ["sha256", "tampered"]),
    "truncated-member": (cut_member, ["bytes", "truncated"]),
    "truncated-file": (cut_file, ["truncated", "kiln package"]),
    "path-traversal": (add("../escaped.txt"), ["../escaped.txt", "outside the extraction"]),
    "absolute-path": (add("/tmp/kiln-escaped.txt"), ["outside the extraction"]),
    "symlink": (add("params/link", b"/etc/passwd", 0o120777), ["symbolic link"]),
    "unlisted-member": (add("extra.bin", in_manifest=False), ["extra.bin", "not in the manifest"]),
    "manifest-size-lie": (lie_about_size, ["bytes", "123"]),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_package_is_refused(case, package, tmp_path):
    damage, needles = DAMAGE[case]
    bad = damage(package, tmp_path / "bad.kiln")
    line = one_error(*invoke("run", bad, "--prompt", "hi", "--device", "auto"), *needles)
    with pytest.raises(KilnError) as caught:
        kiln.load(bad, device="auto")
    assert line == f"error: {caught.value}"
    # Nothing was extracted: no cache entry, nothing beside it.
    cache = tmp_path / "cache" / "packages"
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]
    assert not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path / "cache" / "escaped.txt").exists()
    assert not Path("/tmp/kiln-escaped.txt").exists()


def test_modified_extraction_is_caught(package, tmp_path):
    """A package extracted earlier is checked again: a changed file in the cache is refused."""
    kiln.load(package)
    (lib,) = (tmp_path / "cache" / "packages").glob("*/lib/linux-x86_64/cpu/model-cpu.so")
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 1
    # A new file in its place: this process still has the old one mapped (rewriting a loaded
    # library in place would change code under the running process).
    changed = lib.with_name(lib.name + ".new")
    changed.write_bytes(bytes(data))
    os.replace(changed, lib)
    with pytest.raises(KilnError, match="sha256"):
        kiln.load(package)


# -- the CLI -----------------------------------------------------------------------------------


# -- choosing among vendors (the manifest of a CUDA + ROCm + Metal + CPU package) --------------


def vendor_manifest() -> dict:
    def lib(platform: str, device: str, arch: str | None = None) -> dict:
        name = f"lib/{platform}/{device}/model-{device}{'-' + arch if arch else ''}.so"
        return {"platform": platform, "device": device, "arch": arch, "file": name,
                "target": {"device": device}}  # fmt: skip

    libraries = [
        lib("linux-x86_64", "cuda"), lib("linux-aarch64", "cuda"),
        lib("linux-x86_64", "rocm", "gfx942"), lib("linux-x86_64", "rocm", "gfx90a"),
        lib("macos-arm64", "metal"), lib("linux-x86_64", "cpu"), lib("linux-aarch64", "cpu"),
    ]  # fmt: skip
    files = {x["file"]: {"sha256": "0", "size": 1} for x in libraries}
    files["params/a.safetensors"] = {"sha256": "0", "size": 1}
    runtimes = {p: {"path": f"runtime/{p}", "tvm": "x"} for p in ("linux-x86_64", "linux-aarch64")}
    return {"artifact": {"kv_cache": {}}, "libraries": libraries, "files": files,
            "shared_files": ["params/a.safetensors"], "runtimes": runtimes}  # fmt: skip


@pytest.mark.parametrize(
    "platform, found, device, picked",
    [
        ("linux-x86_64", ["cuda", "rocm", "cpu"], "auto", ("cuda", [None])),
        ("linux-x86_64", ["rocm", "cpu"], "auto", ("rocm", ["gfx942", "gfx90a"])),
        ("linux-x86_64", ["cpu"], "auto", ("cpu", [None])),
        ("linux-aarch64", ["cuda", "cpu"], "auto", ("cuda", [None])),
        ("linux-aarch64", ["cuda", "cpu"], "cpu", ("cpu", [None])),
        ("macos-arm64", ["metal", "cpu"], "auto", ("metal", [None])),
        ("macos-arm64", ["metal", "cpu"], "cpu", None),  # no macOS CPU library in it
        ("linux-aarch64", ["cpu"], "rocm", None),
    ],
)
def test_the_library_for_this_machine(platform, found, device, picked, monkeypatch):
    from kiln.runtime import host
    from kiln.runtime import package as pkg

    monkeypatch.setattr(host, "host_platform", lambda: platform)
    monkeypatch.setattr(host, "devices", lambda: found)
    data = vendor_manifest()
    if picked is None:
        with pytest.raises(KilnError) as caught:
            pkg.choose(Path("m.kiln"), data, device)
        assert f"this {platform} machine" in str(caught.value)
        assert "linux-x86_64 rocm (gfx942)" in str(caught.value)
        return
    libs, chosen = pkg.choose(Path("m.kiln"), data, device)
    assert {x["platform"] for x in libs} == {platform}
    assert (chosen.split(":")[0], [x["arch"] for x in libs]) == picked
    view = pkg._view(Path("/x"), data, libs)
    assert view.device == picked[0] and "params/a.safetensors" in view.data["files"]
    if picked[0] == "rocm":  # one library per gfx arch; the runner takes the GPU's
        assert view.library_for("gfx90a").name == "model-rocm-gfx90a.so"
