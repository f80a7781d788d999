"""The quantized layers' compiled CPU kernels against NumPy: the row gather decodes the stored
weights bit for bit like `scheme.dequantize`; the matmul equals x @ dequantized.T."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax.frontend import nn

from kiln.compiler.quantization import QUANTIZATIONS
from kiln.compiler.quantization.layers import QuantizedEmbedding, QuantizedLinear

ROWS, COLS = 40, 100  # 100: not a whole number of int4 groups


class Probe(nn.Module):
    def __init__(self, scheme):
        self.table = QuantizedEmbedding(ROWS, COLS, scheme)
        self.linear = QuantizedLinear(COLS, ROWS, scheme)

    def rows(self, ids: nn.Tensor) -> nn.Tensor:
        return self.table.lookup(ids)

    def project(self, x: nn.Tensor) -> nn.Tensor:
        return self.table.project(x)

    def linear_fwd(self, x: nn.Tensor) -> nn.Tensor:
        return self.linear(x)


@pytest.mark.parametrize("preset", ["q4f16", "q4f32", "q8f16", "fp8e4m3"])
def test_kernels_match_numpy(preset):
    scheme = QUANTIZATIONS[preset]
    dtype = scheme.model_dtype
    x_spec = nn.spec.Tensor([2, "n", COLS], dtype)
    mod, params = Probe(scheme).export_tvm(
        spec={
            "rows": {"ids": nn.spec.Tensor(["n"], "int32")},
            "project": {"x": x_spec},
            "linear_fwd": {"x": x_spec},
        }
    )
    assert [name for name, _ in params] == [
        "table.qweight", "table.scale", "linear.qweight", "linear.scale"
    ]  # fmt: skip
    vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())

    rng = np.random.default_rng(0)
    w = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    stored = scheme.quantize("w", w)
    deq = scheme.dequantize(stored, COLS)  # (ROWS, COLS) in the model dtype
    args = [tvm.runtime.tensor(stored[k]) for k in ("qweight", "scale")] * 2

    ids = np.array([3, 0, ROWS - 1, 3, ROWS + 5, -2], np.int32)  # the last two are clamped
    got = vm["rows"](tvm.runtime.tensor(ids), *args).numpy()
    want = deq[np.clip(ids, 0, ROWS - 1)]
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))

    x = rng.standard_normal((2, 7, COLS)).astype(dtype)
    want = x.astype(np.float64) @ deq.astype(np.float64).T  # (2, 7, ROWS)
    tol = 1e-5 if dtype == "float32" else 2e-3  # fp16 output rounding
    for fn in ("project", "linear_fwd"):
        got = vm[fn](tvm.runtime.tensor(x), *args).numpy()
        assert got.dtype == dtype and got.shape == (2, 7, ROWS)
        assert np.abs(got - want).max() <= tol * np.abs(want).max()
