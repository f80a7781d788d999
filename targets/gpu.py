"""Pieces the GPU targets share: legalization and kernel scheduling with dlight."""

from __future__ import annotations

import tvm
from tvm.target import Target


def gpu_legalize(_target: Target) -> list[tvm.transform.Pass]:
    """Relax ops -> TIR kernels, fused; scheduling is a phase of its own (dlight_schedule)."""
    return [
        tvm.relax.transform.LegalizeOps(),
        tvm.relax.transform.AnnotateTIROpPattern(),
        tvm.relax.transform.FoldConstant(),
        tvm.relax.transform.FuseOps(),
        tvm.relax.transform.FuseTIR(),
    ]


def dlight_schedule(_target: Target) -> list[tvm.transform.Pass]:
    """Give every unscheduled kernel a GPU schedule (matmul, GEMV, reductions, elementwise).
    Kernels that come scheduled (the KV cache's attention) are left as they are."""
    from tvm.s_tir import dlight as dl

    return [
        dl.ApplyDefaultSchedule(
            dl.gpu.Matmul(),
            dl.gpu.GEMV(),
            dl.gpu.Reduction(),
            dl.gpu.GeneralReduction(),
            dl.gpu.Fallback(),
        )
    ]
