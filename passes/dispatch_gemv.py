"""DispatchGEMV: the decode's GEMVs -> a GEMV library's externs, SiLU*up as an epilogue.

Where Linears multiply a few static rows (decode at batch 1: the rows of x are all static and at
most 8; TVM's GEMV schedules are the alternative), the pass rewrites

* a quantized Linear's kernel (kiln.compiler.quantization.layers marks it `kiln.linear` with
  its scheme's key) whose scheme `quantized` names:
      y = call_tir(kernel, (x, *stored))  ->  y = call_dps_packed(gemv, (x, *stored))
* the MLP's SwiGLU after a combined gate/up Linear (kiln.passes.combine_parallel_matmul), for
  those schemes and for float weights of a dtype `float_swiglu` names:
      gu = Linear(x)                  # (..., 2I): gate rows, then up rows
      g, u = split(gu, [I], axis=-1)
      y = multiply(silu(g), u)        ->  y = call_dps_packed(swiglu, (x, *weights))
  one kernel that computes both rows of each output and never writes the (..., 2I) product.

In the `batched` functions (a batched decode: one row per sequence, as many as the engine
batches, symbolic), a quantized Linear whose externs have a `batched` form becomes
      y = call_dps_packed(batched, (x, *stored)) -> (y, w)[0]
  where w (N, K) is scratch for the extern to dequantize the weight into when the rows are too
  many for GEMVs (TVM's dequantizing GEMM schedules are the alternative); its SwiGLU stays an
  op after the gate/up Linear.

`extern(x, *weights, out)` computes the same numbers in float32 and rounds once (the unfused
graph rounds the product to the model dtype before SiLU). A float Linear is the matmul kernel
FoldWeightTranspose leaves (`x @ W^T`) or a plain `matmul(x, permute_dims(W))`. Everything else,
prefill's GEMMs and float weights in batches included, is left as it is. Kernels left without a
caller are dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
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
    quantized_linear,
    rewrite_planned,
)
from kiln.passes.fuse_swiglu import Bindings, swiglu_product

_CALL_TIR = tvm.ir.Op.get("relax.call_tir")
_MATMUL = tvm.ir.Op.get("relax.matmul")
_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
MAX_ROWS = 8  # a GEMV: x has at most this many (static) rows
FLOAT_COLS_MULTIPLE = 32  # of the float SwiGLU externs' K


@dataclass(frozen=True)
class GEMVExterns:
    """The externs for Linears of one quantization scheme."""

    gemv: str  # (x, *stored, out): out = x @ W^T
    swiglu: str  # (x, *stored, out): SiLU(x @ Wg^T) * (x @ Wu^T), W = [Wg; Wu]
    cols_multiple: int = 1  # x's width must be a multiple of this (the extern's group size)
    # (x, *stored, out, w): out = x @ W^T for a batch's symbolic rows, with w (N, K) in x's
    # dtype as scratch (to dequantize W into, where many rows make a GEMM the faster way)
    batched: str | None = None


def _gemv_rows(x: relax.Expr) -> bool:
    """Whether x's rows are a few static ones."""
    lead = _rows(x)
    return lead is not None and _static(lead) and prod(int(d) for d in lead) <= MAX_ROWS


def _rows(x: relax.Expr) -> list | None:
    """x's leading dimensions, if its shape is known."""
    ty = x.ty
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    return list(ty.shape.values[:-1])


def _static(dims: list) -> bool:
    return all(isinstance(d, tirx.IntImm) for d in dims)


class _Function(Bindings):
    """One function's bindings, and the Linears among them."""

    def __init__(self, mod: tvm.IRModule, func: relax.Function):
        super().__init__(func)
        self.mod = mod

    def quantized(self, call: relax.Expr) -> tuple[str, list[relax.Expr]] | None:
        """(scheme key, [x, *stored]) of a quantized Linear's kernel call."""
        return quantized_linear(self.mod, call)

    def float_linear(self, call: relax.Expr) -> list[relax.Expr] | None:
        """[x, W] of `x @ W^T` with W a static 2-D weight."""
        if not isinstance(call, relax.Call):
            return None
        if call.op.same_as(_MATMUL):
            perm = self.value(call.args[1], _PERMUTE)
            axes = perm.attrs.axes if perm is not None else None
            if perm is None or not (axes is None or [int(a) for a in axes] == [1, 0]):
                return None
            return [call.args[0], perm.args[0]]
        if call.op.same_as(_CALL_TIR) and len(call.args) == 2 and len(call.args[1].fields) == 2:
            x, w = call.args[1].fields
            if w.ty.ndim != 2 or not isinstance(self.mod[call.args[0]], tirx.PrimFunc):
                return None
            expected = nt_matmul_kernel(x.ty, w.ty, call.ty)
            if tvm_ffi.structural_equal(expected, self.mod[call.args[0]], map_free_vars=True):
                return [x, w]
        return None


def _plan(
    fn: _Function,
    quantized: Mapping[str, GEMVExterns],
    float_swiglu: Mapping[str, str],
    batched: bool,
) -> dict[relax.Var, tuple[str, list[relax.Expr], relax.TensorType | None]]:
    """binding var -> (extern, its operands, the scratch's type or None)."""

    def takes(linear: tuple[str, list[relax.Expr]] | None) -> GEMVExterns | None:
        if linear is None or linear[0] not in quantized or _rows(linear[1][0]) is None:
            return None
        externs, x = quantized[linear[0]], linear[1][0]
        if not (_gemv_rows(x) or (batched and externs.batched and not _static(_rows(x)))):
            return None
        return externs if int(x.ty.shape.values[-1]) % externs.cols_multiple == 0 else None

    plan: dict[relax.Var, tuple[str, list[relax.Expr], relax.TensorType | None]] = {}
    for var, value in fn.bound.items():
        if not isinstance(value, relax.Call):
            continue
        linear = fn.quantized(value)
        if (externs := takes(linear)) is not None:
            x = linear[1][0]
            if _gemv_rows(x):
                plan[var] = (externs.gemv, linear[1], None)
            else:  # a batch: scratch for the weight
                rows, cols = var.ty.shape.values[-1], x.ty.shape.values[-1]
                plan[var] = (externs.batched, linear[1], relax.TensorType([rows, cols], x.ty.dtype))
            continue
        gu = swiglu_product(fn, value)
        if gu is None:
            continue
        call = fn.bound.get(gu)
        linear = fn.quantized(call)
        if (externs := takes(linear)) is not None:
            if not _gemv_rows(linear[1][0]):
                continue  # a batch: its gate/up goes as a plain Linear, SiLU*up stays an op
            extern, operands = externs.swiglu, linear[1]
        elif linear is not None:
            continue
        else:
            operands = fn.float_linear(call)
            dtype = str(gu.ty.dtype)
            if operands is None or dtype not in float_swiglu or str(operands[1].ty.dtype) != dtype:
                continue
            if not _gemv_rows(operands[0]):  # float weights in batches: the GEMMs' (cuBLAS)
                continue
            if int(operands[0].ty.shape.values[-1]) % FLOAT_COLS_MULTIPLE:
                continue
            extern = float_swiglu[dtype]
        if str(operands[0].ty.dtype) != str(gu.ty.dtype):
            continue
        plan[var] = (extern, operands, None)
        plan.pop(gu, None)  # its Linear goes into the fused kernel
    return plan


@mutator
class _Dispatch(PlannedRewrite):
    def rewrite(self, var: relax.Var, planned: tuple) -> relax.Expr:
        extern, operands, scratch = planned
        args = relax.Tuple([self.visit_expr(e) for e in operands])
        if scratch is None:
            return relax.call_dps_packed(relax.ExternFunc(extern), args, var.ty)
        outs = self.builder_.emit(
            relax.call_dps_packed(relax.ExternFunc(extern), args, [var.ty, scratch])
        )
        return relax.TupleGetItem(outs, 0)


def DispatchGEMV(
    quantized: Mapping[str, GEMVExterns],
    float_swiglu: Mapping[str, str],
    batched: tuple[str, ...] = (),
) -> tvm.transform.Pass:
    """`quantized`: scheme key -> its externs; `float_swiglu`: weight dtype -> SwiGLU extern;
    `batched`: functions whose symbolic rows are one per sequence (see the module doc)."""

    @tvm.transform.module_pass(opt_level=0, name="DispatchGEMV")
    def _run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        def plan_of(gv: tvm.ir.GlobalVar, f: relax.Function) -> dict:
            return _plan(_Function(mod, f), quantized, float_swiglu, gv.name_hint in batched)

        out = rewrite_planned(mod, _Dispatch, plan_of)
        return mod if out is None else _drop_uncalled_kernels(out, before=mod)

    return _run
