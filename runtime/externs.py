"""Kiln's functions outside TVM that compiled code may call, and how each is provided.

An artifact's manifest lists the ones its code calls (`target.externs`, kiln.compiler.artifact).
`kiln compile` builds each into the artifact (`artifact_file`) when it compiles for its own
platform; the runtime registers them (`load_externs`) before the artifact's VM starts, from the
artifact's copy when it has one, else built on this machine or taken from the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kiln.runtime import attention, cublas, gemv
from kiln.runtime.artifact import Manifest
from kiln.runtime.errors import KilnError


@dataclass(frozen=True)
class Extern:
    artifact_file: str  # the built library's name inside an artifact
    # The library for the artifact's archs (None: the target's default), built or cached here.
    build: Callable[[Sequence[str] | None], Path]
    # Register the functions: from the built library given, or built here for the archs.
    load: Callable[[Path | None, Sequence[str] | None], object]


EXTERNS: dict[str, Extern] = {
    cublas.MATMUL: Extern(
        cublas.ARTIFACT_FILE, lambda _archs: cublas.build(), lambda lib, _: cublas.load_cublas(lib)
    ),
    # The attention externs are one library (an artifact calls some or all).
    **{
        name: Extern(attention.ARTIFACT_FILE, attention.build, attention.load_attention)
        for name in attention.FUNCTIONS
    },
    # The decode GEMVs: one library too.
    **{name: Extern(gemv.ARTIFACT_FILE, gemv.build, gemv.load_gemv) for name in gemv.FUNCTIONS},
}


def load_externs(manifest: Manifest) -> None:
    """Register the functions outside TVM that the artifact's code calls (its manifest lists
    them), before its VM starts: TVM's device runtime first (open_device), then these."""
    target = manifest.data["target"]
    for name in target.get("externs", []):
        extern = EXTERNS.get(name)
        if extern is None:
            raise KilnError(
                f"{manifest.root} calls {name}, which this version of Kiln does not provide: "
                "run it with the Kiln that compiled it, or compile it again"
            )
        built = manifest.root / extern.artifact_file
        try:
            extern.load(built if built.is_file() else None, target.get("archs"))
        except KilnError as e:
            raise KilnError(f"{manifest.root} cannot run here: {e}") from None
