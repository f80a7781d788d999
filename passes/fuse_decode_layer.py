"""FuseDecodeLayer: a batch-1 decode's work between two attentions -> one persistent kernel.

After DispatchGEMV and DispatchAddRMSNorm, each layer of a batch-1 decode with int4 weights is,
between its attention's output `a` and the next layer's attention (or the LM head):

    o = q4(a, Wo)                          # the attention's output projection
    n1 = add_rms_norm(r, o, w1, eps1)      # s1 = n1[0], y1 = n1[1]
    h = q4_swiglu(y1, Wgu)                 # the MLP's gate/up with SiLU*up
    d = q4(h, Wd)                          # its down projection
    n2 = add_rms_norm(s1, d, w2, eps2)     # s = n2[0] (the residual stream), y2 = n2[1]
    z = q4(y2, Wz)                         # the next layer's qkv, or the LM head

six kernels, each of which costs its launch, its first loads' round trip and its tail whatever
its size (bench/NOTES.md). The pass replaces the six with one call of `layer` (gemv.cu's
Q4Layer: one persistent kernel whose blocks load each next matrix's weights before they wait
for the previous one's results):

    t = call_dps_packed(layer, (a, r, Wo, So, w1, Wgu, Sgu, Wd, Sd, w2, Wz, Sz, eps1, eps2),
                        [s, z, scratch]);  s = t[0]; z = t[1]

scratch (2 H + I,) holds o, h and d. It matches the chain only where each intermediate has no
other use, every tensor is one row (the product of the leading dimensions is 1, static), and
nothing reads s before z; everything else is left as it is.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from kiln.passes.dispatch_matmul import rewrite_planned

_CALL_DPS_PACKED = tvm.ir.Op.get("relax.call_dps_packed")


def _extern(value: relax.Expr, name: str) -> list[relax.Expr] | None:
    """The arguments of `call_dps_packed(name, ...)`, else None."""
    if not (isinstance(value, relax.Call) and value.op.same_as(_CALL_DPS_PACKED)):
        return None
    func, args = value.args[0], value.args[1]
    if not (isinstance(func, relax.ExternFunc) and func.global_symbol == name):
        return None
    return list(args.fields) if isinstance(args, relax.Tuple) else None


def _one_row(e: relax.Expr) -> bool:
    ty = e.ty
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        return False
    dims = ty.shape.values
    if not dims or not all(isinstance(d, tirx.IntImm) for d in dims):
        return False
    rows = 1
    for d in dims[:-1]:
        rows *= int(d)
    return rows == 1


class _Chains:
    """The chains of one function: z var -> (operands, s var or None, scratch length)."""

    def __init__(self, func: relax.Function, names: tuple[str, str, str]):
        self.q4, self.swiglu, self.norm = names
        self.values: dict[relax.Var, relax.Expr] = {}
        self.position: dict[relax.Var, int] = {}
        self.users: dict[relax.Var, list] = {}
        bindings = [b for block in func.body.blocks for b in block.bindings]
        for i, b in enumerate(bindings):
            self.values[b.var] = b.value
            self.position[b.var] = i
            for v in relax.analysis.free_vars(b.value):
                self.users.setdefault(v, []).append(b.var)
        for v in relax.analysis.free_vars(func.body.body):
            self.users.setdefault(v, []).append(None)  # the function's result: after everything
        self.plan: dict[relax.Var, tuple] = {}
        for b in bindings:
            if (chain := self._match(b.var)) is not None:
                self.plan[b.var] = chain

    def _only_user(self, var: relax.Expr, user: relax.Var) -> bool:
        return isinstance(var, relax.Var) and self.users.get(var) == [user]

    def _items(self, norm: relax.Var) -> dict[int, relax.Var] | None:
        """The TupleGetItem bindings that are a norm's only users, by index."""
        items = {}
        for user in self.users.get(norm, []):
            value = self.values.get(user)
            if not isinstance(value, relax.TupleGetItem) or value.index in items:
                return None
            items[value.index] = user
        return items

    def _norm_of(self, y: relax.Expr, gemv_out: str) -> tuple | None:
        """y = add_rms_norm(x, r, w, eps)[1]: (norm var, args, the residual, the GEMV output)."""
        item = self.values.get(y) if isinstance(y, relax.Var) else None
        if not isinstance(item, relax.TupleGetItem) or item.index != 1:
            return None
        norm = item.tuple_value
        args = _extern(self.values.get(norm), self.norm)
        if args is None:
            return None
        for residual, out in ((args[0], args[1]), (args[1], args[0])):
            gemv = _extern(self.values.get(out), gemv_out) if isinstance(out, relax.Var) else None
            if gemv is not None and self._only_user(out, norm):
                return norm, args, residual, out, gemv
        return None

    def _match(self, z: relax.Var) -> tuple | None:
        z_args = _extern(self.values[z], self.q4)
        if z_args is None or not _one_row(z_args[0]):
            return None
        y2 = z_args[0]
        second = self._norm_of(y2, self.q4)
        if second is None or not self._only_user(y2, z):
            return None
        n2, n2_args, s1, d, d_args = second
        items2 = self._items(n2)
        if items2 is None or items2.get(1) != y2:
            return None
        h = d_args[0]
        h_args = _extern(self.values.get(h), self.swiglu) if isinstance(h, relax.Var) else None
        if h_args is None or not self._only_user(h, d):
            return None
        y1 = h_args[0]
        first = self._norm_of(y1, self.q4)
        if first is None or not self._only_user(y1, h):
            return None
        n1, n1_args, r, o, o_args = first
        items1 = self._items(n1)
        if items1 is None or items1 != {0: s1, 1: y1} or not self._only_user(s1, n2):
            return None
        s = items2.get(0)
        if s is not None and any(u is None or self.position[u] <= self.position[z]
                                 for u in self.users.get(s, [])):  # fmt: skip
            return None  # something reads s before z, where the fused call defines it
        a = o_args[0]
        if not all(_one_row(e) for e in (a, r, o, h, y2)):
            return None
        hidden = int(o.ty.shape.values[-1])
        inter = int(h.ty.shape.values[-1])
        operands = [
            a, r, *o_args[1:], n1_args[2], *h_args[1:], *d_args[1:], n2_args[2], *z_args[1:],
            n1_args[3], n2_args[3],
        ]  # fmt: skip
        return operands, s, r.ty, 2 * hidden + inter


def FuseDecodeLayer(layer: str, q4: str, q4_swiglu: str, add_rms_norm: str) -> tvm.transform.Pass:
    """Fuse each batch-1 chain q4 -> add_rms_norm -> q4_swiglu -> q4 -> add_rms_norm -> q4 of
    these externs into one call of `layer` (see the module doc)."""
    names = (q4, q4_swiglu, add_rms_norm)

    @mutator
    class _Fuse(PyExprMutator):
        def run(self, gv: tvm.ir.GlobalVar, func: relax.Function, plan: dict) -> None:
            self.plan = plan
            self.deferred = {chain[1] for chain in plan.values() if chain[1] is not None}
            body = relax.analysis.remove_all_unused(self.visit_expr(func))
            self.builder_.update_func(gv, body)

        def visit_var_binding_(self, binding: relax.VarBinding) -> None:
            if binding.var in self.deferred:
                return  # defined by the fused call, at its z
            if binding.var not in self.plan:
                super().visit_var_binding_(binding)
                return
            operands, s, s_ty, scratch = self.plan[binding.var]
            outs = [s_ty, binding.var.ty, relax.TensorType((scratch,), "float16")]
            call = relax.call_dps_packed(
                relax.ExternFunc(layer), relax.Tuple([self.visit_expr(e) for e in operands]), outs
            )
            fused = self.builder_.emit(call, name_hint="layer")
            for i, var in ((0, s), (1, binding.var)):
                if var is not None:
                    self.builder_.emit_normalized(
                        relax.VarBinding(var, relax.TupleGetItem(fused, i))
                    )

    @tvm.transform.module_pass(opt_level=0, name="FuseDecodeLayer")
    def _run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        out = rewrite_planned(mod, _Fuse, lambda _gv, f: _Chains(f, names).plan)
        return mod if out is None else out

    return _run
