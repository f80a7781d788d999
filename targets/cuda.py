"""NVIDIA CUDA: kernels compiled ahead of time into a fatbin (SASS per arch + PTX for the newest).

TVM's CUDA codegen emits CUDA C++ and, left alone, the runtime compiles it when the library is
loaded. Here the source is compiled at build time with nvcc into one fatbin, which replaces the
source inside the library, so loading an artifact never runs a compiler. Builds are cached by
content hash (source, archs, nvcc version), so an unchanged kernel set is never rebuilt.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tvm
import tvm_ffi
from tvm.relax.backend.cuda import pipeline as cuda_pipeline
from tvm.target import Target

from kiln.compiler.quantization import QUANTIZATIONS
from kiln.compiler.quantization.int4_group import Int4Group
from kiln.compiler.quantization.layers import scheme_key
from kiln.passes.dispatch_gemv import DispatchGEMV, GEMVExterns
from kiln.passes.dispatch_matmul import DispatchMatmul
from kiln.passes.dispatch_moe import DispatchMoE, MoEExterns
from kiln.passes.fuse_add_rms_norm import DispatchAddRMSNorm
from kiln.passes.sink_param_unpack import SinkParamUnpack
from kiln.passes.step_graph_entry import AddEntry, RewriteCUDAGraphExcept, batch_graph_entry
from kiln.runtime import attention, gemv
from kiln.runtime.cublas import MATMUL as CUBLAS_MATMUL
from kiln.runtime.errors import KilnError
from kiln.runtime.step_graph import STEP_GRAPH_ENTRY
from kiln.targets import nvrtc
from kiln.targets.base import TargetSpec
from kiln.targets.blob import (
    Blob,
    join_device_payload,
    kernel_names,
    split_device_payload,
    write_blob_asm,
)
from kiln.targets.dequantize import DequantizeWeight
from kiln.targets.gemv import DecodeGEMV
from kiln.targets.gpu import dlight_schedule, gpu_legalize

DEFAULT_ARCHS = "sm_80,sm_86,sm_89,sm_90"
GEMV_GROUP = 32  # the int4 layout kiln.runtime.gemv reads: one scale per 32 input features
_ARCH = re.compile(r"^sm_(\d+)(a?)$")
# The batched decode's CUDA graphs: a copy of decode captured per batch size up to 128
# sequences (static memory sized for 128); more run on decode itself.
BATCH_GRAPHS = ("decode_graphs", 128)


def cuda_schedule(target: Target) -> list[tvm.transform.Pass]:
    # Kiln's batch-1 GEMV of float weights (16-byte loads) and the prefill's whole-weight
    # dequantize (16-byte stores) ahead of dlight's rules.
    return dlight_schedule(target, first=(DecodeGEMV(), DequantizeWeight()))


def cuda_finalize(target: Target) -> list[tvm.transform.Pass]:
    # TVM's, with a copy of decode_1 that Relax's CUDA graphs leave alone, for the runtime's
    # capture of the whole batch-1 step (kiln.runtime.step_graph), and a copy of decode that
    # they capture per batch size; then each weight unpacked where it is first read, so that a
    # pass's first kernel is queued before the rest.
    passes = [
        RewriteCUDAGraphExcept([STEP_GRAPH_ENTRY]) if p.info.name == "RewriteCUDAGraph" else p
        for p in cuda_pipeline.finalize_passes(target)
    ]
    return [
        AddEntry("decode_1", STEP_GRAPH_ENTRY),
        batch_graph_entry("decode", BATCH_GRAPHS[0], "batch_size", BATCH_GRAPHS[1]),
        *passes,
        SinkParamUnpack,
    ]


def cuda_library_dispatch(target: Target) -> list[tvm.transform.Pass]:
    # TVM's sampling and sort/scan dispatch; the decode's int4 GEMVs (the MLP's gate/up with
    # SiLU*up as its epilogue) to Kiln's GEMV kernels (kiln.runtime.gemv); then the fp16/bf16
    # GEMMs of prefill and batched decode (symbolic rows), quantized ones after a dequantize
    # kernel, to cuBLAS (kiln.runtime.cublas); dlight and Kiln's float GEMV schedule the rest.
    return [
        *cuda_pipeline.library_dispatch_passes(target),
        *_gemv_dispatch(target),
        # Quantized Linears left with symbolic rows (prefill's) too: a dequantize kernel, then
        # cuBLAS, instead of dlight's dequantizing GEMM (a quarter of the tensor cores' peak).
        DispatchMatmul(CUBLAS_MATMUL, dequantize=True),
    ]


def _gemv_dispatch(target: Target) -> list[tvm.transform.Pass]:
    """Kiln's GEMV externs where they run (sm_80 and newer) and nvcc can build them."""
    if not gemv.supports([str(target.attrs["arch"])]) or attention.find_nvcc() is None:
        return []
    int4 = {
        scheme_key(q): GEMVExterns(
            gemv.Q4, gemv.Q4_SWIGLU, cols_multiple=GEMV_GROUP, batched=gemv.Q4_BATCHED
        )
        for q in QUANTIZATIONS.values()
        if isinstance(q, Int4Group) and q.group_size == GEMV_GROUP and q.model_dtype == "float16"
    }
    # fp16 weights at batch 1: the gate/up GEMV with SiLU*up in one kernel
    # (kiln.gemv.f16_swiglu, a warp a weight row: on an H200 the 7B's 43.2 us against 44.0 for
    # Kiln's TIR GEMV alone); their other Linears keep that TIR GEMV (kiln.targets.gemv), which
    # beat the same kernel on the 7B's down projection. Every residual add and RMSNorm is
    # kiln.gemv.add_rms_norm. The batched decode's int4 Linears go to kiln.gemv.q4_batched:
    # GEMVs up to 8 sequences, an int4 tensor-core GEMM up to 64, past that a dequantize and
    # cuBLAS (dlight's dequantizing GEMMs are the alternative: bench/RESULTS.md). A mixture of
    # experts' MLP at batch 1 then reads only the routed experts' int4 weights
    # (kiln.gemv.q4_moe_swiglu and q4_moe), its router one kernel (kiln.gemv.moe_route).
    moe = MoEExterns(
        gemv.Q4_SWIGLU,
        gemv.Q4,
        gemv.Q4_MOE_SWIGLU,
        gemv.Q4_MOE,
        max_experts=gemv.MAX_EXPERTS,
        max_rows=gemv.MAX_ROWS,
        route=gemv.MOE_ROUTE,
    )
    return [
        DispatchGEMV(int4, {"float16": gemv.F16_SWIGLU}, batched=("decode",)),
        DispatchMoE(moe),
        DispatchAddRMSNorm(gemv.ADD_RMS_NORM, "float16", 8, gemv.MAX_NORM_HIDDEN),
    ]


def cuda_attention_externs(target: Target, dtype: str, head_dim: int) -> dict[str, str]:
    """Kiln's attention kernels (kiln.runtime.attention: tensor-core prefill, split-keys decode
    that also does RoPE and the KV append) in place of TVM's ragged and paged prefill kernels,
    its decode kernel, RoPE and append (where the cache allows it:
    kiln.passes.lower_paged_kv_cache), for the caches they handle on sm_80 and newer (the
    target's arch is the oldest built for), when there is an nvcc to build them with."""
    if dtype not in attention.DTYPES or head_dim not in attention.HEAD_DIMS:
        return {}
    if not attention.supports([str(target.attrs["arch"])]):
        return {}
    if attention.find_nvcc() is None:
        warnings.warn(
            "attention runs on TVM's kernels (prefill on CUDA cores, several times slower): "
            f"Kiln's kernels are built with nvcc, found none; {attention.INSTALL_NVCC}",
            stacklevel=2,
        )
        return {}
    return {
        "ragged": attention.PREFILL_RAGGED,
        "paged": attention.PREFILL_PAGED,
        "decode": attention.DECODE_PAGED,
        "rope": attention.SPLIT_ROPE,
        "append": attention.APPEND_KV,
    }


def parse_archs(arch: str | None) -> list[str]:
    archs = [a.strip() for a in (arch or DEFAULT_ARCHS).split(",") if a.strip()]
    bad = [a for a in archs if not _ARCH.match(a)]
    if bad or not archs:
        raise KilnError(
            f"--arch {bad[0] if bad else arch!r} is not a CUDA architecture: give a "
            "comma-separated list such as sm_80,sm_89,sm_90 (sm_90a for Hopper-only features)"
        )
    return sorted(set(archs), key=lambda a: (int(_ARCH.match(a)[1]), a))


def _make_target(arch: str | None) -> Target:
    # Code is generated once, for the oldest arch asked for, so that it runs on every one;
    # nvcc then emits SASS for each.
    oldest = parse_archs(arch)[0]
    # 48 KiB is what a block gets without opting in to more on every arch; saying so keeps
    # TVM's sort and scan kernels from warning that the target does not tell.
    return Target(
        {"kind": "cuda", "arch": oldest.rstrip("a"), "max_shared_memory_per_block": 49152},
        host={"kind": "llvm"},
    )


def _find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    return "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None


def _nvcc() -> str:
    nvcc = _find_nvcc()
    if nvcc is None:
        raise KilnError(
            "compiling for --target cuda needs nvcc (the CUDA toolkit) on PATH, or NVRTC: "
            "pip install 'kiln[cuda]'"
        )
    return nvcc


@functools.cache
def _nvcc_version(nvcc: str) -> str:
    return subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout


def cache_dir() -> Path:
    root = os.environ.get("KILN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kiln"
    )
    return Path(root) / "cuda"


def _compiler() -> str:
    """nvcc when present, else NVRTC from pip; KILN_CUDA_COMPILER=nvcc|nvrtc chooses."""
    choice = os.environ.get("KILN_CUDA_COMPILER")
    if choice not in (None, "nvcc", "nvrtc"):
        raise KilnError(f"KILN_CUDA_COMPILER must be nvcc or nvrtc, not {choice!r}")
    if choice == "nvrtc" or (choice is None and _find_nvcc() is None and nvrtc.available()):
        return "nvrtc"
    return "nvcc"


def compile_fatbin(source: str, archs: Sequence[str]) -> bytes:
    """CUDA source -> one fatbin with SASS for every arch and PTX for the newest."""
    compiler = _compiler()
    identity = nvrtc.version() if compiler == "nvrtc" else _nvcc_version(_nvcc())
    key = hashlib.sha256("\0".join([source, ",".join(archs), identity]).encode()).hexdigest()
    cached = cache_dir() / f"{key}.fatbin"
    if cached.is_file():
        return cached.read_bytes()
    if compiler == "nvrtc":
        data = write_fatbin(nvrtc.compile_images(source, archs))
    else:
        data = _nvcc_fatbin(source, archs)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp_file.write_bytes(data)
    tmp_file.replace(cached)
    return data


def _nvcc_fatbin(source: str, archs: Sequence[str]) -> bytes:
    nvcc = _nvcc()
    with tempfile.TemporaryDirectory(prefix="kiln-cuda-") as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        src.write_text(source)
        # --threads 0: nvcc compiles the archs in parallel on every core.
        cmd = [nvcc, "--fatbin", "-O3", "-std=c++17", "-w", "--threads", "0"]
        for i, arch in enumerate(archs):
            number = arch.removeprefix("sm_")
            codes = f"sm_{number}" + (f",compute_{number}" if i == len(archs) - 1 else "")
            cmd += ["-gencode", f"arch=compute_{number},code=[{codes}]"]
        done = subprocess.run([*cmd, "-o", str(out), str(src)], capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise KilnError(
                f"nvcc could not compile the kernels for {','.join(archs)} ({last}); check that "
                "this nvcc supports those archs"
            )
        return out.read_bytes()


def fatbin_images(data: bytes) -> list[tuple[str, int, bytes]]:
    """(kind, sm, image) for each image in a fatbin: kind "elf" (SASS) or "ptx" (may be
    compressed). The container: a 16-byte header (magic 0xBA55ED50, version, header size,
    size of the rest), then entries of a header (kind 1 = PTX, 2 = ELF; its own size; payload
    size as u64 at byte 8; sm version at byte 28) and a payload."""
    magic, _version, header_size, size = struct.unpack_from("<IHHQ", data, 0)
    if magic != 0xBA55ED50:
        raise ValueError("not a fatbin")
    images, offset = [], header_size
    while offset < header_size + size:
        kind, _, entry_header, padded = struct.unpack_from("<HHIQ", data, offset)
        (sm,) = struct.unpack_from("<I", data, offset + 28)
        payload = data[offset + entry_header : offset + entry_header + padded]
        images.append(({1: "ptx", 2: "elf"}.get(kind, str(kind)), sm, payload))
        offset += entry_header + padded
    return images


def write_fatbin(images: Sequence[tuple[str, int, bytes]]) -> bytes:
    """Pack (kind, sm, image) into a fatbin container, uncompressed, laid out as nvcc
    --no-compress writes it (checked byte for byte in the tests)."""
    body = b""
    for kind, sm, image in images:
        image = image.ljust(-(-len(image) // 8) * 8, b"\0")  # NUL-padded to 8 bytes
        if kind == "elf":
            header = struct.pack(
                "<HHIQIIIIIIQ", 2, 0x0101, 64, len(image), 0, 0, 0x00010008, sm, 0, 0, 0x11
            )
            header = header.ljust(64, b"\0")
        else:
            version = re.search(rb"\.version (\d+)\.(\d+)", image)
            ptx_version = (int(version[1]) << 16 | int(version[2])) if version else 0
            header = struct.pack(
                "<HHIQIIIIIIQ", 1, 0x0101, 80, len(image), 0, 0x40, ptx_version, sm, 0, 0, 0x11
            )
            header = header.ljust(64, b"\0") + struct.pack("<I", 0x48).ljust(16, b"\0")
        body += header + image
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body


def export_library(
    executable: Any, path: str, arch: str | None, fcompile: Any = None
) -> dict[str, Any]:
    """Write the host library with the kernels as one fatbin; returns what the manifest
    records about the device code."""
    archs = parse_archs(arch)
    raw = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(executable.mod)
    blob = Blob.parse(bytes(raw.numpy()))
    kernels: list[str] = []
    fatbins: list[bytes] = []

    def to_fatbin(payload: bytes) -> bytes:
        fmt, fmap, source = split_device_payload(payload)
        if fmt != "cuda":
            raise KilnError(f"unexpected CUDA module format {fmt!r} from TVM's codegen")
        kernels.extend(kernel_names(fmap))
        fatbins.append(compile_fatbin(source.decode(), archs))
        return join_device_payload("fatbin", fmap, fatbins[-1])

    if blob.rewrite("cuda", to_fatbin) == 0:
        raise KilnError("the CUDA build produced no device kernels (a Kiln bug)")
    packed = blob.serialize()

    def pack(_mod: Any, _is_system_lib: bool, _prefix: str, workspace: str) -> str:
        return str(write_blob_asm(packed, Path(workspace)))

    link = {"fcompile": fcompile} if fcompile else {}
    executable.mod.export_library(path, fpack_imports=pack, **link)
    images = [f"{kind}:sm_{sm}" for f in fatbins for kind, sm, _ in fatbin_images(f)]
    return {
        "archs": archs,
        "device_code": {"format": "fatbin", "images": images, "kernels": sorted(kernels)},
    }


def describe_compiler() -> str:
    nvcc = _find_nvcc()
    if nvcc:
        return f"nvcc ({nvcc})"
    if nvrtc.available():
        return f"{nvrtc.version()} from pip (no nvcc on PATH)"
    return "nvcc on PATH, or NVRTC: pip install 'kiln[cuda]' (neither found)"


CUDA = TargetSpec(
    name="cuda",
    device="cuda",
    description="NVIDIA GPUs: fatbin with SASS per --arch and PTX for the newest "
    "(needs nvcc, or NVRTC: pip install 'kiln[cuda]')",
    default_arch=DEFAULT_ARCHS,
    make_target=_make_target,
    library_dispatch=cuda_library_dispatch,
    legalize=gpu_legalize,
    schedule=cuda_schedule,
    dataflow_lower=cuda_pipeline.dataflow_lower_passes,
    finalize=cuda_finalize,
    export=export_library,
    toolchain=describe_compiler,
    # The finalize phase's RewriteCUDAGraph lifts each run of static-shape kernel launches
    # (in the batch-1 decode: everything between two KV-cache calls) into a CUDA graph that is
    # captured on the first call and replayed after: one launch instead of dozens.
    pass_config=(("relax.backend.use_cuda_graph", True),),
    batch_graphs=BATCH_GRAPHS,
    attention_externs=cuda_attention_externs,
)
