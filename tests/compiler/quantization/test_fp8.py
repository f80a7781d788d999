"""fp8 e4m3 per-channel quantization (fp8e4m3, fp8e4m3_bf16) against ml_dtypes' float8_e4m3fn,
an implementation independent of Kiln's: codes, scales and dequantized values bit for bit, and
the compiled kernel's decoding of every one of the 254 finite codes."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax.frontend import nn

from kiln.compiler.quantization import QUANTIZATIONS, base
from kiln.compiler.quantization.layers import QuantizedEmbedding
from kiln.runtime.errors import KilnError

E4M3 = ml_dtypes.float8_e4m3fn
FINITE = [c for c in range(256) if c & 0x7F != 0x7F]  # 0x7f, 0xff are NaN


def reference(w: np.ndarray, dtype: type) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scale = float32 max|w| of the row / 448; code = ml_dtypes' e4m3fn rounding of the
    float32 w / scale (0 for a zero row); dequantized = float32 e4m3 * scale, then `dtype`."""
    absmax = np.abs(w).max(axis=1)
    scale = (absmax / np.float32(448)).astype(np.float32)
    safe = np.where(scale == 0, np.float32(1), scale)[:, None]
    q = np.where(scale[:, None] == 0, np.float32(0), w / safe).astype(np.float32)
    codes = q.astype(E4M3)
    deq = (codes.astype(np.float32) * scale[:, None]).astype(dtype)
    return codes.view(np.uint8), scale, deq


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(f"u{a.dtype.itemsize}")


def weights(rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * np.float32(0.05)
    w[0] = 0  # a zero row: scale 0
    w[1, :5] = [448.0, 1.125, -1.0625, 3 * 2.0**-10, 2.0**-10]  # scale 1: ties, subnormals
    w[2] *= 1e4  # large values
    w[3, 1:] *= 1e-4  # tiny values beside the row maximum: subnormal codes, underflow to 0
    return w


@pytest.mark.parametrize("preset,dtype", [("fp8e4m3", np.float16), ("fp8e4m3_bf16", "bf16")])
def test_round_trip_matches_ml_dtypes(preset, dtype):
    dtype = ml_dtypes.bfloat16 if dtype == "bf16" else dtype
    scheme = QUANTIZATIONS[preset]
    w = weights(7, 90, 0)
    stored = scheme.quantize("w", w)
    codes, scale, deq = reference(w, dtype)
    assert scheme.storage(7, 90) == {"qweight": ((7, 90), "uint8"), "scale": ((7,), "float32")}
    assert stored["qweight"].dtype == np.uint8 and stored["scale"].dtype == np.float32
    np.testing.assert_array_equal(stored["qweight"], codes)
    np.testing.assert_array_equal(bits(stored["scale"]), bits(scale))
    assert stored["scale"][1] == 1.0
    # 1.125 and 1.0625 are ties (mantissa steps of 1/8): to even; 3 * 2**-10 and 2**-10 are
    # ties between subnormals (steps of 2**-9): to 2 * 2**-9 and to 0.
    assert list(stored["qweight"][1, :5]) == [0x7E, 0x39, 0xB8, 0x02, 0x00]
    ours = scheme.dequantize(stored, 90)
    assert ours.dtype == dtype and ours.shape == w.shape
    np.testing.assert_array_equal(bits(ours), bits(deq))
    # e4m3 keeps 3 mantissa bits: a normal value is off by at most 1/16 of itself, and a
    # subnormal one by at most half a step of 2**-9 (relative to the row's scale).
    q = w / np.where(scale == 0, 1, scale)[:, None]
    err = np.abs(codes.view(E4M3).astype(np.float32) - q)
    assert (err <= np.maximum(np.abs(q) / 16, 2.0**-10) * (1 + 1e-6)).all()


def test_every_code_decodes_like_ml_dtypes():
    from kiln.compiler.quantization.fp8 import decode_e4m3, encode_e4m3

    values = np.array(FINITE, np.uint8).view(E4M3).astype(np.float32)
    np.testing.assert_array_equal(bits(decode_e4m3(np.array(FINITE, np.uint8))), bits(values))
    np.testing.assert_array_equal(encode_e4m3(values), np.array(FINITE, np.uint8))
    # Halfway between neighbours and one float32 step either side, both signs.
    pos = np.sort(values[values > 0])
    mid = ((pos[:-1] + pos[1:]) / 2).astype(np.float32)
    x = np.concatenate([mid, np.nextafter(mid, 0), np.nextafter(mid, 1e3)])
    x = np.concatenate([x, -x, [np.float32(460.0), np.float32(2.0**-12)]])
    np.testing.assert_array_equal(encode_e4m3(x), x.astype(E4M3).view(np.uint8))


class Table(nn.Module):
    def __init__(self, scheme, rows: int, cols: int):
        self.table = QuantizedEmbedding(rows, cols, scheme)

    def rows(self, ids: nn.Tensor) -> nn.Tensor:
        return self.table.lookup(ids)


def test_kernel_decodes_every_code_bit_for_bit():
    """The compiled row gather's e4m3 decoding (integer ops in TIR) equals ml_dtypes for every
    finite code, at several scales, including fp16 results that are subnormal."""
    scheme = QUANTIZATIONS["fp8e4m3"]
    rows, cols = 4, len(FINITE)
    mod, _ = Table(scheme, rows, cols).export_tvm(
        spec={"rows": {"ids": nn.spec.Tensor(["n"], "int32")}}
    )
    vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
    codes = np.tile(np.array(FINITE, np.uint8), (rows, 1))
    scale = np.array([1.0, 1e-3, 2.0**-20, 0.0], np.float32)
    ids = np.arange(rows, dtype=np.int32)
    got = vm["rows"](
        tvm.runtime.tensor(ids), tvm.runtime.tensor(codes), tvm.runtime.tensor(scale)
    ).numpy()
    want = (codes.view(E4M3).astype(np.float32) * scale[:, None]).astype(np.float16)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(bits(got), bits(want))


def test_deterministic_blockwise_and_bad_values(monkeypatch):
    scheme = QUANTIZATIONS["fp8e4m3"]
    w = weights(6, 40, 1)
    a, b = scheme.quantize("w", w), scheme.quantize("w", w.copy())
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    monkeypatch.setattr(base, "BLOCK_VALUES", 80)  # 2 rows per block
    c = scheme.quantize("w", w)
    assert all(a[k].tobytes() == c[k].tobytes() for k in a)
    w[4, 3] = np.inf
    with pytest.raises(KilnError, match=r"weight w holds values that are not finite"):
        scheme.quantize("w", w)
