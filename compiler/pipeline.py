"""The one place the order of compiler passes lives, in named phases.

    graph -> library_dispatch -> legalize -> schedule -> dataflow_lower -> finalize

Before these, on the exported model, CombineParallelMatmul joins Linears that read one input
(q/k/v, gate/up): it changes the model's parameters, so kiln.compiler.combine runs it before
the parameter list, the weight conversion and the build are derived (`model_passes`).
`graph` holds Kiln's own rewrites (passes/): first the models' abstract attention and KV-cache
ops become TVM's paged KV cache (with the target's attention kernels), then target-independent
graph rewrites. The other phases come from the target's `TargetSpec`. With `dump_dir`, the IR
after each phase is written as TVMScript.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import tvm
from tvm import relax
from tvm.target import Target

from kiln.compiler.quantization.layers import LinearKernels
from kiln.passes.combine_parallel_matmul import CombineParallelMatmul
from kiln.passes.fold_weight_transpose import FoldWeightTranspose
from kiln.passes.fuse_add_rms_norm import FuseAddRMSNorm
from kiln.passes.fuse_dequantize_matmul import FuseDequantizeMatmul
from kiln.passes.fuse_swiglu import FuseSwiGLU
from kiln.passes.lower_paged_kv_cache import LowerPagedKVCache
from kiln.targets.base import TargetSpec


def model_passes(
    param_names: Sequence[str], kernels: LinearKernels | None
) -> list[tvm.transform.Pass]:
    """The passes that change the model's parameters (kiln.compiler.combine runs them)."""
    return [CombineParallelMatmul(param_names, kernels)]


PHASES = ("graph", "library_dispatch", "legalize", "schedule", "dataflow_lower", "finalize")


def graph_passes(
    target: Target,
    attention_externs: Callable[[str, int], dict[str, str]] | None = None,
    fuse_swiglu: bool = False,
) -> list[tvm.transform.Pass]:
    return [
        LowerPagedKVCache(target, attention_externs),
        # nn.Linear is matmul(x, permute_dims(W)): fold the transpose into the matmul so no
        # weight is transposed at run time.
        FoldWeightTranspose(),
        # SiLU(gate) * up -> the gate/up kernel's epilogue, where the target's schedules allow.
        *([FuseSwiGLU()] if fuse_swiglu else []),
        # s = x + r; y = rms_norm(s, w) -> one kernel writing s and y.
        FuseAddRMSNorm(),
        relax.transform.DeadCodeElimination(),
    ]


def phases(spec: TargetSpec, target: Target) -> list[tuple[str, list[tvm.transform.Pass]]]:
    return [
        (
            "graph",
            graph_passes(
                target, functools.partial(spec.attention_externs, target), spec.fuse_swiglu
            ),
        ),
        ("library_dispatch", spec.library_dispatch(target)),
        ("legalize", spec.legalize(target)),
        # Kernels the target's schedule leaves alone (all of them on the CPU) still must not
        # write a dequantized copy of a weight.
        ("schedule", [*spec.schedule(target), FuseDequantizeMatmul()]),
        ("dataflow_lower", spec.dataflow_lower(target)),
        ("finalize", spec.finalize(target)),
    ]


def relax_pipeline(
    spec: TargetSpec, target: Target, dump_dir: Path | None = None
) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="kiln_pipeline")
    def _run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            for i, (name, passes) in enumerate(phases(spec, target)):
                mod = tvm.transform.Sequential(passes, name=name)(mod)
                if dump_dir is not None:
                    dump_dir.mkdir(parents=True, exist_ok=True)
                    (dump_dir / f"{i}-{name}.py").write_text(mod.script())
        return mod

    return _run
