"""Parallel projections -> one matmul (kiln.passes.combine_parallel_matmul), weights to match.

The pass changes the model's parameters (q, k and v become qkv), so it runs on the exported
model before anything is built from the parameter list; the preset's layout and the family's
weight map (and, with tensor parallelism, its splits) then describe the combined parameters:
a combined float weight is its parts' weights stacked along the rows, quantized whole.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import tvm

from kiln.compiler.export import Exported
from kiln.compiler.pipeline import model_passes
from kiln.compiler.quantization.base import ParamLayout
from kiln.compiler.quantization.layers import linear_kernels
from kiln.compiler.weights import Source
from kiln.models.sharding import Split
from kiln.passes.combine_parallel_matmul import combined_name
from kiln.runtime.errors import KilnError

Groups = dict[str, tuple[str, ...]]  # combined float parameter -> its parts, in row order


def combine_projections(exported: Exported, layout: ParamLayout) -> tuple[Exported, Groups]:
    """The exported model with parallel Linears combined, and the float parameters joined."""
    names = [name for name, _, _ in exported.params]
    passes = model_passes(names, linear_kernels(layout.schemes.values()))
    mod = tvm.transform.Sequential(passes)(exported.mod)
    if mod.attrs is None or "kiln.params" not in mod.attrs:
        return exported, {}
    packed = next(
        f.params[-1].ty
        for _, f in mod.functions_items()
        if f.attrs is not None and "num_input" in f.attrs and len(f.params) > f.attrs["num_input"]
    )
    params = [
        (str(name), tuple(int(d) for d in ty.shape.values), str(ty.dtype))
        for name, ty in zip(mod.attrs["kiln.params"], packed.fields, strict=True)
    ]
    float_of = {out: name for name in layout.sources for out in layout.outputs(name)}
    groups: Groups = {}
    for parts in mod.attrs["kiln.combined"].values():
        floats = tuple(dict.fromkeys(float_of[str(p)] for p in parts))
        groups[combined_name(floats)] = floats
    return Exported(mod.without_attr("kiln.params").without_attr("kiln.combined"), params), groups


def combine_layout(layout: ParamLayout, groups: Groups) -> ParamLayout:
    """`layout` with each group's parts replaced by one parameter of all their rows."""
    first = {parts[0]: name for name, parts in groups.items()}
    joined = {p for parts in groups.values() for p in parts}
    sources: dict[str, tuple[int, ...]] = {}
    for name, shape in layout.sources.items():
        if name in first:
            parts = groups[first[name]]
            sources[first[name]] = (sum(layout.sources[p][0] for p in parts), shape[1])
        elif name not in joined:
            sources[name] = shape
    schemes = {k: v for k, v in layout.schemes.items() if k not in joined}
    for name, parts in groups.items():
        if parts[0] in layout.schemes:
            schemes[name] = layout.schemes[parts[0]]
    return replace(layout, sources=sources, schemes=schemes)


def _rows(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays, axis=0)


def combine_sources(
    weight_map: dict[str, Source], groups: Groups, shapes: dict[str, tuple[int, ...]]
) -> dict[str, Source]:
    """The family's weight map with each group built from its parts' checkpoint tensors.
    `shapes`: the parts' shapes in the checkpoint (the whole model's, under tensor parallelism)."""
    out = {k: v for k, v in weight_map.items() if not any(k in p for p in groups.values())}
    for name, parts in groups.items():
        sources = [weight_map[p] for p in parts]
        if any(s.combine is not None or s.dtypes is not None for s in sources):
            raise KilnError(f"bug in Kiln's weight map: {name}'s parts are not plain tensors")
        out[name] = Source(
            tuple(s.names[0] for s in sources), _rows, tuple(shapes[p] for p in parts)
        )
    return out


def combine_splits(
    splits: dict[str, Split], full: dict[str, tuple[int, ...]], groups: Groups
) -> tuple[dict[str, Split], dict[str, tuple[int, ...]]]:
    """Tensor parallelism: a group whose parts each split by rows splits by rows in segments
    (each GPU gets its share of every part); `full` gains the group's whole shape."""
    splits, full = dict(splits), dict(full)
    for name, parts in groups.items():
        if any(splits.get(p) != Split(0) for p in parts):
            raise KilnError(f"bug in Kiln: {name} combines parts that do not split by rows")
        for p in parts:
            del splits[p]
        splits[name] = Split(0, tuple(full[p][0] for p in parts))
        full[name] = (sum(full[p][0] for p in parts), full[parts[0]][1])
    return splits, full
