"""The CUDA target on a machine without a GPU: kernels become a fatbin with SASS for every
requested arch (and PTX for the newest) inside the library; builds are cached by content."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

import kiln
from kiln.runtime import attention, gemv
from kiln.runtime.errors import KilnError
from kiln.runtime.step_graph import STEP_GRAPH_ENTRY
from kiln.targets import cuda, nvrtc
from kiln.targets.blob import Blob, kernel_names, split_device_payload

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
KERNEL = 'extern "C" __global__ void k(float* x) { x[threadIdx.x] += 1.0f; }\n'

FAMILIES = ["llama", "llama3", "mistral", "mixtral"]


def device_payload(library) -> tuple[str, bytes, bytes]:
    """(format, function table, data) of the device module embedded in a compiled library."""
    data = library.read_bytes()
    marker = (6).to_bytes(8, "little") + b"fatbin"
    at = data.index(marker)
    size = int.from_bytes(data[at - 8 : at], "little")
    return split_device_payload(data[at : at + size])


@pytest.fixture(scope="module")
def tiny_cuda(checkpoint, tmp_path_factory, monkeypatch_module):
    out = tmp_path_factory.mktemp("cuda") / "tiny"
    return kiln.compile(
        str(checkpoint("tiny-llama")), target="cuda", quantization="q0f16", output=out,
        dump_ir=out.parent / "ir",
    )  # fmt: skip


@pytest.fixture(scope="module")
def monkeypatch_module(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("KILN_CACHE", str(tmp_path_factory.mktemp("kiln-cache")))
    yield mp
    mp.undo()


@needs_nvcc
def test_fatbin_has_sass_for_every_arch_and_ptx_for_the_newest(tiny_cuda):
    manifest = json.loads((tiny_cuda / "manifest.json").read_text())
    archs = cuda.parse_archs(None)
    assert manifest["target"]["archs"] == archs
    fmt, fmap, fatbin = device_payload(tiny_cuda / manifest["library"])
    assert fmt == "fatbin"
    images = cuda.fatbin_images(fatbin)
    sass = sorted(sm for kind, sm, _ in images if kind == "elf")
    assert sass == sorted(int(a.removeprefix("sm_")) for a in archs)
    assert [(k, sm) for k, sm, _ in images if k == "ptx"] == [("ptx", 90)]
    # every kernel the host code calls is defined in every SASS image
    names = kernel_names(fmap)
    assert names and sorted(names) == manifest["target"]["device_code"]["kernels"]
    for kind, sm, image in images:
        if kind == "elf":
            assert image[:4] == b"\x7fELF"
            missing = [n for n in names if b"\0" + n.encode() + b"\0" not in image]
            assert not missing, (sm, missing[:3])
    # no CUDA source is left in the library for a runtime compiler to find
    assert b"__global__" not in (tiny_cuda / manifest["library"]).read_bytes()


@needs_nvcc
@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_compiles_for_cuda(name, checkpoint, tmp_path, monkeypatch_module):
    art = kiln.compile(
        str(checkpoint(name)), target="cuda", quantization="q0f16", output=tmp_path / "a",
        arch="sm_90",
    )  # fmt: skip
    fmt, _, fatbin = device_payload(art / "model-cuda.so")
    assert fmt == "fatbin"
    assert {(k, sm) for k, sm, _ in cuda.fatbin_images(fatbin)} == {("elf", 90), ("ptx", 90)}


def test_build_is_cached_by_content(monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    source = 'extern "C" __global__ void k(float* x) { x[threadIdx.x] += 1.0f; }\n'
    first = cuda.compile_fatbin(source, ["sm_80"])
    assert cuda.fatbin_images(first)[0][:2] == ("elf", 80)

    def no_compiler(*args, **kwargs):
        raise AssertionError("nvcc ran for an unchanged kernel")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert cuda.compile_fatbin(source, ["sm_80"]) == first
    with pytest.raises(AssertionError, match="nvcc ran"):
        cuda.compile_fatbin(source.replace("1.0f", "2.0f"), ["sm_80"])


@needs_nvcc
def test_blob_round_trip(tiny_cuda):
    manifest = json.loads((tiny_cuda / "manifest.json").read_text())
    fmt, fmap, data = device_payload(tiny_cuda / manifest["library"])
    from kiln.targets.blob import join_device_payload

    payload = join_device_payload(fmt, fmap, data)
    blob = Blob(
        [0, 1, 2, 2], [1, 2], [("relax.VMExecutable", b"x"), ("_lib", None), ("cuda", payload)]
    )
    again = Blob.parse(blob.serialize())
    assert again == blob
    assert again.rewrite("cuda", lambda p: p[::-1]) == 1
    assert again.modules[2][1] == payload[::-1]


@pytest.mark.parametrize("arch", ["sm80", "compute_90", "sm_9x", ""])
def test_bad_arch_is_a_clear_error(arch):
    with pytest.raises(KilnError, match="not a CUDA architecture"):
        cuda.parse_archs(arch or ",")


def test_parse_archs_sorts_and_dedups():
    assert cuda.parse_archs("sm_90,sm_80,sm_90a,sm_80") == ["sm_80", "sm_90", "sm_90a"]
    assert np.all([a.startswith("sm_") for a in cuda.parse_archs(None)])


@needs_nvcc
def test_fatbin_writer_matches_nvcc_byte_for_byte(tmp_path):
    """Kiln's container writer (used with NVRTC) lays images out exactly as nvcc does."""
    (tmp_path / "k.cu").write_text(KERNEL)
    cmd = [
        "nvcc",
        "--fatbin",
        "--no-compress",
        "-o",
        str(tmp_path / "k.fatbin"),
        str(tmp_path / "k.cu"),
    ]
    cmd += [
        "-gencode",
        "arch=compute_80,code=[sm_80]",
        "-gencode",
        "arch=compute_90,code=[sm_90,compute_90]",
    ]
    subprocess.run(cmd, check=True)
    reference = (tmp_path / "k.fatbin").read_bytes()
    assert cuda.write_fatbin(cuda.fatbin_images(reference)) == reference


@pytest.mark.skipif(not nvrtc.available(), reason="needs NVRTC (pip install 'kiln[cuda]')")
def test_nvrtc_builds_sass_and_ptx(monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    monkeypatch.setenv("KILN_CUDA_COMPILER", "nvrtc")
    images = cuda.fatbin_images(cuda.compile_fatbin(KERNEL, ["sm_80", "sm_90"]))
    assert [(k, sm) for k, sm, _ in images] == [("elf", 80), ("elf", 90), ("ptx", 90)]
    for kind, _, image in images:
        assert image.startswith(b"\x7fELF") if kind == "elf" else b".entry k" in image


# Kiln's prefill attention extern (kiln.runtime.attention) in place of TVM's ragged prefill
# kernel: which caches take it, and what a compiled artifact then carries.


@pytest.fixture
def nvcc_found(monkeypatch):
    monkeypatch.setattr(attention, "find_nvcc", lambda: Path("/opt/cuda/bin/nvcc"))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_fp16_and_bf16_caches_of_head_dim_64_and_128_take_kilns_kernel(nvcc_found, dtype, head_dim):
    target = cuda.CUDA.target("sm_80,sm_90")
    assert cuda.CUDA.attention_externs(target, dtype, head_dim) == {
        "ragged": attention.PREFILL_RAGGED,
        "paged": attention.PREFILL_PAGED,
        "decode": attention.DECODE_PAGED,
        "rope": attention.SPLIT_ROPE,
        "append": attention.APPEND_KV,
    }


@pytest.mark.parametrize(
    "arch,dtype,head_dim",
    [
        ("sm_90", "float32", 128),  # the kernel computes on fp16/bf16 tensor cores
        ("sm_90", "float16", 32),  # other head sizes (the tiny test models'): TVM's kernel
        ("sm_90", "float16", 16),
        ("sm_90", "float16", 96),
        ("sm_75,sm_90", "float16", 128),  # an arch before sm_80 among those built for
    ],
)
def test_other_caches_keep_tvms_kernel(nvcc_found, arch, dtype, head_dim):
    assert cuda.CUDA.attention_externs(cuda.CUDA.target(arch), dtype, head_dim) == {}


def test_other_targets_keep_tvms_kernel():
    from kiln.targets import TARGETS

    for name, spec in TARGETS.items():
        if name != "cuda":
            arch = spec.split_arch(None)[0] if spec.split_arch else None
            assert spec.attention_externs(spec.target(arch), "float16", 128) == {}, name


def test_without_nvcc_tvms_kernel_stays_with_a_note(monkeypatch):
    monkeypatch.setattr(attention, "find_nvcc", lambda: None)
    with pytest.warns(UserWarning, match=r"TVM's kernels.*nvcc.*kiln\[cuda\]"):
        assert cuda.CUDA.attention_externs(cuda.CUDA.target("sm_90"), "float16", 128) == {}


def test_a_head_dim_32_model_keeps_tvms_prefill_kernels(tiny_cuda):
    manifest = json.loads((tiny_cuda / "manifest.json").read_text())
    externs = manifest["target"].get("externs", [])
    assert attention.PREFILL_RAGGED not in externs and attention.PREFILL_PAGED not in externs
    kernels = manifest["target"]["device_code"]["kernels"]
    assert "batch_prefill_ragged_kv_kernel" in kernels
    assert "batch_prefill_paged_kv_kernel" in kernels
    assert not (tiny_cuda / attention.ARTIFACT_FILE).exists()


@needs_nvcc
def test_a_head_dim_64_model_carries_kilns_attention_externs(
    custom_checkpoint, tmp_path, monkeypatch_module
):
    """The manifest lists the externs, the artifact carries their library built for its archs
    (SASS for each, PTX for the newest), and TVM's attention, RoPE and append kernels are not
    compiled."""
    ckpt = custom_checkpoint(
        "llama", hidden_size=256, intermediate_size=256, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    art = kiln.compile(
        str(ckpt), target="cuda", quantization="q0f16", output=tmp_path / "a", arch="sm_80,sm_90"
    )
    manifest = json.loads((art / "manifest.json").read_text())
    externs = {attention.PREFILL_RAGGED, attention.PREFILL_PAGED, attention.DECODE_PAGED,
               attention.SPLIT_ROPE, attention.APPEND_KV}  # fmt: skip
    assert externs <= set(manifest["target"]["externs"])
    assert manifest["files"][attention.ARTIFACT_FILE]
    kernels = manifest["target"]["device_code"]["kernels"]
    assert "batch_prefill_ragged_kv_kernel" not in kernels
    assert "batch_prefill_paged_kv_kernel" not in kernels
    assert "batch_decode_paged_kv_kernel" not in kernels
    assert "fused_rope_kernel" not in kernels
    assert "tir_kv_cache_transpose_append_kernel" not in kernels
    # the rest of the cache stays TVM's, the sliding-window kernels among it
    assert "batch_prefill_paged_kv_sliding_window_kernel" in kernels
    assert "batch_decode_paged_kv_sliding_window_kernel" in kernels
    data = (art / attention.ARTIFACT_FILE).read_bytes()
    fatbin = data[data.index(struct.pack("<I", 0xBA55ED50)) :]
    images = {(kind, sm) for kind, sm, _ in cuda.fatbin_images(fatbin)}
    assert images == {("elf", 80), ("elf", 90), ("ptx", 90)}


def relax_functions(script: str) -> dict[str, str]:
    """The Relax functions of a module's TVMScript, by name."""
    parts = re.split(r"\n    @R\.function[^\n]*\n    def ", script)[1:]
    return {part.split("(", 1)[0]: part for part in parts}


def calls(*texts: str) -> list[str]:
    """The kernels, externs and packed functions Relax functions call (their own checks and
    graph plumbing left out)."""
    found = re.findall(r"(?:cls\.|R\.call_packed\(\")([\w.]+)", "".join(texts))
    checks = ("vm.builtin.check_", "vm.builtin.match_shape", "shape_func")  # each its own
    return sorted(c for c in found if "cuda_graph" not in c and not c.startswith(checks))


def test_decode_1_has_a_copy_without_relax_graphs_for_the_step_graph(tiny_cuda):
    """The finalize phase keeps Relax's CUDA graphs in decode_1 and copies it, without them,
    into the entry point kiln.runtime.step_graph captures whole: the same kernels, externs
    and KV-cache calls as decode_1 and the graphs lifted out of it (each called once)."""
    funcs = relax_functions((tiny_cuda.parent / "ir" / "5-finalize.py").read_text())
    plain, graphed = funcs[STEP_GRAPH_ENTRY], funcs["decode_1"]
    assert "cuda_graph" in graphed and "cuda_graph" not in plain
    lifted = [f for name, f in funcs.items() if name.startswith("decode_1_cuda_graph_capture")]
    assert lifted
    assert len(calls(plain)) > 20
    assert calls(plain) == calls(graphed, *lifted)


def test_decode_has_a_copy_captured_per_batch_size(tiny_cuda):
    """The finalize phase copies decode into the manifest's batch_graphs entry, whose runs
    between KV-cache calls are CUDA graphs keyed by the batch size, in static memory for the
    bound, calling what decode calls; decode keeps its symbolic batch (any size) unkeyed."""
    manifest = json.loads((tiny_cuda / "manifest.json").read_text())
    entry = manifest["batch_graphs"]
    assert entry == {"entry": cuda.BATCH_GRAPHS[0], "max_batch": cuda.BATCH_GRAPHS[1]}
    funcs = relax_functions((tiny_cuda.parent / "ir" / "5-finalize.py").read_text())
    plain, graphed = funcs["decode"], funcs[entry["entry"]]
    bound = f'"tir_var_upper_bound": {{"batch_size": {entry["max_batch"]}}}'
    assert bound in graphed and bound not in plain

    def captures(text: str) -> list[tuple[str, str]]:
        """(lifted function, the shape it is keyed by or "") of each run_or_capture."""
        call = r"cuda_graph\.run_or_capture\", \(cls\.(\w+), \(.*?\), \d+(?:, (\w+))?\)"
        return re.findall(call, text)

    keyed = captures(graphed)
    layers = manifest["model"]["config"]["num_hidden_layers"]
    assert len(keyed) == layers + 1 and all(key for _, key in keyed)  # one a KV-cache call apart
    assert not any(key for _, key in captures(plain))
    lifted = [funcs[name] for name, _ in keyed]
    assert all("shape_expr: R.Shape([batch_size])" in f for f in lifted)
    plain_lifted = [funcs[name] for name in {name for name, _ in captures(plain)}]
    assert len(calls(graphed, *lifted)) > 20
    assert set(calls(graphed, *lifted)) == set(calls(plain, *plain_lifted))


@needs_nvcc
def test_fp16_decode_takes_kilns_swiglu_and_norm(tiny_cuda):
    """Float16 weights: the batch-1 decode's gate/up Linear and SiLU*up are one
    kiln.gemv.f16_swiglu call, and every residual add with its RMSNorm is kiln.gemv.add_rms_norm
    (decode and prefill alike); the batched decode's gate/up stays a GEMM (cuBLAS)."""
    funcs = relax_functions((tiny_cuda.parent / "ir" / "5-finalize.py").read_text())
    manifest = json.loads((tiny_cuda / "manifest.json").read_text())
    layers = manifest["model"]["config"]["num_hidden_layers"]
    assert {gemv.F16_SWIGLU, gemv.ADD_RMS_NORM} <= set(manifest["target"]["externs"])
    # Layer 0's first norm has no add before it; prefill normalizes its last token's state
    # alone at the end (a slice, not the add)
    want = {
        "decode_1": (layers, 2 * layers),
        "decode": (0, 2 * layers),
        "prefill": (0, 2 * layers - 1),
    }
    for name, (swiglu, norms) in want.items():
        lifted = [f for n, f in funcs.items() if n.startswith(f"{name}_cuda_graph_capture")]
        found = calls(funcs[name], *lifted)
        assert found.count(gemv.F16_SWIGLU) == swiglu, name
        assert found.count(gemv.ADD_RMS_NORM) == norms, name
        assert not any(c.startswith("add_rms_norm") for c in found), name
