"""Pieces the GPU targets share: legalization and kernel scheduling with dlight."""

from __future__ import annotations

import inspect
import os
import sys

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


def dlight_schedule(_target: Target, first: tuple = ()) -> list[tvm.transform.Pass]:
    """Give every unscheduled kernel a GPU schedule (matmul, GEMV, reductions, elementwise),
    trying a target's own rules (`first`) before dlight's. Kernels that come scheduled (the KV
    cache's attention) are left as they are."""
    from tvm.s_tir import dlight as dl

    _teach_inspect_frozen_modules()

    rules = [
        *first,
        dl.gpu.Matmul(),
        dl.gpu.GEMV(),
        dl.gpu.Reduction(),
        dl.gpu.GeneralReduction(),
    ]
    return [dl.ApplyDefaultSchedule(*map(_declining, rules), dl.gpu.Fallback())]


def _declining(rule):
    """`rule`, declining a kernel its analysis trips over instead of failing the build; the
    next rule schedules it. dlight's GEMV asserts on a reduction whose spatial loops are all
    of extent 1, such as Mixtral's expert weights from the router in the batch-1 decode."""
    from tvm.s_tir.dlight import ScheduleRule

    class Declining(ScheduleRule):
        def apply(self, func, target, tunable):
            try:
                return rule.apply(func, target, tunable)
            except AssertionError as e:
                if os.environ.get("KILN_DEBUG"):
                    print(f"kiln: {type(rule).__name__} declined a kernel ({e!r}):\n"
                          f"{func.script()}", file=sys.stderr)  # fmt: skip
                return None

    declining = Declining()
    declining.rule = rule
    return declining


def _teach_inspect_frozen_modules() -> None:
    """Make TVM's tensor-core intrinsics import in seconds instead of a minute.

    dl.gpu.Matmul imports tvm.s_tir.tensor_intrin on first use (CUDA, Metal): ~500 TVMScript
    functions, each parsed after an `inspect.stack()`. For every frame whose file does not exist,
    such as the import machinery's `<frozen importlib._bootstrap>`, inspect.getmodule rescans all
    of sys.modules and caches nothing: about 30 s with torch loaded (2,000 modules), once per
    process. Naming those frames' modules up front skips the scans; the stack TVM gets is the
    same (frozen modules have no source lines either way)."""
    for name, module in list(sys.modules.items()):
        if getattr(getattr(module, "__spec__", None), "origin", None) == "frozen":
            inspect.modulesbyfile.setdefault(f"<frozen {name}>", name)
