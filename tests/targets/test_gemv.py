"""Kiln's batch-1 GEMV schedule (kiln.targets.gemv): which kernels it takes, and what it makes
of them. Its numbers are checked on a GPU (tests/gpu: every CUDA artifact's decode against
transformers; bench/gemv.py: each kernel against NumPy)."""

from __future__ import annotations

import pytest
import tvm
from tvm.relax.frontend import nn

from kiln.compiler.quantization import get_quantization
from kiln.passes.fold_weight_transpose import FoldWeightTranspose
from kiln.targets import cuda
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
