"""Kiln's decode GEMV externs (kiln.runtime.gemv), without a GPU: the library builds with the nvcc
found here (once, into the cache, under a key that follows its source and archs), loads and
registers its functions in a runtime-only TVM with no compiler, and refuses wrong arguments with
clear errors before it would touch a GPU. The kernels' results are checked on a GPU
(tests/gpu/test_gemv_kernels.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import tvm_ffi
from native_checks import run_without_compiler

from kiln.runtime import gemv, native
from kiln.runtime.errors import KilnError
from kiln.runtime.gemv import gemv as impl

ARCHS = ["sm_90"]  # one arch keeps the build short (nvcc takes a while)

needs_nvcc = pytest.mark.skipif(native.find_nvcc() is None, reason="needs nvcc")


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """The library built for ARCHS into a cache of its own, once: (cache, library)."""
    cache = tmp_path_factory.mktemp("kiln-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_CACHE", str(cache))
        return cache, gemv.build(ARCHS)


@needs_nvcc
def test_builds_once_into_the_cache(built, monkeypatch):
    cache, lib = built
    assert lib.parent == cache / "gemv" and lib.is_file()
    assert oct(lib.stat().st_mode & 0o777) == "0o755"
    monkeypatch.setenv("KILN_CACHE", str(cache))
    mtime = lib.stat().st_mtime_ns
    assert gemv.build(ARCHS) == lib and lib.stat().st_mtime_ns == mtime  # not rebuilt
    # `python -m kiln.runtime.gemv` finds it there too, and says where
    env = {**os.environ, "KILN_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-m", "kiln.runtime.gemv", "--arch", "sm_90"],
                          env=env, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(lib) and lib.stat().st_mtime_ns == mtime


def test_the_key_follows_the_source_and_the_archs(monkeypatch, tmp_path):
    """The key names no path and no nvcc (a copy of the cache serves a machine without one),
    but changes with the archs and with the source."""
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "a"))
    name = gemv.library_path(ARCHS).name
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "b"))
    assert gemv.library_path(ARCHS).name == name
    assert gemv.library_path(ARCHS).parent == tmp_path / "b" / "gemv"
    assert gemv.library_key(["sm_80", "sm_90"]) != gemv.library_key(ARCHS)
    assert gemv.library_key(["sm_90", "sm_80"]) == gemv.library_key(["sm_80", "sm_90"])
    edited = tmp_path / "gemv.cu"
    edited.write_text(impl.SOURCE.read_text() + "\n// edited\n")
    monkeypatch.setattr(impl, "SOURCES", (edited,))
    assert gemv.library_key(ARCHS) != name.removeprefix("kiln_gemv-").removesuffix(".so")


LOAD_AND_CALL = """
import json, sys
import numpy as np
import tvm_ffi
from kiln.runtime.gemv import load_gemv
load_gemv(archs=["sm_90"])
load_gemv(archs=["sm_90"])  # once is enough; again is a no-op
q4 = tvm_ffi.get_global_func("kiln.gemv.q4")
q4_swiglu = tvm_ffi.get_global_func("kiln.gemv.q4_swiglu")
f16_swiglu = tvm_ffi.get_global_func("kiln.gemv.f16_swiglu")
tiled = tvm_ffi.get_global_func("kiln.gemv.q4_tiled")
swiglu_tiled = tvm_ffi.get_global_func("kiln.gemv.q4_swiglu_tiled")
graph_time = tvm_ffi.get_global_func("kiln.gemv.q4_graph_time")
batched = tvm_ffi.get_global_func("kiln.gemv.q4_batched")
gemm = tvm_ffi.get_global_func("kiln.gemv.q4_gemm")
pick = tvm_ffi.get_global_func("kiln.gemv.q4_default_variant")
splits = tvm_ffi.get_global_func("kiln.gemv.q4_gemm_splits")
plan = tvm_ffi.get_global_func("kiln.gemv.q4_gemm_plan")
norm = tvm_ffi.get_global_func("kiln.gemv.add_rms_norm")
host = lambda shape, dtype="float16": tvm_ffi.from_dlpack(np.zeros(shape, dtype))
w, s = host((10, 8), "uint32"), host((10, 2))
calls = {
    "q4 on the host": lambda: q4(host((1, 64)), w, s, host((1, 10))),
    "x float32": lambda: q4(host((1, 64), "float32"), w, s, host((1, 10))),
    "qweight int32": lambda: q4(host((1, 64)), host((10, 8), "int32"), s, host((1, 10))),
    "K 48": lambda: q4(host((1, 48)), host((10, 6), "uint32"), host((10, 1)), host((1, 10))),
    "M 0": lambda: q4(host((0, 64)), w, s, host((0, 10))),
    "qweight shape": lambda: q4(host((1, 64)), host((10, 4), "uint32"), s, host((1, 10))),
    "out shape": lambda: q4(host((1, 64)), w, s, host((1, 9))),
    "swiglu odd rows": lambda: q4_swiglu(host((1, 64)), host((9, 8), "uint32"), host((9, 2)),
                                         host((1, 4))),
    "swiglu out": lambda: q4_swiglu(host((1, 64)), w, s, host((1, 10))),
    "f16 w": lambda: f16_swiglu(host((1, 64)), host((10, 32)), host((1, 5))),
    "batched on the host": lambda: batched(host((20, 64)), w, s, host((20, 10)), host((10, 64))),
    "gemm on the host": lambda: gemm(host((20, 64)), w, s, host((20, 10)), host((10, 64))),
    "f16 on the host": lambda: f16_swiglu(host((2, 64)), host((10, 64)), host((2, 5))),
    "variant 5": lambda: tiled(5, host((1, 64)), w, s, host((1, 10))),
    "variant on the host": lambda: swiglu_tiled(3, host((1, 64)), w, s, host((1, 5))),
    "graph on the host": lambda: graph_time(0, False, host((1, 64)), [w, w], [s, s],
                                            host((1, 10)), 3),
    "graph copies": lambda: graph_time(1, False, host((1, 64)), [w, w], [s], host((1, 10)), 3),
    "splits 9": lambda: splits(9, host((20, 64)), w, s, host((20, 10)), host((10, 64))),
    "plan K 48": lambda: plan(20, 10, 48, 0),
    "norm on the host": lambda: norm(*[host((2, 64))] * 2, host(64), 1e-5, *[host((2, 64))] * 2),
    "norm x float32": lambda: norm(host((2, 64), "float32"), host((2, 64)), host(64), 1e-5,
                                   host((2, 64)), host((2, 64))),
    "norm H 12": lambda: norm(*[host((2, 12))] * 2, host(12), 1e-5, *[host((2, 12))] * 2),
    "norm H 16392": lambda: norm(*[host((1, 16392))] * 2, host(16392), 1e-5,
                                 *[host((1, 16392))] * 2),
    "norm r": lambda: norm(host((2, 64)), host((1, 64)), host(64), 1e-5, *[host((2, 64))] * 2),
    "norm w": lambda: norm(*[host((2, 64))] * 2, host(32), 1e-5, *[host((2, 64))] * 2),
    "norm epsilon": lambda: norm(*[host((2, 64))] * 2, host(64), -1.0, *[host((2, 64))] * 2),
}
errors = {}
for name, call in calls.items():
    try:
        call()
    except Exception as e:
        errors[name] = f"{type(e).__name__}: {e}"
print(json.dumps({
    "names": sorted(n for n in tvm_ffi.registry.list_global_func_names() if n.startswith("kiln.")),
    "errors": errors,
    "picks": [pick(n, k, g) for n in (1, 4096, 32000) for k in (32, 4096, 11008, 14336)
              for g in (False, True)],
    "plan_k_4160": plan(64, 4096, 4160, 0),  # K % 128 != 0: the mma.sync kernel, no device asked
    "relax": sorted(k for k in sys.modules if k.startswith(("tvm.relax", "kiln.compiler"))),
    "compiler_lib": "libtvm_compiler" in open("/proc/self/maps").read(),
}))
"""

# What each wrong call of LOAD_AND_CALL must raise and say
ERRORS = {
    "q4 on the host": ("ValueError", "kiln.gemv.q4: x must be on cuda:0"),
    "x float32": ("TypeError", "kiln.gemv.q4: x must be float16"),
    "qweight int32": ("TypeError", "kiln.gemv.q4: qweight must be uint32"),
    "K 48": ("ValueError", "K (x's last dimension, 48) must be a positive multiple of 32"),
    "M 0": ("ValueError", "kiln.gemv.q4 takes 1 to 2^24 rows of x"),
    "qweight shape": ("ValueError", "for x's K = 64, qweight must be (N, 8) and scale (N, 2)"),
    "out shape": ("ValueError", "out must be shaped as x with its last dimension 10"),
    "swiglu odd rows": ("ValueError", "q4_swiglu: the weight must have 2 I rows"),
    "swiglu out": ("ValueError", "q4_swiglu: out must be shaped as x with its last dimension 5"),
    "f16 w": ("ValueError", "f16_swiglu: w must be (2 I, K) with x's K = 64"),
    "batched on the host": ("ValueError", "kiln.gemv.q4_batched: x must be on cuda:0"),
    "gemm on the host": ("ValueError", "kiln.gemv.q4_gemm: x must be on cuda:0"),
    "f16 on the host": ("ValueError", "kiln.gemv.f16_swiglu: x must be on cuda:0"),
    "variant 5": ("ValueError", "q4_tiled: the variant must be 0 (the default) to 4, not 5"),
    "variant on the host": ("ValueError", "kiln.gemv.q4_swiglu_tiled: x must be on cuda:0"),
    "graph on the host": ("ValueError", "kiln.gemv.q4_graph_time: x must be on cuda:0"),
    "graph copies": ("ValueError", "q4_graph_time: give as many scales as qweights"),
    "splits 9": ("ValueError", "kiln.gemv.q4_gemm_splits: splits must be 1 to 8, not 9"),
    "plan K 48": ("ValueError", "q4_gemm_plan: rows of x, N and K (a multiple of 32) must be"),
    "norm on the host": ("ValueError", "kiln.gemv.add_rms_norm: x must be on cuda:0"),
    "norm x float32": ("TypeError", "kiln.gemv.add_rms_norm: x must be float16"),
    "norm H 12": ("ValueError", "last dimension must be a multiple of 8 from 8 to 16384, not 12"),
    "norm H 16392": ("ValueError", "a multiple of 8 from 8 to 16384, not 16392"),
    "norm r": ("ValueError", "add_rms_norm: r, s and y must be shaped as x"),
    "norm w": ("ValueError", "add_rms_norm: w must be (64,), x's last dimension"),
    "norm epsilon": ("ValueError", "add_rms_norm: epsilon must be >= 0, not -1"),
}


@needs_nvcc
def test_loads_and_checks_arguments_without_gpu_or_compiler(built):
    """In a runtime-only TVM (no libtvm_compiler, no tvm.relax) with no compiler on PATH: the
    cached library registers its functions, and each wrong call says what is wrong with it."""
    cache, _ = built
    result = json.loads(run_without_compiler(LOAD_AND_CALL, cache).strip().splitlines()[-1])
    bench = {f"kiln.gemv.{f}" for f in ("q4_tiled", "q4_swiglu_tiled", "q4_default_variant",
                                        "q4_graph_time", "q4_dequantize", "q4_gemm",
                                        "q4_gemm_mma", "q4_gemm_wgmma",
                                        "q4_gemm_splits", "q4_gemm_plan")}  # fmt: skip
    assert {*gemv.FUNCTIONS, *bench} <= set(result["names"])
    assert set(result["picks"]) <= {1, 2, 3, 4}  # the default runs one of the variants
    assert result["plan_k_4160"] == 0
    assert set(result["errors"]) == set(ERRORS)
    for name, (kind, message) in ERRORS.items():
        got = result["errors"][name]
        assert got.startswith(f"{kind}: ") and message in got, (name, got)
    assert result["relax"] == [] and not result["compiler_lib"]


def test_hopper_gets_sm_90a_code_and_every_gpu_ptx_it_can_run():
    """sm_90 becomes sm_90a SASS (the warpgroup MMAs) with KILN_GEMV_WGMMA defined; the PTX for
    newer GPUs stays the plain compute_90, since arch-specific PTX runs on no other GPU."""
    assert impl.build_flags(["sm_90", "sm_80"]) == (["sm_80", "sm_90a"], ["KILN_GEMV_WGMMA"])
    assert impl.build_flags(["sm_80", "sm_89"]) == (["sm_80", "sm_89"], [])
    flags = native.nvcc_flags(*impl.build_flags(["sm_80", "sm_90"]))
    pairs = [flags[i + 1] for i, f in enumerate(flags) if f == "-gencode"]
    assert pairs == [
        "arch=compute_80,code=sm_80",
        "arch=compute_90a,code=sm_90a",
        "arch=compute_90,code=compute_90",
    ]
    assert "-DKILN_GEMV_WGMMA" in flags
    plain = native.nvcc_flags(["sm_80", "sm_89"])
    assert [plain[i + 1] for i, f in enumerate(plain) if f == "-gencode"] == [
        "arch=compute_80,code=sm_80",
        "arch=compute_89,code=[sm_89,compute_89]",
    ]


def test_needs_sm_80():
    assert gemv.supports(["sm_80", "sm_86", "sm_89", "sm_90", "sm_90a", "sm_100"])
    assert not gemv.supports(["sm_75", "sm_90"])
    assert not gemv.supports([])
    assert not gemv.supports(["compute_90"])
    with pytest.raises(KilnError, match="sm_80 and newer"):
        gemv.build(["sm_70"])


def test_without_nvcc_it_fails_clearly(monkeypatch, tmp_path):
    if tvm_ffi.get_global_func(gemv.Q4, allow_missing=True) is not None:
        pytest.skip("this process has loaded the extern already (a GPU test did)")
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(impl, "find_nvcc", lambda: None)
    with pytest.raises(KilnError, match=r"needs nvcc.*kiln\[cuda\]"):
        gemv.build(ARCHS)
    with pytest.raises(KilnError) as caught:
        gemv.load_gemv(archs=ARCHS)
    message = str(caught.value)
    assert "needs nvcc" in message and str(tmp_path / "cache" / "gemv") in message
    assert "python -m kiln.runtime.gemv --arch sm_90" in message
    assert not (tmp_path / "cache" / "gemv").exists()  # nothing half-built
