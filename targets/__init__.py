"""Compilation targets: one file per vendor behind the `TargetSpec` contract."""

from __future__ import annotations

from kiln.runtime.errors import KilnError
from kiln.targets.base import TargetSpec
from kiln.targets.cpu import CPU
from kiln.targets.cuda import CUDA

TARGETS: dict[str, TargetSpec] = {"cpu": CPU, "cuda": CUDA}


def get_target(name: str) -> TargetSpec:
    if name not in TARGETS:
        raise KilnError(f"unknown target {name!r}: choose one of {', '.join(TARGETS)}")
    return TARGETS[name]
