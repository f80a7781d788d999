"""DispatchMoE: a dense mixture of experts after DispatchGEMV -> the two routed-experts externs.

The module is what DispatchGEMV leaves of kiln.models.mixtral's MoE at batch 1: per expert a
gate/up SwiGLU GEMV and a down GEMV, each output times that expert's split of the router weights,
added up. On the CPU, with NumPy functions registered under the externs' names (the mixture
ones honouring their contract: an expert no row is routed to is neither written nor read), the
dispatched module gives the numbers of the original; what is not that pattern stays. With the
router weights computed in the module by kiln.models.mixtral's own `route` (float16), the
router becomes the route extern too, and gives the same numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm_ffi
from moe_reference import route_reference
from tvm import relax, te
from tvm.relax.frontend import nn
from tvm.runtime import vm as tvm_vm

from kiln.models.mixtral import route
from kiln.passes.dispatch_matmul import nt_matmul_kernel
from kiln.passes.dispatch_moe import DispatchMoE, MoEExterns

K, INTER, EXPERTS = 32, 24, 4
EXTERNS = MoEExterns(
    "kiln.test.moe.swiglu", "kiln.test.moe.gemv", "kiln.test.moe.moe_swiglu",
    "kiln.test.moe.moe", max_experts=8, max_rows=8, route="kiln.test.moe.route",
)  # fmt: skip


def _router(bb, x, gate, top_k, kernel):
    """kiln.models.mixtral's router weights for x, the logits from `kernel`(x, gate)."""
    logits_ty = relax.TensorType([*x.ty.shape.values[:-1], EXPERTS], x.ty.dtype)
    gv = bb.add_func(kernel(x.ty, gate.ty, logits_ty), "NT_matmul")
    logits = bb.emit(relax.call_tir(gv, [x, gate], logits_ty))
    return route(nn.Tensor(_expr=logits), top_k, x.ty.dtype)._expr


def _other_kernel(x, w, out):
    """Not the router's matmul: 2 x @ w^T."""
    xt = te.placeholder(list(x.shape.values), x.dtype, "x")
    wt = te.placeholder(list(w.shape.values), w.dtype, "w")
    k = te.reduce_axis((0, w.shape.values[1]), "k")
    two = tvm.tirx.const(2, out.dtype)
    result = te.compute(
        list(out.shape.values),
        lambda *i: te.sum(xt[(*i[:-1], k)] * wt[i[-1], k] * two, axis=k),
        name="NT_matmul",
    )
    func = te.create_prim_func([xt, wt, result], index_dtype_override="int64")
    return func.without_attr("global_symbol")


def _moe_module(rows, variant: str = "", top_k: int = 2, dtype="float32") -> tvm.IRModule:
    """main(x (rows, K), w (rows, E), packed (gate_up_e (2I, K), down_e (K, I) per expert)); with
    a router variant, w is the router's gate (E, K) and the weights come from kiln's `route`."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([rows, K], dtype))
    routed = variant.startswith("router")
    w_shape = [EXPERTS, K] if routed else [rows, EXPERTS]
    w = relax.Var("w", relax.TensorType(w_shape, dtype))
    weights = [relax.TensorType([2 * INTER, K], dtype), relax.TensorType([K, INTER], dtype)]
    packed = relax.Var("packed", relax.TupleType(weights * EXPERTS))
    with bb.function("main", [x, w, packed], attrs={"num_input": 2}):
        with bb.dataflow():
            if routed:
                kernel = _other_kernel if variant == "router, other logits" else nt_matmul_kernel
                w = _router(bb, x, w, top_k, kernel)
            parts = bb.emit(relax.op.split(w, EXPERTS, axis=-1))
            out = None
            experts = EXPERTS - 1 if variant == "an expert missing" else EXPERTS
            for e in range(experts):
                gu, down = (bb.emit(relax.TupleGetItem(packed, 2 * e + i)) for i in range(2))
                h = bb.emit(
                    relax.call_dps_packed(
                        relax.ExternFunc(EXTERNS.swiglu), relax.Tuple([x, gu]),
                        relax.TensorType([rows, INTER], dtype),
                    )
                )  # fmt: skip
                y = bb.emit(
                    relax.call_dps_packed(
                        relax.ExternFunc(EXTERNS.down), relax.Tuple([h, down]),
                        relax.TensorType([rows, K], dtype),
                    )
                )  # fmt: skip
                part = bb.emit(relax.TupleGetItem(parts, e))
                # the model's order (y * w), and the other one for expert 1
                y = bb.emit(relax.op.multiply(part, y) if e == 1 else relax.op.multiply(y, part))
                out = y if out is None else bb.emit(relax.op.add(out, y))
                if variant == "a partial sum used elsewhere" and e == 1:
                    extra = out
            result = (out, extra) if variant == "a partial sum used elsewhere" else (out,)
            gv = bb.emit_output(relax.Tuple(list(result)))
        bb.emit_func_output(gv)
    return relax.transform.DeadCodeElimination()(bb.get())


def _register_numpy_externs() -> None:
    def silu(a):
        return a / (1 + np.exp(-a))

    def swiglu(x, w, out):
        gu = x.numpy().astype(np.float64) @ w.numpy().T
        out.copyfrom((silu(gu[..., :INTER]) * gu[..., INTER:]).astype(str(out.dtype)))

    def gemv(h, w, out):
        out.copyfrom((h.numpy().astype(np.float64) @ w.numpy().T).astype(str(out.dtype)))

    def moe_swiglu(x, gate, *args):
        *weights, out = args
        h = np.full(out.shape, np.nan, str(out.dtype))  # unrouted experts: left unwritten
        for e, routed in enumerate((gate.numpy() != 0).any(axis=0)):
            if routed:
                gu = x.numpy().astype(np.float64) @ weights[e].numpy().T
                h[e] = silu(gu[..., :INTER]) * gu[..., INTER:]
        out.copyfrom(h)

    def moe(h, gate, *args):
        *weights, out = args
        g = gate.numpy().astype(np.float64)
        total = np.zeros(out.shape)
        for e, routed in enumerate((g != 0).any(axis=0)):
            if routed:  # never reads an unrouted expert's h
                total += g[:, e : e + 1] * (h.numpy()[e].astype(np.float64) @ weights[e].numpy().T)
        out.copyfrom(total.astype(str(out.dtype)))

    def route(x, gate, top_k, out):  # the route extern's contract (kiln.gemv.moe_route)
        out.copyfrom(route_reference(x.numpy(), gate.numpy(), top_k).astype(str(out.dtype)))

    externs = {"swiglu": swiglu, "gemv": gemv, "moe_swiglu": moe_swiglu, "moe": moe, "route": route}
    for name, f in externs.items():
        tvm_ffi.register_global_func(f"kiln.test.moe.{name}", f, override=True)


def _expert_weights(rng, dtype: str) -> list[np.ndarray]:
    """gate_up_e (2I, K) and down_e (K, I) for each expert."""
    params = []
    for _ in range(EXPERTS):
        params += [rng.normal(0, K**-0.5, (2 * INTER, K)), rng.normal(0, INTER**-0.5, (K, INTER))]
    return [p.astype(dtype) for p in params]


def _run(mod, x, w, params):
    vm = tvm_vm.VirtualMachine(tvm.compile(mod, tvm.target.Target("llvm")), tvm.cpu())
    out = vm["main"](
        tvm.runtime.tensor(x), tvm.runtime.tensor(w), [tvm.runtime.tensor(p) for p in params]
    )
    return [o.numpy() for o in out]


@pytest.mark.parametrize("rows", [1, 3])
def test_routed_experts_give_the_dense_numbers_on_the_cpu(rows):
    _register_numpy_externs()
    rng = np.random.default_rng(rows)
    params = _expert_weights(rng, "float32")
    x = rng.normal(0, 1, (rows, K)).astype("float32")
    w = np.zeros((rows, EXPERTS), "float32")  # top 2 of 4, renormalized; expert 3 never routed
    for m in range(rows):
        w[m, rng.choice(3, 2, replace=False)] = rng.dirichlet(np.ones(2))
    before = _moe_module(rows)
    after = DispatchMoE(EXTERNS)(before)
    script = after.script()
    assert script.count(EXTERNS.moe_swiglu) == 1 and script.count(f'{EXTERNS.moe}"') == 1
    assert "kiln.test.moe.swiglu" not in script and "kiln.test.moe.gemv" not in script
    assert "R.split" not in script
    (want,), (got,) = _run(before, x, w, params), _run(after, x, w, params)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "variant",
    ["an expert missing", "a partial sum used elsewhere", "symbolic rows", "too many rows"],
)
def test_what_is_not_a_routed_mixture_stays(variant):
    rows = {"symbolic rows": tvm.tirx.Var("n", "int64"), "too many rows": 9}.get(variant, 1)
    before = _moe_module(rows, variant)
    after = DispatchMoE(EXTERNS)(before)
    assert after.same_as(before)


@pytest.mark.parametrize("top_k", [1, 2])
def test_the_router_becomes_one_call_with_the_same_numbers(top_k):
    _register_numpy_externs()
    rng = np.random.default_rng(top_k)
    params = _expert_weights(rng, "float16")
    x = rng.normal(0, 1, (1, K)).astype("float16")
    gate = rng.normal(0, 1, (EXPERTS, K)).astype("float16")
    before = _moe_module(1, "router", top_k, "float16")
    after = DispatchMoE(EXTERNS)(before)
    script = after.script()
    assert script.count(f'"{EXTERNS.route}"') == 1 and script.count(EXTERNS.moe_swiglu) == 1
    assert "R.nn.softmax" not in script and "R.where" not in script and "NT_matmul" not in script
    (want,), (got,) = _run(before, x, gate, params), _run(after, x, gate, params)
    assert np.isfinite(got).all() and np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)


def test_a_router_on_other_logits_stays():
    before = _moe_module(1, "router, other logits", 2, "float16")
    script = DispatchMoE(EXTERNS)(before).script()
    assert EXTERNS.route not in script and "R.nn.softmax" in script
    assert script.count(EXTERNS.moe_swiglu) == 1  # the mixture's experts still dispatched
