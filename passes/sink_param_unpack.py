"""SinkParamUnpack: each `v = params[i]` (a field of a tuple parameter) moved to just before the
first binding of its block that reads `v`.

A model function takes its weights as one tuple (nn.Module's export) and unpacks the ones its
code reads directly at its start: ~160 in a 32-layer decode, each a VM instruction, all before
the first kernel. On a GPU the previous pass is over by then, so the device idles while the host
unpacks. Next to their uses, the first kernel is queued sooner and the rest of the unpacking
overlaps the device's work (the Llama-3-8B shape at batch 64 on an H200: the idle before a pass's
first kernel 86 -> 56 us; bench/NOTES.md, eighteenth session). A field of a parameter is pure,
so only its position changes; a field no binding of its block reads stays at the block's end.
Run last (after TVM's finalize passes), so that no later pass moves it back.
"""

from __future__ import annotations

import tvm
from tvm import relax


def _sunk(block: relax.BindingBlock, params: set[relax.Var]) -> relax.BindingBlock | None:
    """`block` with its parameter fields next to their first use; None when nothing moves."""
    pending: dict[relax.Var, relax.Binding] = {}
    out: list[relax.Binding] = []
    for binding in block.bindings:
        value = binding.value
        if (
            isinstance(binding, relax.VarBinding)
            and isinstance(value, relax.TupleGetItem)
            and value.tuple_value in params
        ):
            pending[binding.var] = binding
            continue
        for var in relax.analysis.free_vars(value) if pending else ():
            if var in pending:
                out.append(pending.pop(var))
        out.append(binding)
    out.extend(pending.values())
    if all(a.same_as(b) for a, b in zip(out, block.bindings, strict=True)):
        return None
    kind = relax.DataflowBlock if isinstance(block, relax.DataflowBlock) else relax.BindingBlock
    return kind(out, block.span)


@tvm.transform.module_pass(opt_level=0, name="SinkParamUnpack")
def SinkParamUnpack(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    mod = mod.clone()  # (the caller's module stays as it was)
    for gvar, func in list(mod.functions.items()):
        if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
            continue
        params = set(func.params)
        blocks = [_sunk(block, params) for block in func.body.blocks]
        if all(b is None for b in blocks):
            continue
        body = relax.SeqExpr(
            [new or old for new, old in zip(blocks, func.body.blocks, strict=True)],
            func.body.body,
            func.body.span,
        )
        body = relax.BlockBuilder().normalize(body)  # (its type, the old body's)
        mod[gvar] = relax.Function(
            func.params, body, func.ret_ty, func.is_pure, func.attrs, func.span
        )
    return mod
