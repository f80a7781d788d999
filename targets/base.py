"""The contract every target implements: one frozen `TargetSpec` per vendor."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import tvm
from tvm.target import Target

PassList = Callable[[Target], list[tvm.transform.Pass]]


def _none(_target: Target) -> list[tvm.transform.Pass]:
    return []


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
    library_suffix: str = ".so"
    dtypes: tuple[str, ...] = ("float32", "float16")  # activation dtypes it runs
    notes: dict[str, Any] = field(default_factory=dict)

    def target(self, arch: str | None = None) -> Target:
        return self.make_target(arch or self.default_arch)

    def export_library(self, executable: Any, path: str) -> None:
        executable.export_library(path)
