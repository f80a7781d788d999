"""FuseDecodeLayer: a batch-1 layer's q4 -> add_rms_norm -> q4_swiglu -> q4 -> add_rms_norm -> q4
chain of externs -> one call of the layer extern.

Which chains it takes (one row, no other reader of an intermediate, nothing reading the residual
before the last GEMV) and which it leaves; and on the CPU, with NumPy functions registered under
the externs' names (the layer's composed from the others by its documented contract), the fused
module's outputs bit for bit the chain's: the operands reach the extern in its order.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.runtime import vm as tvm_vm

from kiln.passes.fuse_decode_layer import FuseDecodeLayer

Q4, SWIGLU, NORM, LAYER = (f"kiln.test.{n}" for n in ("q4", "q4_swiglu", "add_rms_norm", "layer"))
A, H, INTER, Z = 64, 96, 160, 80  # the attention's width, hidden, the MLP's, the last GEMV's rows
FUSE = FuseDecodeLayer(LAYER, Q4, SWIGLU, NORM)


def _q4(x, qweight, scale, out):
    shifts = np.arange(8, dtype=np.uint32) * 4
    q = qweight.numpy()
    nibbles = ((q[..., None] >> shifts) & 0xF).reshape(len(q), -1).astype(np.float32)
    w = (nibbles - 8) * np.repeat(scale.numpy().astype(np.float32), 32, axis=1)
    out.copyfrom((x.numpy().astype(np.float32) @ w.T).astype(np.float16))


def _swiglu(x, qweight, scale, out):
    both = tvm.runtime.empty((*x.shape[:-1], qweight.shape[0]), "float16", tvm.cpu())
    _q4(x, qweight, scale, both)
    gate, up = np.split(both.numpy().astype(np.float32), 2, axis=-1)
    out.copyfrom((gate / (1 + np.exp(-gate)) * up).astype(np.float16))


def _norm(x, r, w, epsilon, s, y):
    total = x.numpy() + r.numpy()
    f = total.astype(np.float32)
    inv = 1 / np.sqrt((f * f).mean(-1, keepdims=True) + np.float32(epsilon))
    s.copyfrom(total)
    y.copyfrom((inv * f * w.numpy().astype(np.float32)).astype(np.float16))


def _layer(a, r, wo, so, w1, wgu, sgu, wd, sd, w2, wz, sz, eps1, eps2, s, z, scratch):
    """The layer extern's contract, from the others: scratch holds o, h and d."""
    cpu = tvm.cpu()

    def empty(n):
        return tvm.runtime.empty((*a.shape[:-1], n), "float16", cpu)

    o, s1, y1, h, d, y2 = (empty(n) for n in (H, H, H, INTER, H, H))
    _q4(a, wo, so, o)
    _norm(r, o, w1, eps1, s1, y1)
    _swiglu(y1, wgu, sgu, h)
    _q4(h, wd, sd, d)
    _norm(s1, d, w2, eps2, s, y2)
    _q4(y2, wz, sz, z)
    scratch.copyfrom(np.concatenate([v.numpy().reshape(-1) for v in (o, h, d)]))


for _name, _fn in ((Q4, _q4), (SWIGLU, _swiglu), (NORM, _norm), (LAYER, _layer)):
    tvm_ffi.register_global_func(_name, _fn, override=True)


def _module(rows: int = 1, returns=("z", "s"), read_s_early: bool = False) -> tvm.IRModule:
    """The chain as DispatchGEMV and DispatchAddRMSNorm leave it; `returns` names what the
    function gives back (an intermediate there is a second reader of it)."""
    bb = relax.BlockBuilder()

    def ten(*shape, dtype="float16"):
        return relax.TensorType(list(shape), dtype)

    def row(n):
        return ten(rows, 1, n)

    params = {
        "a": row(A), "r": row(H), "wo": ten(H, A // 8, dtype="uint32"), "so": ten(H, A // 32),
        "w1": ten(H), "wgu": ten(2 * INTER, H // 8, dtype="uint32"), "sgu": ten(2 * INTER, H // 32),
        "wd": ten(H, INTER // 8, dtype="uint32"), "sd": ten(H, INTER // 32), "w2": ten(H),
        "wz": ten(Z, H // 8, dtype="uint32"), "sz": ten(Z, H // 32),
    }  # fmt: skip
    p = {name: relax.Var(name, ty) for name, ty in params.items()}

    def call(name, args, out):
        return relax.call_dps_packed(relax.ExternFunc(name), relax.Tuple(args), out)

    def eps(value):
        return relax.prim_value(tirx.FloatImm("float32", value))

    with bb.function("main", list(p.values())):
        with bb.dataflow():
            v = {}
            v["o"] = bb.emit(call(Q4, [p["a"], p["wo"], p["so"]], row(H)))
            n1 = bb.emit(call(NORM, [p["r"], v["o"], p["w1"], eps(1e-5)], [row(H), row(H)]))
            v["s1"], v["y1"] = (bb.emit(relax.TupleGetItem(n1, i)) for i in range(2))
            v["h"] = bb.emit(call(SWIGLU, [v["y1"], p["wgu"], p["sgu"]], row(INTER)))
            v["d"] = bb.emit(call(Q4, [v["h"], p["wd"], p["sd"]], row(H)))
            # the second norm's operands the other way round: the add is the same either way
            n2 = bb.emit(call(NORM, [v["d"], v["s1"], p["w2"], eps(1e-6)], [row(H), row(H)]))
            v["s"], v["y2"] = (bb.emit(relax.TupleGetItem(n2, i)) for i in range(2))
            if read_s_early:
                v["s"] = bb.emit(relax.op.add(v["s"], v["s"]))
            v["z"] = bb.emit(call(Q4, [v["y2"], p["wz"], p["sz"]], row(Z)))
            out = bb.emit_output(relax.Tuple([v[name] for name in returns]))
        bb.emit_func_output(out)
    return bb.get()


def _externs(mod: tvm.IRModule) -> list[str]:
    calls = [b.value for block in mod["main"].body.blocks for b in block.bindings]
    return [
        c.args[0].global_symbol
        for c in calls
        if isinstance(c, relax.Call) and c.op.name == "relax.call_dps_packed"
    ]


def _inputs(rows: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(3)

    def q4(n, k):
        qweight = rng.integers(0, 2**32, (n, k // 8), dtype=np.uint32)
        return [qweight, rng.uniform(0.001, 0.02, (n, k // 32)).astype(np.float16)]

    def f16(*shape, mean=0.0):
        return rng.normal(mean, 1.0, shape).astype(np.float16)

    return [f16(rows, 1, A), f16(rows, 1, H), *q4(H, A), f16(H, mean=1.0), *q4(2 * INTER, H),
            *q4(H, INTER), f16(H, mean=1.0), *q4(Z, H)]  # fmt: skip


def _run(mod: tvm.IRModule, args: list[np.ndarray]) -> list[np.ndarray]:
    vm = tvm_vm.VirtualMachine(tvm.compile(mod, tvm.target.Target("llvm")), tvm.cpu())
    return [o.numpy() for o in vm["main"](*[tvm.runtime.tensor(a) for a in args])]


@pytest.mark.parametrize("returns", [("z", "s"), ("z",)])
def test_the_chain_becomes_one_call_with_the_chains_numbers(returns):
    """With the residual read after (a layer) and without (the last layer, before the LM head)."""
    before = _module(returns=returns)
    after = FUSE(before)
    assert _externs(before) == [Q4, NORM, SWIGLU, Q4, NORM, Q4]
    assert _externs(after) == [LAYER]
    call = next(
        b.value for b in after["main"].body.blocks[0].bindings if isinstance(b.value, relax.Call)
    )
    assert [int(d) for d in call.ty.fields[2].shape.values] == [2 * H + INTER]  # scratch: o, h, d
    args = _inputs()
    want, got = _run(before, args), _run(after, args)
    for e, g in zip(want, got, strict=True):
        assert np.isfinite(g).all()
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize(
    "changes",
    [
        dict(rows=2),  # a batched decode: the kernel takes one row
        dict(returns=("z", "s", "y1")),  # an intermediate read elsewhere
        dict(returns=("z", "h")),
        dict(returns=("z", "o")),
        dict(read_s_early=True),  # the residual read before z, where the call would define it
    ],
)
def test_chains_it_cannot_take_are_left_alone(changes):
    before = _module(**changes)
    assert FUSE(before).same_as(before)
