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

With a `route` extern, the router that computes w the way kiln.models.mixtral does (checked op
by op: the float32 softmax of x @ gate^T, each expert's rank among the probabilities, the top
k kept and renormalized, cast to x's dtype) becomes one call as well,

    w = call_dps_packed(route, (x, gate, k))                                  # (..., E)

instead of the seven kernels TVM makes of it (the matmul, the softmax's two, the ranking, the
selection, the sum, the division); the router's matmul kernel goes if nothing else calls it.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.relax.expr_functor import mutator

from kiln.passes.dispatch_matmul import (
    PlannedRewrite,
    _drop_uncalled_kernels,
    nt_matmul_kernel,
    rewrite_planned,
)
from kiln.passes.fuse_swiglu import Bindings

_ADD = tvm.ir.Op.get("relax.add")
_MULTIPLY = tvm.ir.Op.get("relax.multiply")
_SPLIT = tvm.ir.Op.get("relax.split")
_CALL_DPS = tvm.ir.Op.get("relax.call_dps_packed")
_CALL_TIR = tvm.ir.Op.get("relax.call_tir")
_ASTYPE = tvm.ir.Op.get("relax.astype")
_DIVIDE = tvm.ir.Op.get("relax.divide")
_SUM = tvm.ir.Op.get("relax.sum")
_WHERE = tvm.ir.Op.get("relax.where")
_LESS = tvm.ir.Op.get("relax.less")
_GREATER = tvm.ir.Op.get("relax.greater")
_EQUAL = tvm.ir.Op.get("relax.equal")
_FULL = tvm.ir.Op.get("relax.full")
_ZEROS = tvm.ir.Op.get("relax.zeros")
_ARANGE = tvm.ir.Op.get("relax.arange")
_EXPAND_DIMS = tvm.ir.Op.get("relax.expand_dims")
_SOFTMAX = tvm.ir.Op.get("relax.nn.softmax")


@dataclass(frozen=True)
class MoEExterns:
    swiglu: str  # the expert's gate/up GEMV the graph calls: (x, *stored, out (..., I))
    down: str  # the expert's down GEMV: (h, *stored, out (..., N))
    moe_swiglu: str  # (x, w, *stored_0, ..., out (E, ..., I))
    moe: str  # (h (E, ..., I), w, *stored_0, ..., out (..., N))
    max_experts: int
    max_rows: int
    route: str = ""  # the router: (x, gate (E, K), top_k, out (..., E)); "" keeps the graph's


@dataclass(frozen=True)
class _Router:
    x: relax.Expr
    gate: relax.Expr  # (E, K)
    top_k: int


@dataclass(frozen=True)
class _MoE:
    x: relax.Expr
    weights: relax.Expr  # (..., E)
    gate_up: list[list[relax.Expr]]  # per expert, the stored tensors
    down: list[list[relax.Expr]]
    hidden: relax.TensorType  # (E, ..., I)
    router: _Router | None


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


def _match(mod: tvm.IRModule, fn: Bindings, var: relax.Var, ext: MoEExterns) -> _MoE | None:
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
        _router(mod, fn, weights, count) if ext.route else None,
    )


def _call(fn: Bindings, e: relax.Expr, op: tvm.ir.Op) -> relax.Call | None:
    """The call of `op` bound to var `e` (however often it is used: nothing is removed here,
    the rewrite only gives w another value)."""
    v = fn.bound.get(e) if isinstance(e, relax.Var) else None
    return v if isinstance(v, relax.Call) and v.op.same_as(op) else None


def _cast_of(fn: Bindings, e: relax.Expr, dtype: str) -> relax.Expr | None:
    """x when `e` is astype(x, dtype)."""
    cast = _call(fn, e, _ASTYPE)
    return cast.args[0] if cast is not None and str(cast.attrs.dtype) == dtype else None


def _last_axis(call: relax.Call, keepdims: bool) -> bool:
    """A reduction or softmax over the last axis only."""
    axes = call.attrs.axis
    axes = [int(axes)] if isinstance(axes, int | tirx.IntImm) else [int(a) for a in axes or []]
    ndim = call.args[0].ty.ndim
    if len(axes) != 1 or axes[0] not in (-1, ndim - 1):
        return False
    return not hasattr(call.attrs, "keepdims") or bool(call.attrs.keepdims) == keepdims


def _expanded(fn: Bindings, e: relax.Expr, source: relax.Expr, axis: int) -> bool:
    """`e` is expand_dims(source, axis) (axis counted from the end)."""
    call = _call(fn, e, _EXPAND_DIMS)
    if call is None or not call.args[0].same_as(source) or len(call.attrs.axis) != 1:
        return False
    ndim = e.ty.ndim
    return int(call.attrs.axis[0]) % ndim == axis % ndim


def _experts_index(fn: Bindings, e: relax.Expr, axis: int, count: int) -> bool:
    """`e` is expand_dims(arange(0, count), axis) in int32."""
    call = _call(fn, e, _EXPAND_DIMS)
    if call is None or not _expanded(fn, e, call.args[0], axis):
        return False
    arange = _call(fn, call.args[0], _ARANGE)
    if arange is None:
        return False
    bounds = [int(a.value) for a in arange.args]
    return bounds == [0, count, 1] and str(arange.attrs.dtype) == "int32"


def _ranks(fn: Bindings, rank: relax.Expr, probs: relax.Expr, count: int) -> bool:
    """`rank` counts, for each expert e, the experts above it: sum over j of (p_j > p_e) + (p_j
    == p_e) * (j < e), with p_j = expand_dims(probs, -2) and p_e = expand_dims(probs, -1)."""
    total = _call(fn, rank, _SUM)
    add = _call(fn, total.args[0], _ADD) if total is not None else None
    if add is None or not _last_axis(total, keepdims=False):
        return False
    above = _call(fn, _cast_of(fn, add.args[0], "int32"), _GREATER)
    tie = _call(fn, add.args[1], _MULTIPLY)
    if above is None or tie is None:
        return False
    equal = _call(fn, _cast_of(fn, tie.args[0], "int32"), _EQUAL)
    lower = _call(fn, _cast_of(fn, tie.args[1], "int32"), _LESS)
    if equal is None or lower is None:
        return False
    p_j, p_e = above.args
    if not (_expanded(fn, p_j, probs, -2) and _expanded(fn, p_e, probs, -1)):
        return False
    a, b = equal.args  # (p_j == p_e) in either order
    if not ((a.same_as(p_j) and b.same_as(p_e)) or (a.same_as(p_e) and b.same_as(p_j))):
        return False
    j, e = lower.args  # lower[e, j] = j < e
    return _experts_index(fn, j, 0, count) and _experts_index(fn, e, 1, count)


def _router(mod: tvm.IRModule, fn: Bindings, weights: relax.Expr, count: int) -> _Router | None:
    """x, the gate weight and k when `weights` is kiln.models.mixtral's router: probs =
    softmax(astype(x @ gate^T, float32)), top = where(rank < full(k), probs, zeros), weights =
    astype(top / sum(top, axis=-1, keepdims=True), x's dtype), with `rank` as _ranks says."""
    dtype = str(weights.ty.dtype)
    divide = _call(fn, _cast_of(fn, weights, dtype), _DIVIDE)
    if divide is None or dtype != "float16":
        return None
    top, norm = divide.args
    total = _call(fn, norm, _SUM)
    where = _call(fn, top, _WHERE)
    if total is None or where is None or not total.args[0].same_as(top):
        return None
    if not _last_axis(total, keepdims=True):
        return None
    chosen, probs, zero = where.args
    less = _call(fn, chosen, _LESS)
    full = _call(fn, less.args[1], _FULL) if less is not None else None
    zeros = _call(fn, zero, _ZEROS)
    if full is None or zeros is None or str(zeros.attrs.dtype) != "float32":
        return None
    fill = full.args[1]
    if not isinstance(fill, tvm.ir.expr.Constant) or fill.value.numpy().size != 1:
        return None
    top_k = int(fill.value.numpy().reshape(-1)[0])
    softmax = _call(fn, probs, _SOFTMAX)
    if softmax is None or not 1 <= top_k <= count or not _ranks(fn, less.args[0], probs, count):
        return None
    if not _last_axis(softmax, keepdims=False):
        return None
    logits = _call(fn, _cast_of(fn, softmax.args[0], "float32"), _CALL_TIR)
    if logits is None or len(logits.args) != 2 or len(logits.args[1].fields) != 2:
        return None
    x, gate = logits.args[1].fields
    if str(x.ty.dtype) != dtype or str(gate.ty.dtype) != dtype or str(logits.ty.dtype) != dtype:
        return None
    gate_shape = _shape(gate)  # (E, K)
    if gate_shape is None or len(gate_shape) != 2 or gate_shape[0] != count:
        return None
    if _lead(x) != _shape(weights)[:-1]:  # a row of weights for each row of x
        return None
    expected = nt_matmul_kernel(x.ty, gate.ty, logits.ty)
    if not tvm_ffi.structural_equal(expected, mod[logits.args[0]], map_free_vars=True):
        return None
    return _Router(x, gate, top_k)


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
        if moe.router is None:
            weights = self.visit_expr(moe.weights)
        else:
            r = moe.router
            operands = [self.visit_expr(r.x), self.visit_expr(r.gate), relax.prim_value(r.top_k)]
            weights = self.builder_.emit(
                relax.call_dps_packed(
                    relax.ExternFunc(ext.route), relax.Tuple(operands), moe.weights.ty
                )
            )

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
                    if (moe := _match(mod, fn, var, externs)) is not None:
                        plan[var] = (externs, moe)
            return plan

        out = rewrite_planned(mod, _Dispatch, plan_of)
        return mod if out is None else _drop_uncalled_kernels(out, before=mod)

    return _run
