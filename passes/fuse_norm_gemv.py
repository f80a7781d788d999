"""FuseNormGEMV: a batch-1 residual add and RMSNorm go into the GEMV that reads the norm.

After FuseAddRMSNorm and DispatchGEMV, each sublayer of a decoder's one-token step starts with

    t = call_tir(add_rms_norm, (x, r, w))    # FuseAddRMSNorm's kernel (its epsilon an attribute)
    s = t[0]                                 # x + r: the residual stream, read again later
    y = t[1]                                 # rms_norm(s, w): read by the GEMV only
    out = call_dps_packed(gemv, (y, *stored))

and, where `gemv` has a norm form (`externs`: GEMV extern -> its norm form), the pass makes it

    u = call_dps_packed(norm_gemv, (x, r, w, *stored, epsilon)) -> (s, out)
    s = u[0]
    out = u[1]

one kernel, which computes the add and the norm itself (kiln.runtime.gemv: q4_norm), so that
the norm's kernel and its launch leave the step and the layer's GEMVs follow one another.

When nothing reads s (the last norm, before the LM head), the call still writes it, to a buffer
of its own. It matches one row of x (every leading dimension 1: the batch-1 decode), a last dimension of at
most `max_k`, and a norm output read by that GEMV only, in the same dataflow block; the residual
stream s must not be read before the GEMV (the fused call writes it there). Everything else is
left as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from math import prod

import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import mutator

from kiln.passes.dispatch_matmul import PlannedRewrite, _drop_uncalled_kernels, rewrite_planned
from kiln.passes.fuse_add_rms_norm import EPSILON_ATTR
from kiln.passes.fuse_swiglu import Bindings

_CALL_TIR = tvm.ir.Op.get("relax.call_tir")
_CALL_DPS_PACKED = tvm.ir.Op.get("relax.call_dps_packed")


def _one_row(ty: relax.Type, max_k: int) -> bool:
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        return False
    dims = ty.shape.values
    if not all(isinstance(d, tirx.IntImm) for d in dims):
        return False
    return prod(int(d) for d in dims[:-1]) == 1 and int(dims[-1]) <= max_k


def _plan(mod: tvm.IRModule, func: relax.Function, externs: Mapping[str, str], max_k: int):
    """GEMV var -> (norm extern, [x, r, w, *stored], epsilon, s var or None, dropped vars)."""
    fn = Bindings(func)
    plan = {}
    for block in func.body.blocks:
        if not isinstance(block, relax.DataflowBlock):
            continue
        order = {b.var: i for i, b in enumerate(block.bindings)}
        readers: dict[relax.Var, list[relax.Var]] = {}
        for b in block.bindings:
            for v in relax.analysis.free_vars(b.value):
                readers.setdefault(v, []).append(b.var)
        for b in block.bindings:
            call = b.value
            if not (isinstance(call, relax.Call) and call.op.same_as(_CALL_DPS_PACKED)):
                continue
            extern = call.args[0]
            if not isinstance(extern, relax.ExternFunc) or str(extern.global_symbol) not in externs:
                continue
            y, *stored = call.args[1].fields
            got = fn.bound.get(y)
            if fn.uses[y] != 1 or not isinstance(got, relax.TupleGetItem) or got.index != 1:
                continue
            t = got.tuple_value
            norm = fn.bound.get(t)
            if not (isinstance(norm, relax.Call) and norm.op.same_as(_CALL_TIR)):
                continue
            kernel = mod[norm.args[0]]
            if kernel.attrs is None or EPSILON_ATTR not in kernel.attrs:
                continue
            others = [v for v in readers.get(t, []) if v != y]
            if len(others) != fn.uses[t] - 1 or len(others) > 1:
                continue
            s = others[0] if others else None  # None: only the norm is read (the last one)
            got = fn.bound.get(s)
            if s is not None and not (isinstance(got, relax.TupleGetItem) and got.index == 0):
                continue
            x = norm.args[1].fields[0]
            if not _one_row(x.ty, max_k):
                continue
            # s is written where the GEMV was: nothing in the block may read it before.
            if any(order[v] < order[b.var] for v in readers.get(s, [])):
                continue
            epsilon = float(kernel.attrs[EPSILON_ATTR])
            fused = externs[str(extern.global_symbol)]
            operands = [*norm.args[1].fields, *stored]
            plan[b.var] = (fused, operands, epsilon, s, {t, y} | ({s} if s is not None else set()))
    return plan


@mutator
class _Fuse(PlannedRewrite):
    def run(self, gv: tvm.ir.GlobalVar, func: relax.Function, plan: dict) -> None:
        self.dropped = {v for planned in plan.values() for v in planned[4]}
        super().run(gv, func, plan)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var in self.dropped:
            return  # emitted with the GEMV
        super().visit_var_binding_(binding)

    def rewrite(self, var: relax.Var, planned: tuple) -> relax.Expr:
        extern, operands, epsilon, s, _ = planned
        args = [self.visit_expr(e) for e in operands]
        args.append(relax.prim_value(tirx.FloatImm("float32", epsilon)))
        sum_ty = operands[0].ty if s is None else s.ty  # written either way
        call = relax.call_dps_packed(relax.ExternFunc(extern), relax.Tuple(args), [sum_ty, var.ty])
        fused = self.builder_.emit(call, name_hint="norm_gemv")
        if s is not None:
            self.builder_.emit_normalized(relax.VarBinding(s, relax.TupleGetItem(fused, 0)))
        return relax.TupleGetItem(fused, 1)


def FuseNormGEMV(externs: Mapping[str, str], max_k: int) -> tvm.transform.Pass:
    """`externs`: a GEMV extern -> its form with the add and norm in front (see the module doc)."""

    @tvm.transform.module_pass(opt_level=0, name="FuseNormGEMV")
    def _run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        out = rewrite_planned(mod, _Fuse, lambda _gv, f: _plan(mod, f, externs, max_k))
        return mod if out is None else _drop_uncalled_kernels(out, before=mod)

    return _run
