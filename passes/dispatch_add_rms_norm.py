"""DispatchAddRMSNorm: a batch-1 residual add and RMSNorm -> a library's extern.

FuseAddRMSNorm leaves each sublayer's residual add and RMSNorm as one kernel,

    t = call_tir(add_rms_norm, (x, r, w))    # its epsilon the kernel's EPSILON_ATTR
    s = t[0]; y = t[1]

Where x is one row (every leading dimension 1: the batch-1 decode) of at most `max_k` values of
a dtype in `dtypes`, the pass makes it

    t = call_dps_packed(extern, (x, r, w, epsilon)) -> (s, y)

`extern(x, r, w, epsilon, s, y)` computes the same numbers (kiln.runtime.gemv's add_rms_norm on
CUDA, which starts early, as the GEMVs around it do). Everything else is left as it is; kernels
left without a caller are dropped.
"""

from __future__ import annotations

from math import prod

import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import mutator

from kiln.passes.dispatch_matmul import PlannedRewrite, _drop_uncalled_kernels, rewrite_planned
from kiln.passes.fuse_add_rms_norm import EPSILON_ATTR

_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def _one_row(ty: relax.Type, max_k: int, dtypes: tuple[str, ...]) -> bool:
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        return False
    if str(ty.dtype) not in dtypes:
        return False
    dims = ty.shape.values
    if not all(isinstance(d, tirx.IntImm) for d in dims):
        return False
    return prod(int(d) for d in dims[:-1]) == 1 and int(dims[-1]) <= max_k


def _plan(mod: tvm.IRModule, func: relax.Function, max_k: int, dtypes: tuple[str, ...]) -> dict:
    """add_rms_norm call var -> (x, r, w, epsilon)."""
    plan = {}
    for block in func.body.blocks:
        for b in block.bindings:
            call = b.value
            if not (isinstance(call, relax.Call) and call.op.same_as(_CALL_TIR)):
                continue
            kernel = mod[call.args[0]]
            if not isinstance(kernel, tirx.PrimFunc) or kernel.attrs is None:
                continue
            if EPSILON_ATTR not in kernel.attrs:
                continue
            x, r, w = call.args[1].fields
            if _one_row(x.ty, max_k, dtypes):
                plan[b.var] = (x, r, w, float(kernel.attrs[EPSILON_ATTR]))
    return plan


@mutator
class _Dispatch(PlannedRewrite):
    def __init__(self, mod: tvm.IRModule, extern: str):
        super().__init__(mod)
        self.extern = relax.ExternFunc(extern)

    def rewrite(self, var: relax.Var, planned: tuple) -> relax.Expr:
        *operands, epsilon = planned
        args = [self.visit_expr(e) for e in operands]
        args.append(relax.prim_value(tirx.FloatImm("float32", epsilon)))
        outs = list(var.ty.fields)
        return relax.call_dps_packed(self.extern, relax.Tuple(args), outs)


def DispatchAddRMSNorm(
    extern: str, max_k: int, dtypes: tuple[str, ...] = ("float16",)
) -> tvm.transform.Pass:
    """FuseAddRMSNorm's kernel on one row of at most `max_k` values -> `extern` (module doc)."""

    @tvm.transform.module_pass(opt_level=0, name="DispatchAddRMSNorm")
    def _run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        out = rewrite_planned(
            mod, lambda m: _Dispatch(m, extern), lambda _gv, f: _plan(mod, f, max_k, tuple(dtypes))
        )
        return mod if out is None else _drop_uncalled_kernels(out, before=mod)

    return _run
