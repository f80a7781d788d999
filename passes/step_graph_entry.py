"""An entry point for capturing a whole decode step into one CUDA graph (kiln.runtime.step_graph).

Relax's RewriteCUDAGraph lifts the runs of static kernel launches between two KV-cache calls
into graphs that capture themselves on their first call; a stream capture of the whole step
cannot hold those (a graph would capture inside another capture). So the step graph captures
`name`, a copy of `source` that RewriteCUDAGraph leaves alone, and `source` keeps Relax's graphs
for the runs the step graph does not take.

    AddStepGraphEntry("decode_1", "decode_1_graph")   # in the finalize phase, first
    RewriteCUDAGraphExcept(["decode_1_graph"])        # instead of RewriteCUDAGraph
"""

from __future__ import annotations

from collections.abc import Sequence

import tvm
from tvm import relax


@relax.expr_functor.mutator
class _NewCalls(relax.PyExprMutator):
    """Every call made anew: StaticPlanBlockMemory keys its plan by call node across the module,
    and a copy would share the calls that read no variable (the allocations)."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        return relax.Call(call.op, call.args, call.attrs, call.ty_args, call.span)


def AddStepGraphEntry(source: str, name: str) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="AddStepGraphEntry")
    def run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if source not in [gv.name_hint for gv in mod.get_global_vars()]:
            return mod
        func = relax.utils.copy_with_new_vars(mod[source])  # a Var is bound in one function
        func = _NewCalls(mod).visit_expr(func)
        mod = mod.clone()
        mod[name] = func.with_attr("global_symbol", name)
        return mod

    return run


def RewriteCUDAGraphExcept(names: Sequence[str]) -> tvm.transform.Pass:
    """RewriteCUDAGraph on every function but `names`, which come back as they were."""

    @tvm.transform.module_pass(opt_level=0, name="RewriteCUDAGraphExcept")
    def run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        kept = {gv.name_hint: mod[gv] for gv in mod.get_global_vars() if gv.name_hint in names}
        rest = mod.clone()
        for name in kept:
            del rest[name]
        rest = relax.transform.RewriteCUDAGraph()(rest)
        for name, func in kept.items():
            rest[name] = func
        return rest

    return run
