"""Kiln's cuBLAS extern (kiln.runtime.cublas): it builds, links and registers its functions on
any machine with the headers and cuBLAS, without a GPU; an artifact that calls it fails with one
clear message where cuBLAS is missing. On a GPU it agrees with NumPy (tests/gpu/test_cublas.py).
"""

from __future__ import annotations

import json

import pytest
from native_checks import run_without_compiler

from kiln.runtime.artifact import Manifest
from kiln.runtime.cublas import MATMUL, cublas
from kiln.runtime.errors import KilnError
from kiln.runtime.externs import load_externs

FUNCTIONS = {"kiln.cublas.load", "kiln.cublas.matmul", "kiln.cublas.version"}


def _build_prerequisites() -> str | None:
    """Why the extern cannot be built here, or None."""
    try:
        cublas.cublas_include()
        cublas.cublas_library()
        cublas.native.cuda_include(cublas.WHAT)
        cublas.native.cudart_library(cublas.WHAT)
    except KilnError as e:
        return str(e)
    return None


needs_build = pytest.mark.skipif(
    _build_prerequisites() is not None, reason=f"cannot build: {_build_prerequisites()}"
)


@needs_build
def test_builds_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    lib = cublas.build()
    assert lib.parent == tmp_path / "cublas" and lib.is_file()
    assert oct(lib.stat().st_mode & 0o777) == "0o755"
    built = lib.stat().st_mtime_ns
    assert cublas.build() == lib and lib.stat().st_mtime_ns == built  # cached, not rebuilt
    # The key names no path: a copy of the cache serves another machine with the same tvm-ffi.
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "elsewhere"))
    assert cublas.library_path().name == lib.name


@needs_build
def test_loads_and_registers_without_gpu_or_compiler(tmp_path):
    """In a runtime-only TVM (no libtvm_compiler, no tvm.relax), as the GPU kit runs it, with no
    compiler on PATH: the cached library registers every function and opens cuBLASLt."""
    code = """
import json, sys
import tvm_ffi
from kiln.runtime.cublas import cublas_library, load_cublas
version = load_cublas()
print(json.dumps({
    "names": sorted(n for n in tvm_ffi.registry.list_global_func_names() if n.startswith("kiln.")),
    "version": version,
    "again": load_cublas(),
    "reported": tvm_ffi.get_global_func("kiln.cublas.version")(),
    "library": str(cublas_library()),
    "relax": sorted(k for k in sys.modules if k.startswith(("tvm.relax", "kiln.compiler"))),
    "compiler_lib": "libtvm_compiler" in open("/proc/self/maps").read(),
}))
"""
    out = run_without_compiler(code, tmp_path, build_module="kiln.runtime.cublas")
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result["names"]) >= FUNCTIONS
    header = (cublas.cublas_include() / "cublas_api.h").read_text()
    major, minor, patch = (
        int(header.split(f"#define CUBLAS_VER_{k} ")[1].split()[0])
        for k in ("MAJOR", "MINOR", "PATCH")
    )
    if result["library"] == str(cublas.cublas_library()):
        assert result["version"] == major * 10000 + minor * 100 + patch
    assert result["again"] == result["reported"] == result["version"]
    assert result["relax"] == [] and not result["compiler_lib"]


def test_missing_cublas_names_the_fix(monkeypatch):
    monkeypatch.setattr(cublas, "_cublas_homes", lambda: [])
    monkeypatch.delenv("KILN_CUBLAS", raising=False)
    with pytest.raises(KilnError, match=r"libcublasLt\.so\.13.*kiln\[cublas\].*KILN_CUBLAS"):
        cublas.cublas_library()
    with pytest.raises(KilnError, match=r"cublasLt\.h.*kiln\[cublas\]"):
        cublas.cublas_include()


def test_cublas_override(monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_CUBLAS", str(tmp_path / "missing.so"))
    with pytest.raises(KilnError, match=r"KILN_CUBLAS is .*missing\.so"):
        cublas.cublas_library()
    (tmp_path / "libcublasLt.so.12").write_bytes(b"")
    monkeypatch.setenv("KILN_CUBLAS", str(tmp_path))
    assert cublas.cublas_library() == tmp_path / "libcublasLt.so.12"


@needs_build
def test_an_artifacts_own_copy_loads_with_no_cache_and_no_compiler(tmp_path, monkeypatch):
    """kiln compile puts the built extern into a CUDA artifact: the runner loads that copy, on
    a machine whose cache is empty and which has no compiler."""
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "build-cache"))
    art = tmp_path / "artifact"
    art.mkdir()
    (art / cublas.ARTIFACT_FILE).write_bytes(cublas.build().read_bytes())
    code = f"""
import tvm_ffi
from kiln.runtime.artifact import Manifest
from kiln.runtime.externs import load_externs
from pathlib import Path
load_externs(Manifest(Path({str(art)!r}), {{"target": {{"externs": [{MATMUL!r}]}}}}))
print(tvm_ffi.get_global_func({MATMUL!r}, allow_missing=True) is not None)
"""
    assert run_without_compiler(code, tmp_path / "empty").split() == ["True"]
    assert not (tmp_path / "empty").exists()  # nothing was built


def _manifest(tmp_path, externs: list[str]) -> Manifest:
    return Manifest(tmp_path, {"target": {"device": "cuda", "externs": externs}})


def test_an_artifact_that_needs_cublas_fails_clearly_without_it(monkeypatch, tmp_path):
    monkeypatch.setattr(cublas, "_cublas_homes", lambda: [])
    monkeypatch.delenv("KILN_CUBLAS", raising=False)
    with pytest.raises(KilnError) as caught:
        load_externs(_manifest(tmp_path, ["kiln.cublas.matmul"]))
    message = str(caught.value)
    assert str(tmp_path) in message and "cuBLAS" in message and "kiln[cublas]" in message
    assert len(message.splitlines()) == 1
    load_externs(_manifest(tmp_path, []))  # nothing to load


def test_an_unknown_extern_is_refused(tmp_path):
    with pytest.raises(KilnError, match=r"kiln\.other\.fn.*does not provide"):
        load_externs(_manifest(tmp_path, ["kiln.other.fn"]))
