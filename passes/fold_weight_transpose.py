"""FoldWeightTranspose: `matmul(x, permute_dims(W))` -> one matmul kernel that reads W as stored.

`nn.Linear` computes `x @ W.T` as `matmul(x, permute_dims(W))`. Unfolded, every call would
first write a transposed copy of the weight. The pass makes it one `call_tir` of an `NT_matmul`
kernel indexing `W[j, k]` directly (TVM's `relax.transform.FuseTransposeMatmul` does the
rewrite), and drops the composite functions that rewrite leaves behind. It folds a
`permute_dims` that swaps the last two axes (or a 2-D one with default axes) feeding a
`matmul`'s second operand; a module without one is returned as it is.

Quantized Linears never have the transpose: their kernel indexes the stored weight as (out, in)
already (kiln.compiler.quantization.layers).
"""

from __future__ import annotations

import tvm
from tvm import relax

_MATMUL = tvm.ir.Op.get("relax.matmul")
_PERMUTE = tvm.ir.Op.get("relax.permute_dims")


def _swaps_last_two(call: relax.Call) -> bool:
    ndim = call.args[0].ty.ndim
    if ndim < 2:
        return False
    if call.attrs.axes is None:
        return ndim == 2
    axes = list(range(ndim))
    axes[-1], axes[-2] = axes[-2], axes[-1]
    return [int(a) for a in call.attrs.axes] == axes


def has_weight_transpose(func: relax.Function) -> bool:
    """Whether `func` has a matmul whose second operand is a last-two-axes permute_dims."""
    bound: dict[relax.Var, relax.Expr] = {}
    for block in getattr(func.body, "blocks", []):
        for binding in block.bindings:
            bound[binding.var] = binding.value
    for value in bound.values():
        if isinstance(value, relax.Call) and value.op.same_as(_MATMUL):
            rhs = value.args[1]
            rhs = bound.get(rhs, rhs) if isinstance(rhs, relax.Var) else rhs
            if isinstance(rhs, relax.Call) and rhs.op.same_as(_PERMUTE) and _swaps_last_two(rhs):
                return True
    return False


def FoldWeightTranspose() -> tvm.transform.Pass:
    """Fold `permute_dims(W)` into the matmul that consumes it (see the module doc)."""

    @tvm.transform.module_pass(opt_level=0, name="FoldWeightTranspose")
    def _run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if not any(
            isinstance(f, relax.Function) and has_weight_transpose(f)
            for _, f in mod.functions_items()
        ):
            return mod
        mod = relax.transform.FuseTransposeMatmul()(mod)
        leftovers = [
            gv
            for gv, f in mod.functions_items()
            if isinstance(f, relax.Function)
            and f.attrs is not None
            and f.attrs.get("Composite") == "transpose_matmul_fuse"
        ]
        if leftovers:
            mod = mod.clone()
            for gv in leftovers:
                del mod[gv]
        return mod

    return _run
