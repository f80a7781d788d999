"""Kiln's attention externs (kiln.runtime.attention: prefill ragged and paged, decode): they
build with the nvcc found here, and their library loads and registers its functions on a
machine without a GPU or a compiler, checking their arguments with clear errors; an artifact
that calls them loads its own copy, and fails with one clear message where the copy is missing
and nothing can build it. The NumPy models of their contracts (attention_reference.py) equal
TVM's CPU kernels here; on a GPU the kernels agree with those models and with TVM's kernels
(tests/gpu/test_attention.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tvm_ffi
from attention_reference import EMPTY_LSE, gather_pages, paged_reference, random_page_table, visible
from native_checks import run_without_compiler

from kiln.runtime import attention
from kiln.runtime.artifact import Manifest
from kiln.runtime.attention import attention as impl
from kiln.runtime.errors import KilnError
from kiln.runtime.externs import EXTERNS, load_externs

FUNCTIONS = {
    "kiln.attention.prefill_ragged",
    "kiln.attention.prefill_ragged_tiled",
    "kiln.attention.prefill_paged",
    "kiln.attention.prefill_paged_tiled",
    "kiln.attention.decode_paged",
    "kiln.attention.decode_paged_split",
    "kiln.attention.decode_paged_tiled",
    "kiln.attention.split_rope",
    "kiln.attention.append_kv",
}
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
ragged = tvm_ffi.get_global_func("kiln.attention.prefill_ragged")
paged = tvm_ffi.get_global_func("kiln.attention.prefill_paged")
decode = tvm_ffi.get_global_func("kiln.attention.decode_paged")
host = lambda shape, dtype: tvm_ffi.from_dlpack(np.zeros(shape, dtype))
q = host((4, 2, 64), "float16")
pages = host((3, 2, 1, 16, 64), "float16")
ptr = host((2,), "int32")
one = host((1,), "int32")
lse = host((4, 2), "float32")
calls = {
    "ragged": lambda rotary: ragged(q, ptr, q, q, ptr, ptr, ptr, q, lse, 1, rotary, 1.0, 1e4, 0.1),
    "paged": lambda rotary: paged(q, ptr, pages, ptr, one, one, one, ptr, q, lse, 0, rotary, 1.0,
                                  1e4, 0.1),
    "decode": lambda rotary: decode(q, pages, host((5,), "int32"), one, host((4,), "int32"),
                                    one, one, q, lse, rotary, 1.0, 1e4, 0.1),
}
errors = {}
for name, call in calls.items():
    for rotary_mode in (1, 0):  # RoPE is refused first; then the tensors must be on a GPU
        try:
            call(rotary_mode)
        except Exception as e:
            errors[f"{name} {rotary_mode}"] = f"{type(e).__name__}: {e}"
qkv, kv = host((4, 4, 64), "float16"), host((4, 1, 64), "float16")
deferred = {
    "split_rope": lambda: tvm_ffi.get_global_func("kiln.attention.split_rope")(
        qkv, host((4,), "int32"), q, kv, kv, 1),
    "append_kv": lambda: tvm_ffi.get_global_func("kiln.attention.append_kv")(
        pages, kv, kv, host((4,), "int32")),
}
for name, call in deferred.items():
    try:
        call()
    except Exception as e:
        errors[name] = f"{type(e).__name__}: {e}"
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
    for name, fn in (("ragged", "prefill_ragged"), ("paged", "prefill_paged"),
                     ("decode", "decode_paged")):  # fmt: skip
        assert f"kiln.attention.{fn} does not apply RoPE" in result["errors"][f"{name} 1"]
        assert "q must be on cuda:0" in result["errors"][f"{name} 0"]
    assert "split_rope: qkv must be on cuda:0" in result["errors"]["split_rope"]
    assert "append_kv: k must be on cuda:0" in result["errors"]["append_kv"]
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
    assert set(EXTERNS) == {
        "kiln.cublas.matmul", attention.PREFILL_RAGGED, attention.PREFILL_PAGED,
        attention.DECODE_PAGED, attention.SPLIT_ROPE, attention.APPEND_KV, "kiln.gemv.q4",
        "kiln.gemv.q4_swiglu", "kiln.gemv.f16_swiglu",
        "kiln.gemv.q4_batched", "kiln.gemv.q4_moe_swiglu", "kiln.gemv.q4_moe",
        "kiln.gemv.moe_route", "kiln.gemv.add_rms_norm",
    }  # fmt: skip
    # Externs that share a library file build and load it alike (one library, both functions).
    by_file = {}
    for extern in EXTERNS.values():
        by_file.setdefault(extern.artifact_file, set()).add((extern.build, extern.load))
    assert all(len(ways) == 1 for ways in by_file.values())
    assert EXTERNS[attention.PREFILL_PAGED] == EXTERNS[attention.PREFILL_RAGGED]
    for name in (attention.DECODE_PAGED, attention.SPLIT_ROPE, attention.APPEND_KV):
        assert EXTERNS[name] == EXTERNS[attention.PREFILL_RAGGED]


@pytest.mark.parametrize("h_q,h_kv", [(4, 4), (8, 2), (8, 1)])
def test_the_paged_reference_equals_tvms_cpu_kernel(h_q, h_kv):
    """The float64 model of batch_prefill_paged_kv the GPU tests hold Kiln's kernel to equals
    TVM's paged prefill kernel (the CPU one the CPU cache runs, Kiln's fixed copy), causal and
    not, on histories of 0, 1, 15, 16, 17 and 100 keys in shuffled pages, chunks of 0 to 64."""
    import tvm

    from kiln.compiler.kv_kernels import _attention_prefill_cpu

    d, page_size = 16, 16
    func = _attention_prefill_cpu(h_kv, h_q, d, "float32", False, {}, page_size=page_size)
    kernel = tvm.compile(tvm.IRModule({"main": func}), "llvm")["main"]
    rng = np.random.default_rng(0)
    histories, chunks = [0, 1, 15, 16, 17, 100, 40], [7, 1, 64, 3, 20, 5, 0]
    num_pages, page_indptr, page_values, last = random_page_table(rng, histories, page_size)
    pages = rng.standard_normal((num_pages, 2, h_kv, page_size, d)).astype("float32")
    q_indptr = np.concatenate([[0], np.cumsum(chunks)]).astype("int32")
    q = rng.standard_normal((q_indptr[-1], h_q, d)).astype("float32")
    _, _, kv_indptr = gather_pages(pages, page_indptr, page_values, last)
    assert np.diff(kv_indptr).tolist() == histories
    tensor = tvm.runtime.tensor
    for causal in (0, 1):
        out = tensor(np.full(q.shape, np.nan, "float32"))
        lse = tensor(np.full(q.shape[:2], np.nan, "float32"))
        rope = [tensor(np.zeros(n, "int32")) for n in (len(chunks), len(q))]  # unused
        kernel(tensor(q), tensor(q_indptr), tensor(pages), tensor(page_indptr),
               tensor(page_values), tensor(last), *rope, out, lse, causal, 0, 1.0, 1e4,
               d**-0.5)  # fmt: skip
        want_o, want_lse = paged_reference(
            q, q_indptr, pages, page_indptr, page_values, last, bool(causal), d**-0.5
        )
        np.testing.assert_allclose(out.numpy(), want_o, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(lse.numpy(), want_lse, rtol=0, atol=1e-5)
        # Rows that see no key are covered: the 7 of the sequence without history, and more
        # under causal (chunks longer than their history).
        pairs = zip(chunks, histories, strict=True)
        seen = np.concatenate([visible(n, h, bool(causal)).any(axis=1) for n, h in pairs])
        assert len(q) - seen.sum() == (59 if causal else 7)


@pytest.mark.parametrize("h_q,h_kv", [(4, 4), (8, 2), (8, 1)])
def test_the_decode_reference_equals_tvms_cpu_kernel(h_q, h_kv):
    """The float64 model of batch_decode_paged_kv the GPU tests hold Kiln's decode kernel to
    (the paged model with one query per sequence) equals TVM's CPU decode kernel on histories of
    0, 1, 15, 16, 17, 100 and 40 keys in shuffled pages."""
    import tvm
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu

    d, page_size = 16, 16
    func = _attention_decode_cpu(h_kv, h_q, d, "float32", False, {}, page_size=page_size)
    kernel = tvm.compile(tvm.IRModule({"main": func}), "llvm")["main"]
    rng = np.random.default_rng(1)
    histories = [0, 1, 15, 16, 17, 100, 40]
    num_pages, page_indptr, page_values, last = random_page_table(rng, histories, page_size)
    pages = rng.standard_normal((num_pages, 2, h_kv, page_size, d)).astype("float32")
    q = rng.standard_normal((len(histories), h_q, d)).astype("float32")
    tensor = tvm.runtime.tensor
    out = tensor(np.full(q.shape, np.nan, "float32"))
    lse = tensor(np.full(q.shape[:2], np.nan, "float32"))
    rope = [tensor(np.zeros(len(q), "int32")) for _ in range(2)]  # unused
    kernel(tensor(q), tensor(pages), tensor(page_indptr), tensor(page_values), tensor(last),
           *rope, out, lse, 0, 1.0, 1e4, d**-0.5)  # fmt: skip
    q_indptr = np.arange(len(q) + 1, dtype="int32")
    want_o, want_lse = paged_reference(
        q, q_indptr, pages, page_indptr, page_values, last, False, d**-0.5
    )
    np.testing.assert_allclose(out.numpy(), want_o, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse.numpy(), want_lse, rtol=0, atol=1e-5)
    assert (want_lse[0] == EMPTY_LSE).all() and (want_o[0] == 0).all()  # no history
