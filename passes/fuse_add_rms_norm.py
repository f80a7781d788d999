"""FuseAddRMSNorm: a residual add and the RMSNorm of its sum -> one kernel with two outputs.

Every transformer block does

    s = x + r            # the residual stream, read again by the next residual add
    y = rms_norm(s, w)   # the normalized input of the next sublayer

The pass replaces the pair with one `call_tir` of a kernel that reads x and r once and writes
both s and y: `t = call_tir(add_rms_norm, (x, r, w)); s = t[0]; y = t[1]`. The kernel has two
stages, the sum of squares of (x + r) along the last axis (float32), then one stage that writes
s and y together, so dlight's GeneralReduction schedules it as one GPU kernel (a thread block
per row) and the CPU runs it as one loop nest. Its numbers are those of TVM's own `add` and
`rms_norm` legalization: the add in the input dtype, the rest in float32, cast back.

It matches `rms_norm` over the last axis of a static size whose input is an `add` of two
tensors of the same shape and dtype (no broadcasting), bound in the same dataflow block, with a
weight that is defined before the add. Everything else is left as it is.

DispatchAddRMSNorm then gives a target's library the kernels it has a faster form of:
`call_tir(add_rms_norm, (x, r, w))` -> `call_dps_packed(extern, (x, r, w, epsilon))`, where the
extern (x, r, w, epsilon, s, y) computes the same numbers.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.script import tirx as T

from kiln.passes.dispatch_matmul import PlannedRewrite, _drop_uncalled_kernels, rewrite_planned

_ADD = tvm.ir.Op.get("relax.add")
_CALL_TIR = tvm.ir.Op.get("relax.call_tir")
_RMS_NORM = tvm.ir.Op.get("relax.nn.rms_norm")
EPSILON_ATTR = "kiln.add_rms_norm_epsilon"  # marks add_rms_norm_kernel's functions


def add_rms_norm_kernel(hidden: int, dtype: str, epsilon: float) -> tirx.PrimFunc:
    """(x, r, w) -> (x + r, rms_norm(x + r, w)) over the last axis of (a, b, hidden) tensors.

    The numbers of TVM's `add` and `rms_norm` legalization: the add in `dtype`, the rest in
    float32, cast back. The second stage is ONE block writing both outputs (two blocks would be
    two GPU loops that dlight does not schedule); it recomputes x + r instead of reading s back,
    so no thread reads what another wrote."""
    n = T.int64(hidden)

    @T.prim_func(private=True, s_tir=True)
    def add_rms_norm(
        var_x: T.handle, var_r: T.handle, w: T.Buffer((n,), dtype), var_s: T.handle, var_y: T.handle
    ):
        T.func_attr({"tirx.noalias": True, EPSILON_ATTR: T.float32(epsilon)})
        a, b = T.int64(), T.int64()
        x = T.match_buffer(var_x, (a, b, n), dtype)
        r = T.match_buffer(var_r, (a, b, n), dtype)
        s = T.match_buffer(var_s, (a, b, n), dtype)
        y = T.match_buffer(var_y, (a, b, n), dtype)
        sum_sq = T.sblock_alloc_buffer((a, b), "float32")
        for i, j, k in T.grid(a, b, n):
            with T.sblock("sum_sq"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                with T.init():
                    sum_sq[vi, vj] = T.float32(0)
                sum_sq[vi, vj] = sum_sq[vi, vj] + T.Cast(
                    "float32", x[vi, vj, vk] + r[vi, vj, vk]
                ) * T.Cast("float32", x[vi, vj, vk] + r[vi, vj, vk])
        for i, j, k in T.grid(a, b, n):
            with T.sblock("add_rms_norm"):
                vi, vj, vk = T.axis.remap("SSS", [i, j, k])
                s[vi, vj, vk] = x[vi, vj, vk] + r[vi, vj, vk]
                y[vi, vj, vk] = T.Cast(
                    dtype,
                    T.rsqrt(sum_sq[vi, vj] / T.float32(hidden) + T.float32(epsilon))
                    * T.Cast("float32", x[vi, vj, vk] + r[vi, vj, vk])
                    * T.Cast("float32", w[vk]),
                )

    return add_rms_norm


def _static_dim(sinfo: relax.TensorType, axis: int) -> int | None:
    if sinfo.shape is None or not isinstance(sinfo.shape, relax.ShapeExpr):
        return None
    dim = sinfo.shape.values[axis]
    return int(dim) if isinstance(dim, tirx.IntImm) else None


def _plan(func: relax.Function) -> dict[relax.Var, tuple]:
    """add var -> (x, r, w, epsilon, norm var) for each pair the pass fuses."""
    plan: dict[relax.Var, tuple] = {}
    for block in getattr(func.body, "blocks", []):
        if not isinstance(block, relax.DataflowBlock):
            continue
        defined = set(func.params)
        adds: dict[relax.Var, relax.Call] = {}
        defined_before_add: dict[relax.Var, set] = {}
        for binding in block.bindings:
            value, var = binding.value, binding.var
            if isinstance(value, relax.Call) and value.op.same_as(_ADD):
                adds[var] = value
                defined_before_add[var] = set(defined)
            elif isinstance(value, relax.Call) and value.op.same_as(_RMS_NORM):
                s, w = value.args
                if s in adds and s not in plan and _fusable(adds[s], value, defined_before_add[s]):
                    x, r = adds[s].args
                    plan[s] = (x, r, w, float(value.attrs.epsilon), var)
            defined.add(var)
    return plan


def _fusable(add: relax.Call, norm: relax.Call, defined: set) -> bool:
    x, r = add.args
    s, w = norm.args
    sinfos = [e.ty for e in (x, r, s)]
    if not all(isinstance(si, relax.TensorType) for si in [*sinfos, w.ty]):
        return False
    if not all(tvm_ffi.structural_equal(si, sinfos[2]) for si in sinfos[:2]):
        return False  # broadcasting or a dtype change
    if sinfos[2].ndim != 3:  # (batch, seq, hidden), as every model's hidden states are
        return False
    if [int(a) % 3 for a in norm.attrs.axes] != [2] or _static_dim(sinfos[2], -1) is None:
        return False
    if w.ty.ndim != 1 or w.ty.dtype != sinfos[2].dtype:
        return False
    # The fused call takes the add's place: w must exist there already.
    return not isinstance(w, relax.Var) or w in defined


@mutator
class _Fuse(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.plan: dict[relax.Var, tuple] = {}
        self.norms: set = set()

    def run(self, gv: tvm.ir.GlobalVar, func: relax.Function) -> None:
        self.plan = _plan(func)
        if not self.plan:
            return
        self.norms = {p[4] for p in self.plan.values()}
        self.builder_.update_func(gv, self.visit_expr(func))

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var in self.norms:
            return  # emitted with its add
        if binding.var not in self.plan:
            super().visit_var_binding_(binding)
            return
        x, r, w, epsilon, norm_var = self.plan[binding.var]
        x, r, w = (self.visit_expr(e) for e in (x, r, w))
        ty = x.ty
        kernel = add_rms_norm_kernel(_static_dim(ty, -1), ty.dtype, epsilon)
        gv = self.builder_.add_func(kernel, "add_rms_norm")
        call = relax.call_tir(gv, relax.Tuple([x, r, w]), [ty, ty])
        fused = self.builder_.emit(call, name_hint="add_rms_norm")
        self.builder_.emit_normalized(relax.VarBinding(binding.var, relax.TupleGetItem(fused, 0)))
        self.builder_.emit_normalized(relax.VarBinding(norm_var, relax.TupleGetItem(fused, 1)))


def FuseAddRMSNorm() -> tvm.transform.Pass:
    """Fuse `s = x + r; y = rms_norm(s, w)` into one two-output kernel (see the module doc)."""

    @tvm.transform.module_pass(opt_level=0, name="FuseAddRMSNorm")
    def _run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        funcs = [(gv, f) for gv, f in mod.functions_items() if isinstance(f, relax.Function)]
        if not any(_plan(f) for _, f in funcs):
            return mod
        fuse = _Fuse(mod)
        for gv, func in funcs:
            fuse.run(gv, func)
        return fuse.builder_.get()

    return _run


def DispatchAddRMSNorm(
    extern: str, dtype: str, hidden_multiple: int, max_hidden: int
) -> tvm.transform.Pass:
    """FuseAddRMSNorm's kernels -> `extern(x, r, w, epsilon, s, y)` where x is of `dtype` and
    its last dimension a multiple of `hidden_multiple`, at most `max_hidden`."""

    def plan_of(mod: tvm.IRModule, func: relax.Function) -> dict:
        plan = {}
        for block in func.body.blocks:
            for binding in block.bindings:
                call = binding.value
                if not (isinstance(call, relax.Call) and call.op.same_as(_CALL_TIR)):
                    continue
                kernel = mod[call.args[0]]
                attrs = kernel.attrs if isinstance(kernel, tirx.PrimFunc) else None
                if attrs is None or EPSILON_ATTR not in attrs:
                    continue
                x = call.args[1].fields[0]
                hidden = _static_dim(x.ty, -1)
                if (
                    str(x.ty.dtype) == dtype
                    and hidden % hidden_multiple == 0
                    and hidden <= max_hidden
                ):
                    plan[binding.var] = (call.args[1].fields, float(attrs[EPSILON_ATTR]))
        return plan

    @mutator
    class _Dispatch(PlannedRewrite):
        def rewrite(self, var: relax.Var, planned: tuple) -> relax.Expr:
            operands, epsilon = planned
            args = [self.visit_expr(e) for e in operands] + [
                relax.prim_value(tirx.FloatImm("float32", epsilon))
            ]
            outs = list(var.ty.fields)  # s and y
            return relax.call_dps_packed(relax.ExternFunc(extern), relax.Tuple(args), outs)

    @tvm.transform.module_pass(opt_level=0, name="DispatchAddRMSNorm")
    def _run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        out = rewrite_planned(mod, _Dispatch, lambda _gv, f: plan_of(mod, f))
        return mod if out is None else _drop_uncalled_kernels(out, before=mod)

    return _run
