"""Tensor parallelism: how each weight of a model splits over N GPUs (Megatron-LM's scheme).

Column-parallel layers (the q/k/v and gate/up projections) split their output rows: each rank
computes its own attention heads, its own slice of the MLP's features, with no communication.
Row-parallel layers (o_proj, down_proj) split their input columns: each rank's output is a
partial sum, and the model adds the ranks' partial sums with one all-reduce after attention and
one after the MLP (`all_reduce`). Everything else (embedding, norms, LM head, Mixtral's router)
is replicated. Every rank runs the same program on its own shard (SPMD).

The model families declare which weights split how (`Split`); `shard_weight_map` turns a
family's weight map into rank r's, so conversion writes each rank's weights ahead of time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm.relax.frontend import nn

from kiln.compiler.weights import Source


@dataclass(frozen=True)
class Split:
    """A weight (rows = output features, cols = input features) split over the ranks.

    `axis` 0 splits the rows (a column-parallel layer), 1 the columns (row-parallel).
    `segments`: sizes of consecutive blocks along `axis` that each split evenly, for fused
    weights: q/k/v rows (q_rows, kv_rows, kv_rows) give rank r its q heads, then its k heads,
    then its v heads. Empty: the whole axis is one block.
    """

    axis: int
    segments: tuple[int, ...] = ()

    def take(self, weight: np.ndarray, rank: int, ranks: int) -> np.ndarray:
        """Rank `rank`'s part of the full `weight`."""
        bounds = np.cumsum(self.segments)[:-1] if self.segments else []
        blocks = np.split(weight, bounds, axis=self.axis)
        return np.concatenate(
            [np.split(block, ranks, axis=self.axis)[rank] for block in blocks], axis=self.axis
        )


def shard_weight_map(
    weight_map: dict[str, Source],
    splits: dict[str, Split],
    full_shapes: dict[str, tuple[int, ...]],
    rank: int,
    ranks: int,
) -> dict[str, Source]:
    """Rank `rank`'s weight map: each split parameter is built whole, as `weight_map` builds
    it (`full_shapes`), then cut to the rank's part; the rest is replicated."""
    sharded = dict(weight_map)
    for name, split in splits.items():
        src = weight_map[name]

        def build(arrays, src=src, split=split):
            whole = arrays[0] if src.combine is None else src.combine(arrays)
            return split.take(np.asarray(whole), rank, ranks)

        shapes = src.shapes if src.combine is not None else (full_shapes[name],)
        sharded[name] = Source(src.names, build, shapes, src.dtypes)
    return sharded


def all_reduce(x: nn.Tensor, ranks: int) -> nn.Tensor:
    """The sum of every rank's `x` (partial sums of a row-parallel layer); `x` on one GPU."""
    return nn.op.ccl_allreduce(x, "sum") if ranks > 1 else x
