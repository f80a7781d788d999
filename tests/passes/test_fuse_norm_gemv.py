"""FuseNormGEMV: a batch-1 residual add and RMSNorm, then a GEMV extern -> the extern's norm form.

On modules as FuseAddRMSNorm and DispatchGEMV leave them: what is fused (the residual stream read
after the GEMV, or not at all) and what stays (two rows, a norm read twice, a K past the limit,
the residual stream read before the GEMV, a GEMV without a norm form); and on the CPU, with
NumPy functions registered under the externs' names, the fused module gives the numbers of the
original one (whose add and norm are Kiln's compiled kernel).
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax
from tvm.runtime import vm as tvm_vm

from kiln.passes.fuse_add_rms_norm import FuseAddRMSNorm
from kiln.passes.fuse_norm_gemv import FuseNormGEMV

K, N, EPS = 64, 48, 1e-5
EXTERNS = {"kiln.test.q4": "kiln.test.q4_norm", "kiln.test.q4_swiglu": "kiln.test.q4_swiglu_norm"}


def _module(rows: int = 1, gemv: str = "kiln.test.q4", reads: str = "after") -> tvm.IRModule:
    """main(x, r (rows, 1, K), packed (w, qweight, scale)): s = x + r, y = rms_norm(s, w),
    out = gemv(y). `reads`: what else reads s and y: "after" (s, after the GEMV: the output
    is (s, out)), "none" (only out), "before" (s, before the GEMV), "norm" (y again)."""
    bb = relax.BlockBuilder()
    x, r = (relax.Var(n, relax.TensorType([rows, 1, K], "float16")) for n in "xr")
    rows_out = N // 2 if gemv.endswith("swiglu") else N
    packed = relax.Var(
        "packed",
        relax.TupleType(
            [
                relax.TensorType([K], "float16"),
                relax.TensorType([N, K // 8], "uint32"),
                relax.TensorType([N, K // 32], "float16"),
            ]
        ),
    )
    with bb.function("main", [x, r, packed], attrs={"num_input": 2}):
        with bb.dataflow():
            w, qweight, scale = (
                bb.emit(relax.TupleGetItem(packed, i), name_hint=name)
                for i, name in enumerate(("w", "qweight", "scale"))
            )
            s = bb.emit(relax.op.add(x, r))
            y = bb.emit(relax.op.nn.rms_norm(s, w, axes=[-1], epsilon=EPS))
            early = bb.emit(relax.op.multiply(s, s)) if reads == "before" else None
            ty = relax.TensorType([rows, 1, rows_out], "float16")
            out = bb.emit(relax.call_dps_packed(gemv, relax.Tuple([y, qweight, scale]), ty))
            results = {"after": [s, out], "none": [out], "before": [early, out], "norm": [y, out]}
            result = bb.emit_output(relax.Tuple(results[reads]))
        bb.emit_func_output(result)
    return FuseAddRMSNorm()(bb.get())


def _fuse(mod: tvm.IRModule, max_k: int = 4096) -> tvm.IRModule:
    return FuseNormGEMV(EXTERNS, max_k)(mod)


@pytest.mark.parametrize("gemv", ["kiln.test.q4", "kiln.test.q4_swiglu"])
@pytest.mark.parametrize("reads", ["after", "none"])
def test_the_add_and_norm_go_into_the_gemv(gemv, reads):
    after = _fuse(_module(gemv=gemv, reads=reads))
    main = after["main"].script()
    assert f'R.call_dps_packed("{EXTERNS[gemv]}", (x, r, w, qweight, scale, ' in main
    assert "add_rms_norm" not in after.script()  # the call and its kernel are gone
    assert f'"{gemv}"' not in main


@pytest.mark.parametrize(
    "rows,reads,max_k,gemv",
    [
        (2, "after", 4096, "kiln.test.q4"),  # two rows: a batch
        (1, "norm", 4096, "kiln.test.q4"),  # the norm read again
        (1, "after", 32, "kiln.test.q4"),  # K past the limit
        (1, "before", 4096, "kiln.test.q4"),  # s read before the GEMV writes it
        (1, "after", 4096, "kiln.test.other"),  # a GEMV with no norm form
    ],
)
def test_what_does_not_match_stays(rows, reads, max_k, gemv):
    before = _module(rows, gemv, reads)
    after = _fuse(before, max_k)
    tvm_ffi.structural_equal(after, before) or pytest.fail(after.script())


def _dequantize(qweight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    shifts = np.arange(8, dtype=np.uint32) * 4
    nibbles = ((qweight[..., None] >> shifts) & 0xF).reshape(len(qweight), -1)
    return (nibbles - 8.0) * np.repeat(scale.astype(np.float64), 32, axis=1)


def _register_numpy_externs() -> None:
    def q4(x, qweight, scale, out):
        w = _dequantize(qweight.numpy(), scale.numpy())
        out.copyfrom((x.numpy().astype(np.float64) @ w.T).astype("float16"))

    def q4_norm(x, r, w, qweight, scale, epsilon, s, out):
        total = (x.numpy().astype(np.float32) + r.numpy().astype(np.float32)).astype("float16")
        t = total.astype(np.float64)
        inv = 1 / np.sqrt((t * t).mean(axis=-1, keepdims=True) + epsilon)
        y = (inv * t * w.numpy().astype(np.float64)).astype("float16")
        s.copyfrom(total)
        q4(tvm.runtime.tensor(y), qweight, scale, out)

    for name, f in (("q4", q4), ("q4_norm", q4_norm)):
        tvm_ffi.register_global_func(f"kiln.test.{name}", f, override=True)


def test_the_fused_module_gives_the_same_numbers_on_the_cpu():
    _register_numpy_externs()
    rng = np.random.default_rng(0)
    x, r = (rng.standard_normal((1, 1, K)).astype("float16") for _ in range(2))
    params = [
        rng.uniform(0.5, 1.5, K).astype("float16"),
        rng.integers(0, 2**32, (N, K // 8), dtype=np.uint32),
        rng.uniform(0.01, 0.1, (N, K // 32)).astype("float16"),
    ]
    before = _module()
    after = _fuse(before)
    assert "kiln.test.q4_norm" in after.script()

    def run(mod):
        vm = tvm_vm.VirtualMachine(tvm.compile(mod, tvm.target.Target("llvm")), tvm.cpu())
        args = [tvm.runtime.tensor(a) for a in (x, r)]
        out = vm["main"](*args, [tvm.runtime.tensor(p) for p in params])
        return [o.numpy().astype(np.float64) for o in out]

    (s_want, out_want), (s_got, out_got) = run(before), run(after)
    np.testing.assert_array_equal(s_got, s_want)
    np.testing.assert_allclose(out_got, out_want, rtol=0, atol=2e-3 * np.abs(out_want).max())
