"""The contract every target implements: one frozen `TargetSpec` per vendor."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tvm
from tvm.target import Target

PassList = Callable[[Target], list[tvm.transform.Pass]]


def _none(_target: Target) -> list[tvm.transform.Pass]:
    return []


def _no_externs(_target: Target, _dtype: str, _head_dim: int) -> dict[str, str]:
    return {}


def _export_host_library(
    executable: Any, path: str, _arch: str | None, fcompile: Any = None
) -> dict[str, Any]:
    executable.export_library(path, **({"fcompile": fcompile} if fcompile else {}))
    return {}


@dataclass(frozen=True)
class TargetSpec:
    """What the compiler needs to know about a target; passes never branch on the target name.

    The pipeline phases (see kiln.compiler.pipeline) take their target-specific passes from here.
    """

    name: str  # "cpu", "cuda", ...
    device: str  # the runtime device kind an artifact for it runs on ("cpu", "cuda", ...)
    description: str
    default_arch: str | None
    make_target: Callable[[str | None], Target]
    library_dispatch: PassList = _none
    legalize: PassList = _none
    schedule: PassList = _none  # kernel scheduling (dlight rules on GPUs)
    dataflow_lower: PassList = _none
    finalize: PassList = _none
    # Writes the compiled library (with `fcompile`, TVM's link hook, when cross-compiling);
    # returns what the manifest records about its device code.
    export: Callable[..., dict[str, Any]] = _export_host_library
    library_suffix: str = ".so"
    dtypes: tuple[str, ...] = ("float32", "float16")  # activation dtypes it runs
    # Targets whose machine code runs on one architecture only (a ROCm code object) build one
    # library per --arch entry: this splits --arch into those builds. None: one library.
    split_arch: Callable[[str | None], list[str]] | None = None
    # What building for it needs besides TVM, and where that was found (`kiln targets`).
    toolchain: Callable[[], str] | None = None
    # Platforms whose host code it builds (`kiln compile --platform`, kiln.targets.cross).
    platforms: tuple[str, ...] = ("linux-x86_64", "linux-aarch64")
    # TVM PassContext options the build runs under, as (key, value) pairs.
    pass_config: tuple[tuple[str, Any], ...] = ()
    # The extern functions that run the paged KV cache's attention in place of TVM's kernels,
    # for (target, cache dtype, head_dim): {"ragged": name, "paged": name, "decode": name}, a
    # kind left out keeps TVM's kernel (kiln.passes.lower_paged_kv_cache).
    attention_externs: Callable[[Target, str, int], dict[str, str]] = _no_externs
    # Whether its kernels may end with the MLP's SiLU(gate) * up (kiln.passes.fuse_swiglu): an
    # epilogue that reads two rows of the matmul's output, which GPU GEMV schedules split apart.
    fuse_swiglu: bool = False
    # (entry, most sequences): its finalize phase adds `entry`, a copy of the batched decode
    # captured into graphs per batch size up to that many (kiln.passes.step_graph_entry); the
    # manifest says so, and the runtime takes it for batches it holds.
    batch_graphs: tuple[str, int] | None = None

    def target(self, arch: str | None = None) -> Target:
        return self.make_target(arch or self.default_arch)
