"""Kiln's CUDA schedule rules: the batch-1 GEMV (kiln.targets.gemv) and the prefill's
whole-weight dequantize (kiln.targets.dequantize): which kernels each takes, and what it makes of
them. Their numbers are checked on a GPU (tests/gpu/test_cuda.py: every CUDA artifact's decode,
and every q4f16 one's prefill, whose Linears dequantize before cuBLAS, against transformers;
bench/gemv.py: each GEMV against NumPy)."""

from __future__ import annotations

import shutil

import pytest
import tvm
from tvm import te
from tvm.relax.frontend import nn

from kiln.compiler.quantization import get_quantization
from kiln.compiler.quantization.layers import dequantize_te
from kiln.passes.fold_weight_transpose import FoldWeightTranspose
from kiln.targets import cuda
from kiln.targets.dequantize import DequantizeWeight
from kiln.targets.gemv import DecodeGEMV
from kiln.targets.gpu import gpu_legalize

TARGET = cuda._make_target("sm_90")


class Proj(nn.Module):
    def __init__(self, proj: nn.Module):
        self.proj = proj

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.proj(x)


def matmul_kernel(preset: str, rows: int, cols: int, batch: int | str = 1) -> tvm.tirx.PrimFunc:
    """The TIR kernel of x (batch, 1, cols) @ W.T for a (rows, cols) weight in `preset`."""
    model = Proj(nn.Linear(cols, rows, False, "float16"))
    get_quantization(preset).quantize_model(model)
    mod, _ = model.export_tvm({"forward": {"x": nn.spec.Tensor((batch, 1, cols), "float16")}})
    with TARGET:
        mod = tvm.transform.Sequential([FoldWeightTranspose(), *gpu_legalize(TARGET)])(mod)
    (kernel,) = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    return kernel


def cuda_source(kernel: tvm.tirx.PrimFunc) -> str:
    with TARGET:
        sch = DecodeGEMV().apply(kernel, TARGET, False)
        assert sch is not None
        mod = tvm.IRModule({"gemv": sch.mod["main"].with_attr("global_symbol", "gemv")})
        built = tvm.compile(mod, target=TARGET)
    return built.mod.imports[0].inspect_source()


@pytest.mark.parametrize("rows,cols", [(256, 512), (96, 4096), (64, 11008)])
def test_float_gemv_loads_16_bytes_per_thread(rows, cols):
    source = cuda_source(matmul_kernel("q0f16", rows, cols))
    # The weight and the vector come in with 128-bit loads, lanes of a row meet in a warp
    # reduction, and the fp32 result is cast back once per row.
    assert "*(uint4*)(proj_weight_ptr" in source
    assert "*(uint4*)(x_ptr" in source
    assert "__shfl_down_sync" in source
    assert "__launch_bounds__(256)" in source


@pytest.mark.parametrize(
    "preset,batch,why",
    [
        ("q4f16", 1, "packed int4 weights: dlight's GEMV measured faster"),
        ("q0f16", "b", "a symbolic batch: the batched decode"),
        ("q0f16", 16, "a GEMM, not a GEMV"),
    ],
)
def test_declines(preset, batch, why):
    kernel = matmul_kernel(preset, 256, 512, batch)
    with TARGET:
        assert DecodeGEMV().apply(kernel, TARGET, False) is None, why


def test_declines_a_row_length_no_load_divides():
    # 8 fp16 values per load do not divide 100 columns.
    with TARGET:
        assert DecodeGEMV().apply(matmul_kernel("q0f16", 64, 100), TARGET, False) is None


def test_cuda_build_schedules_decode_gemvs_with_it():
    """The CUDA target tries it before dlight's rules; other GPU targets do not have it."""
    from kiln.targets import metal, rocm

    assert isinstance(_rules(cuda.CUDA, "sm_90")[0], DecodeGEMV)
    assert not any(isinstance(r, DecodeGEMV) for r in _rules(rocm.ROCM, "gfx942"))
    assert not any(isinstance(r, DecodeGEMV) for r in _rules(metal.METAL, None))


def _rules(spec, arch: str | None) -> list:
    """The schedule rules a target's schedule phase applies, in order (unwrapped)."""
    seen = []
    real_apply = tvm.s_tir.dlight.ApplyDefaultSchedule

    def record(*rules):
        seen.extend(getattr(r, "rule", r) for r in rules)
        return real_apply(*rules)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tvm.s_tir.dlight, "ApplyDefaultSchedule", record)
        spec.schedule(spec.target(arch))
    return seen


# The whole-weight dequantize before cuBLAS


def dequantize_kernel(preset: str, rows: int, cols: int) -> tvm.tirx.PrimFunc:
    q = get_quantization(preset)
    stored = [te.placeholder(s, d, name=n) for n, (s, d) in q.storage(rows, cols).items()]
    out = dequantize_te(q, rows, cols)(*stored)
    return te.create_prim_func([*stored, out], index_dtype_override="int64")


@pytest.mark.parametrize("preset,rows,cols", [("q4f16", 4096, 4096), ("q4f16", 100, 96),
                                               ("q4f16_fe", 64, 11008)])  # fmt: skip
def test_each_thread_writes_16_bytes(preset, rows, cols):
    with TARGET:
        sch = DequantizeWeight().apply(dequantize_kernel(preset, rows, cols), TARGET, False)
        assert sch is not None
        mod = tvm.IRModule({"deq": sch.mod["main"].with_attr("global_symbol", "deq")})
        source = tvm.compile(mod, target=TARGET).mod.imports[0].inspect_source()
    assert "*(uint4*)(dequantize_ptr" in source  # 8 fp16 values in one store
    assert "blockIdx.x" in source and "threadIdx.x" in source
    if shutil.which(
        "nvcc"
    ):  # as kiln compile builds it (TVM's codegen can write what nvcc refuses)
        assert cuda.compile_fatbin(source, ["sm_90"])


def test_declines_a_linears_own_kernel_and_a_row_no_store_divides():
    with TARGET:
        # the dequantize feeds a matmul in the same kernel: a GEMM or GEMV rule's
        assert DequantizeWeight().apply(matmul_kernel("q4f16", 256, 512, 16), TARGET, False) is None
        # fp8 weights of 100 columns: no whole number of 8-value stores a row
        odd = dequantize_kernel("fp8e4m3", 64, 100)
        assert DequantizeWeight().apply(odd, TARGET, False) is None
        assert DequantizeWeight().apply(dequantize_kernel("fp8e4m3", 64, 96), TARGET, False)


def test_the_cuda_build_schedules_with_it():
    from kiln.targets import metal, rocm

    assert any(isinstance(r, DequantizeWeight) for r in _rules(cuda.CUDA, "sm_90"))
    assert not any(isinstance(r, DequantizeWeight) for r in _rules(rocm.ROCM, "gfx942"))
    assert not any(isinstance(r, DequantizeWeight) for r in _rules(metal.METAL, None))
