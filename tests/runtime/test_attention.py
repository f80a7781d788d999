"""Kiln's prefill attention extern (kiln.runtime.attention): it builds with the nvcc found here,
and its library loads and registers its functions on a machine without a GPU or a compiler,
checking its arguments with clear errors; an artifact that calls it loads its own copy, and
fails with one clear message where the copy is missing and nothing can build it. On a GPU it
agrees with NumPy and TVM's kernel (tests/gpu/test_attention.py).
"""

from __future__ import annotations

import json

import pytest
import tvm_ffi
from native_checks import run_without_compiler

from kiln.runtime import attention
from kiln.runtime.artifact import Manifest
from kiln.runtime.attention import attention as impl
from kiln.runtime.errors import KilnError
from kiln.runtime.externs import EXTERNS, load_externs

FUNCTIONS = {"kiln.attention.prefill_ragged", "kiln.attention.prefill_ragged_tiled"}
ARCHS = ["sm_90"]  # one arch keeps the build short

needs_nvcc = pytest.mark.skipif(attention.find_nvcc() is None, reason="needs nvcc")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The library built for ARCHS into a cache of its own: (cache, library)."""
    cache = tmp_path_factory.mktemp("kiln-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_CACHE", str(cache))
        return cache, attention.build(ARCHS)


@needs_nvcc
def test_builds_once_into_the_cache(built, monkeypatch):
    cache, lib = built
    assert lib.parent == cache / "attention" and lib.is_file()
    assert oct(lib.stat().st_mode & 0o777) == "0o755"
    monkeypatch.setenv("KILN_CACHE", str(cache))
    mtime = lib.stat().st_mtime_ns
    assert attention.build(ARCHS) == lib and lib.stat().st_mtime_ns == mtime  # not rebuilt
    # The key names no path and no nvcc: a copy of the cache serves a machine without one.
    monkeypatch.setenv("KILN_CACHE", str(cache / "elsewhere"))
    assert impl.library_path(ARCHS).name == lib.name
    assert impl.library_path(["sm_80", "sm_90"]).name != lib.name


LOAD_AND_CALL = """
import json, sys
import numpy as np
import tvm_ffi
from kiln.runtime.attention import load_attention
load_attention(archs=["sm_90"])
load_attention(archs=["sm_90"])  # once is enough; again is a no-op
f = tvm_ffi.get_global_func("kiln.attention.prefill_ragged")
host = lambda shape, dtype: tvm_ffi.from_dlpack(np.zeros(shape, dtype))
q = host((4, 2, 64), "float16")
ptr = host((2,), "int32")
errors = {}
for rotary_mode in (1, 0):  # RoPE is refused first; then the tensors must be on a GPU
    try:
        f(q, ptr, q, q, ptr, ptr, ptr, q, host((4, 2), "float32"), 1, rotary_mode, 1.0, 1e4, 0.1)
    except Exception as e:
        errors[rotary_mode] = f"{type(e).__name__}: {e}"
print(json.dumps({
    "names": sorted(n for n in tvm_ffi.registry.list_global_func_names() if n.startswith("kiln.")),
    "errors": errors,
    "relax": sorted(k for k in sys.modules if k.startswith(("tvm.relax", "kiln.compiler"))),
    "compiler_lib": "libtvm_compiler" in open("/proc/self/maps").read(),
}))
"""


@needs_nvcc
def test_loads_and_registers_without_gpu_or_compiler(built):
    """In a runtime-only TVM (no libtvm_compiler, no tvm.relax) with no compiler on PATH: the
    cached library registers its functions, and a call says what is wrong with it."""
    cache, _ = built
    result = json.loads(run_without_compiler(LOAD_AND_CALL, cache).strip().splitlines()[-1])
    assert set(result["names"]) >= FUNCTIONS
    assert "does not apply RoPE" in result["errors"]["1"]
    assert "must be on cuda:0" in result["errors"]["0"]
    assert result["relax"] == [] and not result["compiler_lib"]


@needs_nvcc
def test_an_artifacts_own_copy_loads_with_no_cache_and_no_compiler(built, tmp_path):
    _, lib = built
    art = tmp_path / "artifact"
    art.mkdir()
    (art / attention.ARTIFACT_FILE).write_bytes(lib.read_bytes())
    code = f"""
import tvm_ffi
from pathlib import Path
from kiln.runtime.artifact import Manifest
from kiln.runtime.externs import load_externs
target = {{"externs": [{attention.PREFILL_RAGGED!r}], "archs": ["sm_80", "sm_90"]}}
load_externs(Manifest(Path({str(art)!r}), {{"target": target}}))
print(tvm_ffi.get_global_func({attention.PREFILL_RAGGED!r}, allow_missing=True) is not None)
"""
    assert run_without_compiler(code, tmp_path / "empty").split() == ["True"]
    assert not (tmp_path / "empty").exists()  # nothing was built


def test_needs_sm_80():
    assert attention.supports(["sm_80", "sm_86", "sm_89", "sm_90", "sm_90a", "sm_100"])
    assert not attention.supports(["sm_75", "sm_90"])
    assert not attention.supports([])
    with pytest.raises(KilnError, match="sm_80 and newer"):
        attention.build(["sm_70"])


def test_without_nvcc_an_artifact_without_its_copy_fails_clearly(monkeypatch, tmp_path):
    if tvm_ffi.get_global_func(attention.PREFILL_RAGGED, allow_missing=True) is not None:
        pytest.skip("this process has loaded the extern already (a GPU test did)")
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(impl, "find_nvcc", lambda: None)
    with pytest.raises(KilnError, match=r"needs nvcc.*kiln\[cuda\]"):
        attention.build(ARCHS)
    manifest = Manifest(
        tmp_path, {"target": {"externs": [attention.PREFILL_RAGGED], "archs": ARCHS}}
    )
    with pytest.raises(KilnError) as caught:
        load_externs(manifest)
    message = str(caught.value)
    assert str(tmp_path) in message and "nvcc" in message
    assert "python -m kiln.runtime.attention --arch sm_90" in message


def test_every_extern_has_a_file_and_a_loader():
    assert set(EXTERNS) == {"kiln.cublas.matmul", attention.PREFILL_RAGGED}
    files = [e.artifact_file for e in EXTERNS.values()]
    assert len(set(files)) == len(files)
