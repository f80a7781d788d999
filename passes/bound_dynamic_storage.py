"""Storage of a bounded function's remaining dynamic allocations, sized for its bound.

A function with `tir_var_upper_bound` (the batched decode's copy for CUDA graphs,
kiln.passes.step_graph_entry) gets static memory for what StaticPlanBlockMemory plans, but what
it returns (the logits) is still allocated at each call's own size. The VM's pooled allocator
keeps a freed buffer for a later request of the same size only, so each batch size leaves its
own logits buffer behind: on a Llama-3-8B shape (0.5 MB of fp32 logits a sequence), 4.2 GB once
every batch size from 2 to 128 has run (docs/TVM.md). Sized for the bound instead, every call
asks the pool for the same bytes and takes the same buffer back; the tensor made in it keeps
the call's own shape.

Runs after LowerAllocTensor (which turns the remaining `alloc_tensor`s into storage and a
tensor in it) and before VMShapeLower. A size that also depends on a variable without a bound
is left as it is.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

_ALLOC_STORAGE = tvm.ir.Op.get("relax.memory.alloc_storage")


@relax.expr_functor.mutator
class _AtBound(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, bounds: dict[str, int]):
        super().__init__(mod)
        self.bounds = bounds

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        size = call.args[0] if call.op == _ALLOC_STORAGE else None
        if not isinstance(size, relax.ShapeExpr):
            return call
        bounded = [self._at_bound(dim) for dim in size.values]
        if any(dim is None for dim in bounded) or all(
            isinstance(dim, tirx.IntImm) for dim in size.values
        ):
            return call
        return relax.Call(call.op, [relax.ShapeExpr(bounded), *call.args[1:]], call.attrs,
                          call.ty_args, call.span)  # fmt: skip

    def _at_bound(self, dim: tirx.PrimExpr) -> tirx.PrimExpr | None:
        """`dim` with every variable at its bound (sizes grow with them), or None."""
        free = tirx.analysis.undefined_vars(dim)
        if any(v.name not in self.bounds for v in free):
            return None
        analyzer = tvm.sym.Analyzer()
        for v in free:
            analyzer.bind(v, tirx.IntImm(str(v.ty), self.bounds[v.name]))
        return analyzer.simplify(dim)


@tvm.transform.module_pass(opt_level=0, name="BoundDynamicStorage")
def BoundDynamicStorage(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    out = mod.clone()
    for gv, func in mod.functions.items():
        attrs = func.attrs if isinstance(func, relax.Function) else None
        if attrs is None or "tir_var_upper_bound" not in attrs:
            continue
        bounds = {str(k): int(v) for k, v in attrs["tir_var_upper_bound"].items()}
        out[gv] = _AtBound(mod, bounds).visit_expr(func)
    return out
