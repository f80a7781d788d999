"""CombineParallelMatmul: Linears that read the same input become one matmul.

A Llama layer projects its normed input three times (q, k, v) for attention and twice (gate,
up) for the MLP. Done apart, decode runs three GEMVs that each read the input and launch on
their own; combined, one kernel reads one weight of the rows of all three and its output is
split. Kiln's models write the Linears apart, as the checkpoints store them, and this pass
combines them:

    y_a = matmul(x, permute_dims(W_a))        y = matmul(x, permute_dims(W))   W = [W_a; W_b]
    y_b = matmul(x, permute_dims(W_b))   ->   y_a, y_b = split(y, [rows_a], axis=-1)

and `concat((y_a, y_b), axis=-1)` of the parts in order becomes `y` itself (attention takes q,
k and v as one tensor). A quantized Linear (kiln.compiler.quantization.layers) is one kernel
that dequantizes its stored tensors as it multiplies, marked with the `kiln.linear` attribute;
its parts combine the same way, each stored tensor becoming one of the rows of all parts, with
the kernel rebuilt for those rows by `kernels` (the preset's schemes).

The weights are the fields of the functions' packed parameter tuple, as Kiln's export lays
them out (`param_names` names them). Linears combine when they read the same input, are of the
same kind (float dtype, or quantization scheme), have the same input width and belong to the
same module (`layers.0.self_attn.q_proj`, `...k_proj`: parent `layers.0.self_attn`), and when
their weights are used nowhere else, by any function of the module: every function takes the
same parameters, so a group combines in all of them or in none. The combined parameter is named
after its parts (q_proj, k_proj, v_proj -> qkv_proj; gate_proj, up_proj -> gate_up_proj).

The result carries the module attributes `kiln.params` (the new parameter names, in order) and
`kiln.combined` (combined parameter -> the parameters whose rows it joins, in order); weight
conversion then builds each from its parts' float weights (kiln.compiler.combine). A module
without such Linears comes back unchanged.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from kiln.compiler.quantization.layers import LINEAR_ATTR, LinearKernels

_MATMUL = tvm.ir.Op.get("relax.matmul")
_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
_CALL_TIR = tvm.ir.Op.get("relax.call_tir")
_CONCAT = tvm.ir.Op.get("relax.concat")


@dataclass(frozen=True)
class _Linear:
    """One Linear found in a function: `var = x @ W.T` with W's stored tensors `fields`."""

    var: relax.Var
    call: relax.Call
    x: relax.Expr
    fields: tuple[int, ...]  # indices in the packed parameters
    kind: tuple  # what two Linears must share to combine (besides x and the module)
    rows: int
    drop: tuple[relax.Var, ...]  # bindings only this Linear used (a float weight's transpose)


def combined_name(names: Sequence[str]) -> str:
    """`a.q_proj.weight`, `a.k_proj.weight`, `a.v_proj.weight` -> `a.qkv_proj.weight`;
    `m.gate_proj.scale`, `m.up_proj.scale` -> `m.gate_up_proj.scale`."""
    modules = [n.rsplit(".", 1)[0] for n in names]
    parent = modules[0].rpartition(".")[0]
    leaves = [m.rpartition(".")[2] for m in modules]
    stems = [leaf.removesuffix("_proj") for leaf in leaves]
    joined = "".join(stems) if all(len(s) == 1 for s in stems) else "_".join(stems)
    if all(leaf.endswith("_proj") for leaf in leaves):
        joined += "_proj"
    suffix = names[0].rsplit(".", 1)[1]
    return f"{parent}.{joined}.{suffix}" if parent else f"{joined}.{suffix}"


def _parent_module(name: str) -> str:
    """`layers.0.self_attn.q_proj.weight` -> `layers.0.self_attn`."""
    return name.rsplit(".", 1)[0].rpartition(".")[0]


def _packed(func: relax.Function) -> relax.Var | None:
    if not isinstance(func, relax.Function) or func.attrs is None or "num_input" not in func.attrs:
        return None
    if len(func.params) <= int(func.attrs["num_input"]):
        return None
    last = func.params[-1]
    return last if isinstance(last.ty, relax.TupleType) else None


def _static_2d(ty: relax.Type) -> tuple[int, int] | None:
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    dims = ty.shape.values
    if len(dims) != 2 or not all(isinstance(d, tirx.IntImm) for d in dims):
        return None
    return int(dims[0]), int(dims[1])


def _last_dim(ty: relax.Type) -> int | None:
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    if not ty.shape.values:
        return None
    last = ty.shape.values[-1]
    return int(last) if isinstance(last, tirx.IntImm) else None


class _Scan:
    """One function's Linears, and which packed fields it uses in any other way."""

    def __init__(self, mod: tvm.IRModule, func: relax.Function, packed: relax.Var):
        self.field: dict[relax.Var, int] = {}  # var bound to packed[i] -> i
        self.bound: dict[relax.Var, relax.Expr] = {}
        self.uses: dict[relax.Var, int] = defaultdict(int)
        self.linears: list[_Linear] = []
        self.packed_whole = False  # the tuple itself is used (not only its fields)
        bindings = [b for block in func.body.blocks for b in block.bindings]
        for b in bindings:
            value = b.value
            self.bound[b.var] = value
            if isinstance(value, relax.TupleGetItem) and value.tuple_value.same_as(packed):
                self.field[b.var] = int(value.index)
                continue
            for v in relax.analysis.free_vars(value):
                self.uses[v] += 1
                self.packed_whole |= v.same_as(packed)
        for v in relax.analysis.free_vars(func.body.body):
            self.uses[v] += 1
            self.packed_whole |= v.same_as(packed)
        for b in bindings:
            linear = self._linear(mod, b.var, b.value)
            if linear is not None:
                self.linears.append(linear)

    def _weight(self, e: relax.Expr) -> int | None:
        if isinstance(e, relax.Var) and e in self.field and self.uses[e] == 1:
            return self.field[e]
        return None

    def _linear(self, mod: tvm.IRModule, var: relax.Var, value: relax.Expr) -> _Linear | None:
        if not isinstance(value, relax.Call):
            return None
        rows = _last_dim(var.ty)
        if rows is None:
            return None
        if value.op.same_as(_MATMUL):
            x, t = value.args
            perm = self.bound.get(t) if isinstance(t, relax.Var) else None
            if not (isinstance(perm, relax.Call) and perm.op.same_as(_PERMUTE)):
                return None
            if self.uses[t] != 1 or not _transposes(perm):
                return None
            w = perm.args[0]
            field, shape = self._weight(w), _static_2d(w.ty)
            if field is None or shape is None or shape[0] != rows:
                return None
            kind = ("matmul", w.ty.dtype, shape[1], var.ty.dtype, str(value.attrs.out_dtype))
            return _Linear(var, value, x, (field,), kind, rows, (t,))
        if value.op.same_as(_CALL_TIR):
            kernel = mod[value.args[0]]
            if kernel.attrs is None or LINEAR_ATTR not in kernel.attrs:
                return None
            x, *stored = value.args[1].fields
            fields = [self._weight(s) for s in stored]
            if not stored or any(f is None for f in fields) or len(value.args) > 2:
                return None
            kind = ("kernel", str(kernel.attrs[LINEAR_ATTR]), _last_dim(x.ty), var.ty.dtype)
            return _Linear(var, value, x, tuple(fields), kind, rows, ())
        return None


def _transposes(perm: relax.Call) -> bool:
    axes = perm.attrs.axes
    return axes is None or [int(a) for a in axes] == [1, 0]


def _groups(scan: _Scan, names: Sequence[str]) -> list[tuple[_Linear, ...]]:
    """Linears of one function that combine, in binding order, each group in binding order."""
    by_key: dict[tuple, list[_Linear]] = defaultdict(list)
    for linear in scan.linears:
        by_key[(linear.x, linear.kind, _parent_module(names[linear.fields[0]]))].append(linear)
    return [tuple(g) for g in by_key.values() if len(g) > 1]


def _signature(group: tuple[_Linear, ...]) -> tuple[tuple[int, ...], ...]:
    return tuple(linear.fields for linear in group)


def _fields(sig: tuple[tuple[int, ...], ...]) -> set[int]:
    return {i for fields in sig for i in fields}


def CombineParallelMatmul(
    param_names: Sequence[str], kernels: LinearKernels | None = None
) -> tvm.transform.Pass:
    """Combine Linears that read the same input (see the module doc). `param_names` names the
    packed parameters; `kernels` rebuilds quantized Linears' kernels (without it, only float
    Linears combine)."""

    @tvm.transform.module_pass(opt_level=0, name="CombineParallelMatmul")
    def _run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        scans = {
            gv: _Scan(mod, func, packed)
            for gv, func in mod.functions_items()
            if (packed := _packed(func)) is not None
        }
        if not scans or any(s.packed_whole for s in scans.values()):
            return mod
        # A group combines when every function that touches one of its fields has it.
        found: dict[relax.GlobalVar, dict[tuple, tuple[_Linear, ...]]] = {}
        for gv, scan in scans.items():
            found[gv] = {
                _signature(g): g
                for g in _groups(scan, param_names)
                if g[0].kind[0] == "matmul" or kernels is not None
            }
        accepted = set().union(*(set(f) for f in found.values()))
        for gv, scan in scans.items():
            used = set(scan.field.values())
            accepted = {sig for sig in accepted if sig in found[gv] or not used & _fields(sig)}
        # Functions that disagree (q+k in one, q+k+v in another) combine neither.
        claims = defaultdict(int)
        for sig in accepted:
            for i in _fields(sig):
                claims[i] += 1
        accepted = {sig for sig in accepted if all(claims[i] == 1 for i in _fields(sig))}
        if not accepted:
            return mod
        layout = _Layout(mod, scans, found, accepted, param_names, kernels)
        out = layout.builder_mod()
        out = out.with_attr("kiln.params", layout.names)
        return out.with_attr("kiln.combined", layout.combined)

    return _run


class _Layout:
    """The new packed parameters, and each function rewritten to take them."""

    def __init__(self, mod, scans, found, accepted, names, kernels):
        self.mod, self.kernels = mod, kernels
        sigs = sorted(accepted)
        old_types = list(_packed(mod[next(iter(scans))]).ty.fields)
        # old field -> new field, for fields kept as they are
        self.keep: dict[int, int] = {}
        # group signature -> new fields of its combined stored tensors
        self.new_fields: dict[tuple, list[int]] = {}
        self.new_types: list[relax.Type] = []
        self.names: list[str] = []
        self.combined: dict[str, list[str]] = {}
        starts = {sig[0][0]: sig for sig in sigs}
        parts = {i for sig in sigs for fields in sig for i in fields}
        any_group = {sig: next(found[gv][sig] for gv in found if sig in found[gv]) for sig in sigs}
        self.kernel_te: dict[tuple, object] = {}
        for i, ty in enumerate(old_types):
            if i in starts:
                sig = starts[i]
                group = any_group[sig]
                types = self._combined_types(group)
                self.new_fields[sig] = list(
                    range(len(self.new_types), len(self.new_types) + len(types))
                )
                for j, t in enumerate(types):
                    part_names = [names[fields[j]] for fields in sig]
                    name = combined_name(part_names)
                    self.names.append(name)
                    self.combined[name] = part_names
                    self.new_types.append(t)
            elif i not in parts:
                self.keep[i] = len(self.new_types)
                self.new_types.append(ty)
                self.names.append(names[i])
        self.found, self.scans = found, scans
        self.packed_ty = relax.TupleType(self.new_types)

    def _combined_types(self, group: tuple[_Linear, ...]) -> list[relax.Type]:
        rows = sum(linear.rows for linear in group)
        kind = group[0].kind
        if kind[0] == "matmul":
            cols, dtype = kind[2], kind[1]
            return [relax.TensorType([rows, cols], dtype)]
        storage, compute = self.kernels(kind[1], rows, kind[2])
        self.kernel_te[_signature(group)] = compute
        return [relax.TensorType(list(shape), dtype) for shape, dtype in storage]

    def builder_mod(self) -> tvm.IRModule:
        rewriter = _Rewriter(self.mod, self)
        for gv, scan in self.scans.items():
            rewriter.rewrite(gv, scan)
        out = rewriter.builder_.get()
        return relax.transform.DeadCodeElimination()(out)


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, layout: _Layout):
        super().__init__(mod)
        self.layout = layout

    def rewrite(self, gv: relax.GlobalVar, scan: _Scan) -> None:
        func = self.layout.mod[gv]
        self.scan = scan
        groups = {
            sig: g for sig, g in self.layout.found[gv].items() if sig in self.layout.new_fields
        }
        self.first = {g[0].var: (sig, g) for sig, g in groups.items()}
        self.later = {linear.var for g in groups.values() for linear in g[1:]}
        self.dropped = {v for g in groups.values() for linear in g for v in linear.drop}
        self.parts: dict[relax.Var, tuple[relax.Var, int, relax.Var, int]] = {}
        old = func.params[-1]
        self.packed = relax.Var(old.name, self.layout.packed_ty)
        body = self.visit_expr(func.body)
        new = relax.Function(
            [*func.params[:-1], self.packed], body, func.ret_ty, func.is_pure, func.attrs
        )
        self.builder_.update_func(gv, new)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        var, value = binding.var, binding.value
        if var in self.scan.field:
            i = self.scan.field[var]
            if i in self.layout.keep:
                self._bind(var, relax.TupleGetItem(self.packed, self.layout.keep[i]))
            return  # a part's weight: the combined one is taken where the group is
        if var in self.dropped or var in self.later:
            return
        if var in self.first:
            self._combine(*self.first[var])
            return
        if isinstance(value, relax.Call) and value.op.same_as(_CONCAT):
            whole = self._whole(value)
            if whole is not None:
                self.set_var_remap(var, whole)
                return
        super().visit_var_binding_(binding)

    def _bind(self, var: relax.Var, value: relax.Expr) -> relax.Var:
        new = self.builder_.emit(value, var.name)
        self.set_var_remap(var, new)
        return new

    def _combine(self, sig: tuple, group: tuple[_Linear, ...]) -> None:
        first = group[0]
        x = self.visit_expr(first.x)
        weights = [
            self.builder_.emit(relax.TupleGetItem(self.packed, f), "combined_weight")
            for f in self.layout.new_fields[sig]
        ]
        if first.kind[0] == "matmul":
            t = self.builder_.emit(relax.op.permute_dims(weights[0]), "combined_t")
            y = self.builder_.emit(relax.Call(_MATMUL, [x, t], first.call.attrs), "combined")
        else:
            y = self.builder_.emit_te(
                self.layout.kernel_te[sig], x, *weights,
                primfunc_name_hint="dequantize_matmul",
                primfunc_attrs={LINEAR_ATTR: first.kind[1]},
            )  # fmt: skip
        bounds, at = [], 0
        for linear in group[:-1]:
            at += linear.rows
            bounds.append(at)
        split = self.builder_.emit(relax.op.split(y, bounds, axis=-1), "split")
        for k, linear in enumerate(group):
            part = self._bind(linear.var, relax.TupleGetItem(split, k))
            self.parts[part] = (split, k, y, len(group))

    def _whole(self, concat: relax.Call) -> relax.Var | None:
        """The combined output, if `concat` joins all its parts in order along the last axis."""
        fields = concat.args[0]
        if isinstance(fields, relax.Var):
            fields = self.scan.bound.get(fields)
        if not isinstance(fields, relax.Tuple):
            return None
        parts = [self.parts.get(self.visit_expr(f)) for f in fields.fields]
        if not parts or any(p is None for p in parts):
            return None
        split, _, y, n = parts[0]
        if len(parts) != n or any(
            not p[0].same_as(split) or p[1] != k for k, p in enumerate(parts)
        ):
            return None
        axis = int(concat.attrs.axis)
        if axis not in (-1, y.ty.ndim - 1):
            return None
        return y
