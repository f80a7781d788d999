"""Kiln's schedule for the batch-1 decode GEMV of float weights on CUDA: out[r] = x . W[r, :].

Each thread loads 16 bytes of a weight row per step with one vector load (dlight's GEMV loads 4),
a warp-level reduction sums the partial dot products of the threads that share a row. Measured on
an H100 against dlight's GEMV on Llama-2-7B's q0f16 matrices (bench/gemv.py): 92.8 / 79.5 / 98.1
/ 83.4 / 100.2% of the copy bandwidth for qkv / o / gate_up / down / lm_head against 91.1 / 78.1 /
95.5 / 84.2 / 98.6%. Packed weights (int4: several values per stored word) are declined: there
dlight's schedule measured faster (its GEMVs are bound by the dequantizing arithmetic, not the
loads), and so are symbolic shapes and anything else that is not a static GEMV.
"""

from __future__ import annotations

import os
import sys
from math import prod

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight import ScheduleRule
from tvm.s_tir.dlight.analysis import is_gemv, normalize, normalize_prim_func
from tvm.s_tir.dlight.base import get_bytes, get_extent, try_inline_contiguous_spatial
from tvm.s_tir.schedule import ScheduleError
from tvm.target import Target

LOAD_BYTES = 16  # one 128-bit load of weight per thread per step
THREADS = 256  # threads per block: rows of a block x threads per row


class DecodeGEMV(ScheduleRule):
    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        infos = try_inline_contiguous_spatial(sch, normalize_prim_func(sch))
        if infos is None or len(infos) not in (1, 2) or len(infos[0].iters) not in (2, 3):
            return None
        epilogue = infos[1] if len(infos) == 2 else None
        if epilogue is not None and not epilogue.is_injective():
            return None
        block = infos[0].block_rv
        vectors = is_gemv(sch, infos[0])
        if vectors is None or normalize(sch, infos[0]) is not True:  # inner reduction only
            return None
        extents = [get_extent(sch, loop) for loop in sch.get_loops(block)]
        if not all(isinstance(e, int) for e in extents) or extents[3] != 1:
            return None  # symbolic shapes (batched decode) or packed weights: dlight's
        rows, cols = extents[0] * extents[1], extents[2]
        weight = _weight_read(sch, block, vectors)
        if weight is None:
            return None
        tile = LOAD_BYTES // get_bytes(weight.dtype)  # values of a row one load covers
        if tile == 0 or cols % tile:
            return None
        lanes = next(t for t in (32, 16, 8, 4, 2, 1) if (cols // tile) % t == 0)
        rows_per_block = THREADS // lanes
        while rows % rows_per_block:
            rows_per_block //= 2
        try:
            return _schedule(sch, block, epilogue, [weight, *vectors], tile, lanes, rows_per_block)
        except (ScheduleError, tvm.error.InternalError, ValueError) as e:  # a shape it misjudged
            if os.environ.get("KILN_DEBUG"):
                print(f"kiln: DecodeGEMV declined a kernel ({e})", file=sys.stderr)
            return None


def _weight_read(sch: s_tir.Schedule, block, vectors) -> tirx.Buffer | None:
    """The largest read that is not the vector: the (stored) weight."""
    reads = [r.source for r in sch.get(block).reads]
    others = [b for b in reads if not any(b.same_as(v) for v in vectors)]
    return max(others, key=lambda b: prod(map(int, b.shape))) if others else None


def _schedule(sch, block, epilogue, cached, tile, lanes, rows_per_block) -> s_tir.Schedule:
    batch, s, r, c = sch.get_loops(block)
    bx, ty = sch.split(sch.fuse(batch, s), [None, rows_per_block])
    ko, tx, ki = sch.split(sch.fuse(r, c), [None, lanes, tile])
    sch.reorder(bx, ty, tx, ko, ki)
    rf = sch.rfactor(tx, 0)  # partial sums per lane: (lanes, rows)

    bx, ty, tx, ko, ki = sch.get_loops(rf)
    sch.bind(bx, "blockIdx.x")
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    # The weight tile of a step (one 16-byte load per thread) and the matching slice of the
    # vector go to registers with vector loads.
    for buffer in cached:
        reads = [r.source for r in sch.get(rf).reads]
        index = next(i for i, b in enumerate(reads) if b.same_as(buffer))
        local = sch.cache_read(rf, index, "local")
        sch.compute_at(local, ko, preserve_unit_loops=True)
        width = LOAD_BYTES // get_bytes(buffer.dtype)
        loop = sch.fuse(*sch.get_loops(local)[4:])
        if get_extent(sch, loop) % width == 0:
            sch.vectorize(sch.split(loop, [None, width])[1])
    sch.decompose_reduction(rf, ko)
    sch.set_scope(rf, 0, "local")
    sch.annotate(ko, "pragma_auto_unroll_max_step", 256)
    sch.annotate(ko, "pragma_unroll_explicit", 1)
    sch.unroll(ki)

    # Lanes of a row -> one value (a warp reduction), then the epilogue (a cast) per row.
    sch.reverse_compute_at(block, bx, preserve_unit_loops=True)
    tx_, ty_ = sch.get_loops(block)[1:]  # (lanes, rows): the lanes must be innermost
    sch.reorder(ty_, tx_)
    sch.bind(ty_, "threadIdx.y")
    sch.bind(tx_, "threadIdx.x")
    if epilogue is not None:
        sch.reverse_compute_at(epilogue.block_rv, bx, preserve_unit_loops=True)
        sch.bind(sch.fuse(*sch.get_loops(epilogue.block_rv)[1:]), "threadIdx.y")
        sch.set_scope(block, 0, "local")
    return sch
