"""FuseDequantizeMatmul: no kernel writes a dequantized copy of a whole weight matrix.

A quantized Linear is one PrimFunc (kiln.compiler.quantization.layers): a `dequantize` stage
that decodes the stored weight into a (rows, cols) buffer, then the matmul that reads it. GPU
schedules take care of that buffer themselves: dlight's GEMV (decode) reads the packed weight
and decodes in registers, its Matmul (prefill) decodes each tile into shared memory. Where no
schedule claims the kernel (the CPU), TVM would allocate the full (rows, cols) buffer and fill
it at every call.

For each kernel no schedule claimed, the pass finds a spatial stage that writes a 2-D
intermediate buffer read only by a reduction over (tokens..., j, k) as `B[j, k]` (j: its last
spatial axis, k: its reduction axis; B the same for every token: a weight), moves the
reduction's j loop outermost and computes the stage inside it. Each weight row is then decoded
once, into a `cols`-element scratch, right before every token's dot product with it; the sums
run in the same order, so the numbers do not change. TVM's TIR lowering then shrinks the buffer
to the one row it holds (PlanAndUpdateBufferAllocationLocation, CompactBufferAllocation).

Kernels already scheduled (`tirx.is_scheduled`, or bound to GPU threads) are left alone.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir, tirx


def _has_thread_bindings(func: tirx.PrimFunc) -> bool:
    found: list[bool] = []

    def visit(loop: tirx.For) -> None:
        if loop.thread_binding is not None:
            found.append(True)

    tvm_ffi.structural_walk(func.body, (tirx.For, visit), order="post")
    return bool(found)


def _row_loop(sch: s_tir.Schedule, producer, root_allocs) -> object | None:
    """The consumer's j loop if `producer` is a weight-like stage this pass moves, else None."""
    block = sch.get(producer)
    if len(block.writes) != 1:
        return None
    if any(iv.iter_type != tirx.IterVar.DataPar for iv in block.iter_vars):
        return None
    buf = block.writes[0].source
    if len(buf.shape) != 2 or not any(buf.same_as(b) for b in root_allocs):
        return None
    consumers = sch.get_consumers(producer)
    if len(consumers) != 1:
        return None
    consumer = sch.get(consumers[0])
    iters = consumer.iter_vars
    # (tokens..., j, k): at least one token axis, which a weight does not depend on
    if len(iters) < 3 or iters[-1].iter_type != tirx.IterVar.CommReduce:
        return None
    if any(iv.iter_type != tirx.IterVar.DataPar for iv in iters[:-1]):
        return None
    reads = [r for r in consumer.reads if r.source.same_as(buf)]
    if len(reads) != 1:
        return None
    j, k = reads[0].region
    if not (j.min.same_as(iters[-2].var) and k.min.same_as(iters[-1].var)):
        return None
    if not (isinstance(j.extent, tirx.IntImm) and int(j.extent) == 1):
        return None
    # One loop per block iter, in order (as TE-made kernels have them).
    loops = sch.get_loops(consumers[0])
    if len(loops) != len(iters):
        return None
    sch.reorder(loops[-2], *loops[:-2])
    return loops[-2]


def _fuse(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    if not isinstance(func.body, s_tir.SBlockRealize):
        return None  # a kernel written without blocks (sorting, scans): nothing to move
    sch = s_tir.Schedule(func)
    root = sch.get_sblock(func.body.block.name_hint)
    root_allocs = list(sch.get(root).alloc_buffers)
    changed = False
    for producer in sch.get_child_blocks(root):
        loop = _row_loop(sch, producer, root_allocs)
        if loop is not None:
            sch.compute_at(producer, loop)
            changed = True
    if not changed:
        return None
    return sch.mod["main"]


def FuseDequantizeMatmul() -> tvm.transform.Pass:
    """Decode weights row by row inside the matmul of every kernel no schedule claimed."""

    @tvm.transform.module_pass(opt_level=0, name="FuseDequantizeMatmul")
    def _run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if func.attrs is not None and func.attrs.get("tirx.is_scheduled"):
                continue
            if _has_thread_bindings(func):
                continue
            fused = _fuse(func)
            if fused is not None:
                updates[gv] = fused
        if not updates:
            return mod
        mod = mod.clone()
        for gv, func in updates.items():
            mod.update_func(gv, func)
        return mod

    return _run
