"""DispatchMatmul: half-precision GEMMs by a weight -> one call of a GEMM library's extern function.

`out = x @ W^T` with x (..., k) activations whose leading axes are not all static (prefill's
tokens, a batched decode's sequences) and W (n, k) a 2-D weight parameter of the function, as
Kiln's models store weights, becomes

    out = R.call_dps_packed(extern, (x, W), out_ty=...)

where `extern(x, W, out)` computes the same product in a vendor library (on CUDA, cuBLAS through
kiln.runtime.cublas). The pass runs in the library_dispatch phase of the targets whose TargetSpec
asks for it. By then the graph phase has folded each weight's transpose into a kernel
(FoldWeightTranspose), so the pass matches a `call_tir` of a PrimFunc that computes exactly
`x @ W^T` (checked against the kernel TVM's FuseTransposeMatmul writes for those operands), and a
plain `R.matmul(x, R.permute_dims(W))` alike. With `dequantize`, a quantized Linear's kernel
(kiln.compiler.quantization.layers marks it `kiln.linear` with its scheme's key) on such rows
becomes

    w = R.call_tir(dequantize, stored, (n, k) model dtype)   # the weight the kernel multiplies
    out = R.call_dps_packed(extern, (x, w), out_ty=...)

which trades writing and reading the weight in the model dtype once a call for the library's
GEMM (TVM's dequantizing GEMM schedules run far below the tensor cores' peak: prefill of a
q4f16 7B at a quarter of it). Left alone: static shapes (the batch-1 decode's GEMVs, which TVM's
GEMV schedule runs near the memory roofline), other dtypes, and quantized weights without
`dequantize`. An epilogue TVM would have fused into the kernel (a residual add, a cast) stays a
separate op. Kernels left without a caller are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import tvm
import tvm_ffi
from tvm import relax, te, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from kiln.compiler.quantization.layers import LINEAR_ATTR, dequantize_te, scheme_of

if TYPE_CHECKING:
    from kiln.compiler.quantization.base import WeightScheme

_MATMUL = tvm.ir.Op.get("relax.matmul")
_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def nt_matmul_kernel(
    x: relax.TensorType, w: relax.TensorType, out: relax.TensorType
) -> tirx.PrimFunc:
    """The kernel FuseTransposeMatmul writes for x (..., k) @ w (n, k)^T -> out (..., n):
    `out[..., j] = sum_k x[..., k] * w[j, k]`, accumulated in out's dtype."""
    xt = te.placeholder(list(x.shape.values), x.dtype, "x")
    wt = te.placeholder(list(w.shape.values), w.dtype, "w")
    k = te.reduce_axis((0, w.shape.values[1]), "k")
    result = te.compute(
        list(out.shape.values),
        lambda *i: te.sum(
            xt[(*i[:-1], k)].astype(out.dtype) * wt[i[-1], k].astype(out.dtype), axis=k
        ),
        name="NT_matmul",
    )
    # As relax.BlockBuilder.call_te makes it: int64 indices, no global symbol.
    func = te.create_prim_func([xt, wt, result], index_dtype_override="int64")
    return func.without_attr("global_symbol")


def _weights(func: relax.Function) -> set:
    """The 2-D tensors that are parameters of `func`: its own, and the fields of a parameter
    tuple (Kiln's packed weights) taken out by TupleGetItem."""
    params = set(func.params)
    found = {p for p in func.params if _is_matrix(p)}
    for block in getattr(func.body, "blocks", []):
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.TupleGetItem) and value.tuple_value in params:
                if _is_matrix(binding.var):
                    found.add(binding.var)
    return found


def _is_matrix(e: relax.Expr) -> bool:
    ty = e.ty
    return (
        isinstance(ty, relax.TensorType)
        and ty.ndim == 2
        and isinstance(ty.shape, relax.ShapeExpr)
        and all(isinstance(d, tirx.IntImm) for d in ty.shape.values)
    )


def _qualifies(x: relax.Expr, w: relax.Expr, out: relax.Type, dtypes: Sequence[str]) -> bool:
    if not (isinstance(out, relax.TensorType) and isinstance(out.shape, relax.ShapeExpr)):
        return False
    if w.ty.dtype != x.ty.dtype or out.dtype not in (x.ty.dtype, "float32"):
        return False
    return _symbolic_rows(x.ty, dtypes)


def _symbolic_rows(xt: relax.Type, dtypes: Sequence[str]) -> bool:
    """x's dtype is one of `dtypes` and its rows are not all static: all-static rows are the
    batch-1 decode's GEMVs, which TVM's GEMV schedule keeps."""
    if not (isinstance(xt, relax.TensorType) and isinstance(xt.shape, relax.ShapeExpr)):
        return False
    leading = xt.shape.values[:-1]
    return (
        xt.dtype in dtypes
        and len(leading) >= 1
        and not all(isinstance(d, tirx.IntImm) for d in leading)
    )


def _swaps_last_two(call: relax.Call) -> bool:
    return call.attrs.axes is None or [int(a) for a in call.attrs.axes] == [1, 0]


def quantized_linear(mod: tvm.IRModule, call: relax.Expr) -> tuple[str, list[relax.Expr]] | None:
    """(scheme key, [x, *stored]) of a call of a quantized Linear's kernel (one that
    kiln.compiler.quantization.layers marks with LINEAR_ATTR)."""
    if not (isinstance(call, relax.Call) and call.op.same_as(_CALL_TIR)) or len(call.args) > 2:
        return None
    kernel = mod[call.args[0]]
    if not isinstance(kernel, tirx.PrimFunc) or LINEAR_ATTR not in (kernel.attrs or {}):
        return None
    return str(kernel.attrs[LINEAR_ATTR]), list(call.args[1].fields)


@dataclass(frozen=True)
class _Quantized:
    """A quantized Linear's operands: x, the stored tensors, the (rows, cols) weight's scheme."""

    x: relax.Expr
    stored: tuple[relax.Expr, ...]
    scheme: WeightScheme
    rows: int
    cols: int


class _Planner:
    """Finds the bindings to rewrite in one function: binding var -> (x, W) or _Quantized."""

    def __init__(self, mod: tvm.IRModule, dtypes: Sequence[str], dequantize: bool):
        self.mod, self.dtypes, self.dequantize = mod, dtypes, dequantize
        self.kernels: dict[tuple, bool] = {}  # (kernel, operand types) -> computes x @ W^T?

    def plan(self, func: relax.Function) -> dict[relax.Var, Any]:
        weights = _weights(func)
        bound: dict[relax.Var, relax.Expr] = {}
        plan = {}
        for block in getattr(func.body, "blocks", []):
            for binding in block.bindings:
                bound[binding.var] = binding.value
                quantized = self._quantized(binding.value) if self.dequantize else None
                if quantized is not None:
                    plan[binding.var] = quantized
                    continue
                operands = self._operands(binding.value, bound)
                if operands is None:
                    continue
                x, w = operands
                if w in weights and _qualifies(x, w, binding.value.ty, self.dtypes):
                    if self._computes_nt_matmul(binding.value, x, w):
                        plan[binding.var] = operands
        return plan

    def _quantized(self, value: relax.Expr) -> _Quantized | None:
        """A quantized Linear's kernel call on rows that qualify, of a scheme known here."""
        linear = quantized_linear(self.mod, value)
        if linear is None:
            return None
        key, (x, *stored) = linear
        scheme = scheme_of(key)
        xt, out = x.ty, value.ty
        if scheme is None or not isinstance(out, relax.TensorType):
            return None
        dtype = str(xt.dtype) if isinstance(xt, relax.TensorType) else None
        if not _symbolic_rows(xt, self.dtypes) or out.dtype != dtype:
            return None
        if str(scheme.model_dtype) != dtype:
            return None
        rows, cols = out.shape.values[-1], xt.shape.values[-1]
        return _Quantized(x, tuple(stored), scheme, int(rows), int(cols))

    def _operands(self, value: relax.Expr, bound: dict) -> tuple[relax.Expr, relax.Expr] | None:
        if not isinstance(value, relax.Call):
            return None
        if value.op.same_as(_CALL_TIR):
            args = value.args[1]
            if len(value.args) != 2 or not isinstance(args, relax.Tuple) or len(args) != 2:
                return None
            callee = self.mod[value.args[0]]
            if not isinstance(callee, tirx.PrimFunc) or len(callee.params) != 3:
                return None
            return args[0], args[1]
        if value.op.same_as(_MATMUL):
            x, rhs = value.args
            transposed = bound.get(rhs) if isinstance(rhs, relax.Var) else rhs
            if (
                isinstance(transposed, relax.Call)
                and transposed.op.same_as(_PERMUTE)
                and _swaps_last_two(transposed)
            ):
                return x, transposed.args[0]
        return None

    def _computes_nt_matmul(self, value: relax.Call, x: relax.Expr, w: relax.Expr) -> bool:
        if value.op.same_as(_MATMUL):
            return True
        gv = value.args[0]
        key = (gv.name_hint, *(tvm_ffi.structural_hash(t) for t in (x.ty, w.ty, value.ty)))
        if key not in self.kernels:
            expected = nt_matmul_kernel(x.ty, w.ty, value.ty)
            self.kernels[key] = tvm_ffi.structural_equal(expected, self.mod[gv], map_free_vars=True)
        return self.kernels[key]


def rewrite_planned(
    mod: tvm.IRModule,
    rewriter: Callable[[tvm.IRModule], PlannedRewrite],
    plan_of: Callable[[tvm.ir.GlobalVar, relax.Function], dict],
) -> tvm.IRModule | None:
    """Plan every Relax function of `mod` (`plan_of(gv, func)`: binding var -> what to put there)
    and rewrite those with a plan through one `rewriter(mod)`; None when no function has one."""
    plans = [
        (gv, f, plan)
        for gv, f in mod.functions_items()
        if isinstance(f, relax.Function) and isinstance(f.body, relax.SeqExpr)
        if (plan := plan_of(gv, f))
    ]
    if not plans:
        return None
    rewrite = rewriter(mod)
    for gv, func, plan in plans:
        rewrite.run(gv, func, plan)
    return rewrite.builder_.get()


class PlannedRewrite(PyExprMutator):
    """Rewrites the bindings a plan names, one function at a time: `rewrite(var, planned)` gives
    each one's new value; bindings left without a use (a matmul's permute_dims of its weight,
    the parts of a fused pattern) are dropped. Subclasses are decorated with `@mutator`."""

    def run(self, gv: tvm.ir.GlobalVar, func: relax.Function, plan: dict) -> None:
        self.plan = plan
        self.builder_.update_func(gv, relax.analysis.remove_all_unused(self.visit_expr(func)))

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var not in self.plan:
            super().visit_var_binding_(binding)
            return
        new = self.builder_.normalize(self.rewrite(binding.var, self.plan[binding.var]))
        self.builder_.emit_normalized(relax.VarBinding(binding.var, new))

    def rewrite(self, var: relax.Var, planned: Any) -> relax.Expr:
        raise NotImplementedError


@mutator
class _Dispatch(PlannedRewrite):
    def __init__(self, mod: tvm.IRModule, extern: str):
        super().__init__(mod)
        self.extern = relax.ExternFunc(extern)

    def rewrite(self, var: relax.Var, planned: Any) -> relax.Expr:
        if isinstance(planned, _Quantized):
            q = planned
            compute = dequantize_te(q.scheme, q.rows, q.cols)
            stored = [self.visit_expr(e) for e in q.stored]
            w = self.builder_.emit_te(compute, *stored, primfunc_name_hint="dequantize")
            x = self.visit_expr(q.x)
        else:
            x, w = (self.visit_expr(e) for e in planned)
        return relax.call_dps_packed(self.extern, relax.Tuple([x, w]), var.ty)


def DispatchMatmul(
    extern: str, dtypes: Sequence[str] = ("float16", "bfloat16"), dequantize: bool = False
) -> tvm.transform.Pass:
    """Send `x @ W^T` GEMMs to `extern(x, W, out)`; with `dequantize`, quantized Linears'
    too, after a kernel that dequantizes the weight (see the module doc)."""

    @tvm.transform.module_pass(opt_level=0, name="DispatchMatmul")
    def _run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        planner = _Planner(mod, tuple(dtypes), dequantize)
        out = rewrite_planned(mod, lambda m: _Dispatch(m, extern), lambda _gv, f: planner.plan(f))
        return mod if out is None else _drop_uncalled_kernels(out, before=mod)

    return _run


def _drop_uncalled_kernels(mod: tvm.IRModule, before: tvm.IRModule) -> tvm.IRModule:
    """Remove the PrimFuncs that were called before the rewrite and are called no more."""
    uncalled = _called(before) - _called(mod)
    dead = [gv for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)
            and gv.name_hint in uncalled]  # fmt: skip
    if dead:
        mod = mod.clone()
        for gv in dead:
            del mod[gv]
    return mod


def _called(mod: tvm.IRModule) -> set[str]:
    names: set[str] = set()

    def visit(e: relax.Expr) -> None:
        if isinstance(e, relax.GlobalVar):
            names.add(e.name_hint)

    for _, f in mod.functions_items():
        if isinstance(f, relax.Function):
            relax.analysis.post_order_visit(f, visit)
    return names
