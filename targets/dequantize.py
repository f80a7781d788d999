"""A GPU schedule for the kernels that dequantize a whole weight before a GEMM library multiplies
by it (kiln.passes.dispatch_matmul, `dequantize=True`: the prefill's quantized Linears).

Such a kernel is one spatial block "dequantize" writing the (rows, cols) weight in the model
dtype. dlight's Fallback gives each thread one value (on an H200, the 7B q4f16's dequantize
kernels ran at ~17% of the copy bandwidth: 45 of a 2048-token prefill's 93 ms); here each thread
computes 16 bytes of one row in registers (8 fp16 values, the 8 nibbles of one packed int4 word,
their shifts constants of the unrolled loop) and stores them at once, so a warp reads consecutive
packed words and writes 512 contiguous bytes.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight import ScheduleRule
from tvm.target import Target

BLOCK = "dequantize"  # the block kiln.compiler.quantization.layers.dequantize_te writes
STORE_BYTES = 16
THREADS = 256


class DequantizeWeight(ScheduleRule):
    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        try:
            block = sch.get_sblock(BLOCK)
        except (ValueError, RuntimeError, s_tir.schedule.ScheduleError):
            return None
        if len(sch.get_child_blocks(sch.get_sblock("root"))) != 1:
            return None  # a Linear's own kernel: the dequantize feeds a matmul there
        loops = sch.get_loops(block)
        extents = [loop_extent(sch, loop) for loop in loops]
        writes = sch.get(block).writes
        if len(loops) != 2 or None in extents or len(writes) != 1:
            return None
        lanes = STORE_BYTES * 8 // tvm.runtime.DataType(writes[0].source.dtype).bits
        cols = extents[1]
        if cols % lanes:
            return None
        outer, inner = sch.split(loops[1], [None, lanes])
        fused = sch.fuse(loops[0], outer)
        bx, tx = sch.split(fused, [None, THREADS])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        # The values in registers (unrolled: a nibble's shift is a constant), then one store.
        # (Vectorizing the computation itself makes TVM's CUDA codegen build an 8-lane uint32
        # vector with make_ulonglong4 of 8 arguments, which nvcc rejects.)
        store = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(store, tx)
        sch.unroll(inner)
        sch.vectorize(sch.get_loops(store)[-1])
        return sch


def loop_extent(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None
