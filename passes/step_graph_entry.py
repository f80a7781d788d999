"""Copies of the decode entry points for CUDA graphs.

Relax's RewriteCUDAGraph lifts the runs of static kernel launches between two KV-cache calls
into graphs that capture themselves on their first call.

- A stream capture of the whole batch-1 step (kiln.runtime.step_graph) cannot hold those (a
  graph would capture inside another capture). So the step graph captures a copy of decode_1
  that RewriteCUDAGraph leaves alone, and decode_1 keeps Relax's graphs for the runs the step
  graph does not take:

      AddEntry("decode_1", "decode_1_graph")        # in the finalize phase, first
      RewriteCUDAGraphExcept(["decode_1_graph"])    # instead of RewriteCUDAGraph

- The batched decode's shapes are symbolic, which RewriteCUDAGraph leaves alone, unless the
  function names the variables to capture a graph per value of, with an upper bound that sizes
  its static memory. `batch_graph_entry` is a copy of decode that says so: it must never run
  more sequences than its bound (the runtime keeps the plain decode for more).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tvm
from tvm import relax


@relax.expr_functor.mutator
class _NewCalls(relax.PyExprMutator):
    """Every call made anew: StaticPlanBlockMemory keys its plan by call node across the module,
    and a copy would share the calls that read no variable (the allocations)."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        return relax.Call(call.op, call.args, call.attrs, call.ty_args, call.span)


def AddEntry(source: str, name: str, attrs: dict[str, Any] | None = None) -> tvm.transform.Pass:
    """`name`, a copy of the Relax function `source` (where the module has one), with `attrs`
    added to its attributes."""

    @tvm.transform.module_pass(opt_level=0, name="AddEntry")
    def run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if source not in [gv.name_hint for gv in mod.get_global_vars()]:
            return mod
        func = relax.utils.copy_with_new_vars(mod[source])  # a Var is bound in one function
        func = _NewCalls(mod).visit_expr(func)
        for key, value in {**(attrs or {}), "global_symbol": name}.items():
            func = func.with_attr(key, value)
        mod = mod.clone()
        mod[name] = func
        return mod

    return run


def batch_graph_entry(source: str, name: str, var: str, bound: int) -> tvm.transform.Pass:
    """`name`, a copy of `source` whose runs RewriteCUDAGraph captures once per value of the
    symbolic variable `var`, with static memory for `var` up to `bound`."""
    return AddEntry(
        source,
        name,
        {
            "relax.rewrite_cuda_graph.capture_symbolic_vars": [var],
            "tir_var_upper_bound": {var: bound},
        },
    )


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
