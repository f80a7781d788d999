"""DispatchMoE: a mixture of experts' MLP on a few rows -> two calls that read only the routed
experts' weights.

Kiln's mixture-of-experts models (kiln.models.mixtral) combine their experts densely: each row's
router weights over the E experts, 0 where the router did not choose one, split per expert and
multiplied into every expert's output. After DispatchGEMV, the batch-1 decode reads

    w = ...                                  # (..., E): the rows' weights, 0 where not routed
    parts = split(w, E, axis=-1)
    y_e = call_dps_packed(gemv, (call_dps_packed(swiglu, (x, *gate_up_e)), *down_e))
    out = y_0 * parts[0] + y_1 * parts[1] + ... + y_{E-1} * parts[E-1]

which reads all E experts' weights for the k a row uses. The pass makes it

    h = call_dps_packed(moe_swiglu, (x, w, *gate_up_0, ..., *gate_up_{E-1}))   # (E, ..., I)
    out = call_dps_packed(moe, (h, w, *down_0, ..., *down_{E-1}))              # (..., N)

whose kernels skip every expert no row is routed to: at batch 1 with top-2 of 8, a quarter of
the bytes. The result is the same sum; the extern adds the experts' outputs in float32 and
rounds once (the graph rounds each product and each partial sum to the model dtype). Only
static rows (at most `max_rows`), the externs' own GEMVs and at most `max_experts` experts
match; batched and prefill functions keep the dense form, where most experts are routed to.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import mutator

from kiln.passes.dispatch_matmul import PlannedRewrite, rewrite_planned
from kiln.passes.fuse_swiglu import Bindings

_ADD = tvm.ir.Op.get("relax.add")
_MULTIPLY = tvm.ir.Op.get("relax.multiply")
_SPLIT = tvm.ir.Op.get("relax.split")
_CALL_DPS = tvm.ir.Op.get("relax.call_dps_packed")


@dataclass(frozen=True)
class MoEExterns:
    swiglu: str  # the expert's gate/up GEMV the graph calls: (x, *stored, out (..., I))
    down: str  # the expert's down GEMV: (h, *stored, out (..., N))
    moe_swiglu: str  # (x, w, *stored_0, ..., out (E, ..., I))
    moe: str  # (h (E, ..., I), w, *stored_0, ..., out (..., N))
    max_experts: int
    max_rows: int


@dataclass(frozen=True)
class _MoE:
    x: relax.Expr
    weights: relax.Expr  # (..., E)
    gate_up: list[list[relax.Expr]]  # per expert, the stored tensors
    down: list[list[relax.Expr]]
    hidden: relax.TensorType  # (E, ..., I)


def _extern_call(fn: Bindings, e: relax.Expr, name: str) -> list[relax.Expr] | None:
    """The operands of `call_dps_packed(name, ...)` bound to `e`, a var used once."""
    call = fn.value(e, _CALL_DPS)
    if call is None or not isinstance(call.args[0], relax.ExternFunc):
        return None
    return list(call.args[1].fields) if str(call.args[0].global_symbol) == name else None


def _terms(fn: Bindings, e: relax.Expr, root: bool) -> list[relax.Expr]:
    """The summands of a chain of adds (inner adds used only by the chain)."""
    call = fn.bound.get(e) if root else fn.value(e, _ADD)
    if isinstance(call, relax.Call) and call.op.same_as(_ADD):
        return [t for a in call.args for t in _terms(fn, a, False)]
    return [e]


def _match(fn: Bindings, var: relax.Var, ext: MoEExterns) -> _MoE | None:
    terms = _terms(fn, var, True)
    if not 2 <= len(terms) <= ext.max_experts:
        return None
    experts: dict[int, tuple[list, list]] = {}
    x = parts = None
    for term in terms:
        mul = fn.value(term, _MULTIPLY)
        if mul is None:
            return None
        for y, p in ((mul.args[0], mul.args[1]), (mul.args[1], mul.args[0])):
            item = fn.bound.get(p) if isinstance(p, relax.Var) and fn.uses[p] == 1 else None
            down = _extern_call(fn, y, ext.down)
            if isinstance(item, relax.TupleGetItem) and down is not None:
                break
        else:
            return None
        gate_up = _extern_call(fn, down[0], ext.swiglu)
        if gate_up is None or item.index in experts:
            return None
        x = gate_up[0] if x is None else x
        parts = item.tuple_value if parts is None else parts
        if not (gate_up[0].same_as(x) and item.tuple_value.same_as(parts)):
            return None
        experts[item.index] = (gate_up[1:], down[1:])
    split = fn.bound.get(parts)
    count = len(terms)
    if not (isinstance(split, relax.Call) and split.op.same_as(_SPLIT)):
        return None
    if fn.uses[parts] != count or sorted(experts) != list(range(count)):
        return None
    weights = split.args[0]
    sections, axis = split.attrs.indices_or_sections, int(split.attrs.axis)
    if not isinstance(sections, tirx.IntImm) or int(sections) != count:
        return None
    lead = _lead(x)
    w_shape = _shape(weights)
    if lead is None or w_shape is None or axis not in (-1, len(w_shape) - 1):
        return None
    if w_shape[:-1] != lead or w_shape[-1] != count or str(weights.ty.dtype) != str(x.ty.dtype):
        return None
    if prod(lead) > ext.max_rows:
        return None
    h = _shape(down[0])  # an expert's SwiGLU output (..., I)
    if h is None:
        return None
    hidden = relax.TensorType([count, *h], x.ty.dtype)
    return _MoE(
        x,
        weights,
        [experts[e][0] for e in range(count)],
        [experts[e][1] for e in range(count)],
        hidden,
    )


def _shape(e: relax.Expr) -> list[int] | None:
    ty = e.ty
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    dims = ty.shape.values
    return [int(d) for d in dims] if all(isinstance(d, tirx.IntImm) for d in dims) else None


def _lead(x: relax.Expr) -> list[int] | None:
    shape = _shape(x)
    return shape[:-1] if shape else None


@mutator
class _Dispatch(PlannedRewrite):
    def rewrite(self, var: relax.Var, planned: tuple[MoEExterns, _MoE]) -> relax.Expr:
        ext, moe = planned
        weights = self.visit_expr(moe.weights)

        def operands(first: relax.Expr, stored: list[list[relax.Expr]]) -> relax.Tuple:
            return relax.Tuple([first, weights, *(self.visit_expr(t) for s in stored for t in s)])

        h = self.builder_.emit(
            relax.call_dps_packed(
                relax.ExternFunc(ext.moe_swiglu),
                operands(self.visit_expr(moe.x), moe.gate_up),
                moe.hidden,
            )
        )
        return relax.call_dps_packed(relax.ExternFunc(ext.moe), operands(h, moe.down), var.ty)


def DispatchMoE(externs: MoEExterns) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="DispatchMoE")
    def _run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        def plan_of(_gv: tvm.ir.GlobalVar, func: relax.Function) -> dict:
            fn = Bindings(func)
            plan = {}
            for var, value in fn.bound.items():
                if isinstance(value, relax.Call) and value.op.same_as(_ADD):
                    if (moe := _match(fn, var, externs)) is not None:
                        plan[var] = (externs, moe)
            return plan

        out = rewrite_planned(mod, _Dispatch, plan_of)
        return mod if out is None else out

    return _run
