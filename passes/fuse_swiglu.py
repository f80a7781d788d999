"""FuseSwiGLU: the MLP's SiLU(gate) * up becomes the epilogue of its gate/up matmul kernel.

After CombineParallelMatmul and FoldWeightTranspose, a SwiGLU MLP reads

    gu = call_tir(matmul_kernel, (x, *weights))     # (..., 2I): gate rows, then up rows
    g, u = split(gu, [I], axis=-1)
    y = multiply(silu(g), u)

where `matmul_kernel` is any kernel (a float NT_matmul, a quantized Linear's dequantizing one).
The pass makes that one kernel: the matmul's stages, then `y[..., j] = silu(gu[..., j]) *
gu[..., I + j]` over the product, which becomes the kernel's scratch (a private function of the
two calls, merged by TVM's FuseTIR). The numbers do not change: the epilogue computes what
Relax's silu and multiply legalize to, in the same dtype.

Targets whose schedules handle such a kernel ask for the pass (TargetSpec.fuse_swiglu: the CPU,
where the kernels are compiled as written). GPU schedules give each thread block a run of
consecutive rows, so the rows j and I + j that an output needs land in different blocks; CUDA
fuses the epilogue in its int4 GEMV kernel instead (kiln.passes.dispatch_gemv).
"""

from __future__ import annotations

from collections import defaultdict

import tvm
from tvm import relax, te, tirx
from tvm.relax.expr_functor import mutator

from kiln.passes.dispatch_matmul import PlannedRewrite, rewrite_planned

_CALL_TIR = tvm.ir.Op.get("relax.call_tir")
_SPLIT = tvm.ir.Op.get("relax.split")
_SILU = tvm.ir.Op.get("relax.nn.silu")
_MULTIPLY = tvm.ir.Op.get("relax.multiply")


class Bindings:
    """A function's bindings and how often each var is used."""

    def __init__(self, func: relax.Function):
        self.bound: dict[relax.Var, relax.Expr] = {}
        self.uses: dict[relax.Var, int] = defaultdict(int)
        for block in func.body.blocks:
            for b in block.bindings:
                self.bound[b.var] = b.value
                for v in relax.analysis.free_vars(b.value):
                    self.uses[v] += 1
        for v in relax.analysis.free_vars(func.body.body):
            self.uses[v] += 1

    def value(self, e: relax.Expr, op: tvm.ir.Op) -> relax.Call | None:
        """The call of `op` bound to `e` if `e` is a var used once, else None."""
        if not isinstance(e, relax.Var) or self.uses[e] != 1:
            return None
        v = self.bound.get(e)
        return v if isinstance(v, relax.Call) and v.op.same_as(op) else None


def swiglu_product(fn: Bindings, y: relax.Expr) -> relax.Var | None:
    """`gu` if `y` is `multiply(silu(g), u)` with (g, u) = split(gu) in two halves of its last
    axis, and nothing else reads gu, the split or its halves."""
    if not (isinstance(y, relax.Call) and y.op.same_as(_MULTIPLY)):
        return None
    for a, u in ((y.args[0], y.args[1]), (y.args[1], y.args[0])):
        silu = fn.value(a, _SILU)
        if silu is None:
            continue
        g = silu.args[0]
        if not all(isinstance(v, relax.Var) and fn.uses[v] == 1 for v in (g, u)):
            continue
        gi, ui = fn.bound.get(g), fn.bound.get(u)
        if not (isinstance(gi, relax.TupleGetItem) and isinstance(ui, relax.TupleGetItem)):
            continue
        parts = gi.tuple_value
        if (gi.index, ui.index) != (0, 1) or not parts.same_as(ui.tuple_value):
            continue
        split = fn.bound.get(parts)
        if fn.uses[parts] != 2 or not (isinstance(split, relax.Call) and split.op.same_as(_SPLIT)):
            continue
        gu = split.args[0]
        if isinstance(gu, relax.Var) and fn.uses[gu] == 1 and _halves(split, gu.ty):
            return gu
    return None


def _halves(split: relax.Call, ty: relax.Type) -> bool:
    """Whether `split` cuts the last axis of a (..., 2I) tensor (static 2I) into two halves."""
    if not isinstance(ty.shape, relax.ShapeExpr) or int(split.attrs.axis) not in (-1, ty.ndim - 1):
        return False
    rows = ty.shape.values[-1]
    if not isinstance(rows, tirx.IntImm) or int(rows) % 2:
        return False
    at = split.attrs.indices_or_sections
    if isinstance(at, tirx.IntImm):
        return int(at) == 2
    return [int(i) for i in at] == [int(rows) // 2]


def swiglu_te(gu: te.Tensor) -> te.Tensor:
    """(..., 2I) -> (..., I): SiLU of the first half times the second, as Relax's silu
    (x * sigmoid(x)) and multiply legalize, in gu's dtype."""
    half = gu.shape[-1] // 2

    def epilogue(*i):
        g, u = gu[(*i[:-1], i[-1])], gu[(*i[:-1], i[-1] + half)]
        return g * tirx.sigmoid(g) * u

    return te.compute((*gu.shape[:-1], half), epilogue, name="swiglu")


@mutator
class _Fuse(PlannedRewrite):
    def rewrite(self, var: relax.Var, call: relax.Call) -> relax.Expr:
        """`call`: the gate/up kernel's call_tir; its SwiGLU `var` becomes one call of both."""
        args = [self.visit_expr(a) for a in call.args[1].fields]
        # A private function of the two calls that FuseTIR makes one kernel of.
        gu_te = te.placeholder(list(call.ty.shape.values), call.ty.dtype, "gu")
        epilogue = te.create_prim_func([gu_te, swiglu_te(gu_te)], index_dtype_override="int64")
        epilogue_gv = self.builder_.add_func(epilogue.without_attr("global_symbol"), "swiglu")
        params = [relax.Var(f"w{i}", a.ty) for i, a in enumerate(args)]
        gu = relax.DataflowVar("gu", call.ty)
        out = relax.Var("out", var.ty)
        block = relax.DataflowBlock([
            relax.VarBinding(gu, relax.call_tir(call.args[0], relax.Tuple(params), call.ty)),
            relax.VarBinding(out, relax.call_tir(epilogue_gv, relax.Tuple([gu]), out.ty)),
        ])  # fmt: skip
        fused = relax.Function(params, relax.SeqExpr([block], out), out.ty, is_pure=True)
        fused = fused.with_attr("Primitive", True)
        return relax.Call(self.builder_.add_func(fused, "fused_swiglu"), args)


def FuseSwiGLU() -> tvm.transform.Pass:
    """Fuse SiLU(gate) * up into the gate/up matmul's kernel (see the module doc)."""

    @tvm.transform.module_pass(opt_level=0, name="FuseSwiGLU")
    def _run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        def plan_of(_gv: tvm.ir.GlobalVar, func: relax.Function) -> dict:
            fn = Bindings(func)
            plan = {}
            for var, value in fn.bound.items():
                gu = swiglu_product(fn, value)
                call = fn.bound.get(gu) if gu is not None else None
                if isinstance(call, relax.Call) and call.op.same_as(_CALL_TIR):
                    if len(call.args) == 2:  # no symbolic-shape arguments
                        plan[var] = call
            return plan

        out = rewrite_planned(mod, _Fuse, plan_of)
        return mod if out is None else relax.transform.FuseTIR()(out)

    return _run
