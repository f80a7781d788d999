"""int8 per-channel quantization (q8f16) against a reference written here, one scalar at a
time: int8 values, scales and dequantized values bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.compiler.quantization import QUANTIZATIONS, base
from kiln.runtime.errors import KilnError


def reference(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scale = float32 max|w| of the row / 127 rounded to fp16; q = round-half-even(w / scale)
    in [-127, 127]; dequantized = (q * scale) in fp16."""
    rows, cols = w.shape
    q = np.zeros((rows, cols), np.int8)
    scale = np.zeros(rows, np.float16)
    deq = np.zeros((rows, cols), np.float16)
    for r in range(rows):
        s = np.float16(max(abs(np.float32(v)) for v in w[r]) / np.float32(127))
        scale[r] = s
        for k in range(cols):
            if s != 0:
                q[r, k] = int(min(max(np.rint(np.float32(w[r, k]) / np.float32(s)), -127), 127))
            deq[r, k] = np.float16(int(q[r, k])) * s
    return q, scale, deq


def test_round_trip_matches_reference():
    scheme = QUANTIZATIONS["q8f16"]
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 70)).astype(np.float32) * np.float32(0.05)
    w[0] = 0  # a zero row: scale 0
    w[1, :3] = [15.875, 0.3125, -0.1875]  # scale 0.125: 2.5 and -1.5 steps, halfway cases
    w[3] *= 100
    stored = scheme.quantize("w", w)
    q, scale, deq = reference(w)
    assert scheme.storage(5, 70) == {"qweight": ((5, 70), "int8"), "scale": ((5,), "float16")}
    np.testing.assert_array_equal(stored["qweight"], q)
    np.testing.assert_array_equal(stored["scale"].view(np.uint16), scale.view(np.uint16))
    ours = scheme.dequantize(stored, 70)
    assert list(ours[1, :3]) == [15.875, 0.25, -0.25]  # halfway rounds to even
    assert ours.dtype == np.float16
    np.testing.assert_array_equal(ours.view(np.uint16), deq.view(np.uint16))
    step = scale.astype(np.float32)[:, None]
    assert (np.abs(ours.astype(np.float32) - w) <= step / 2 * (1 + 1e-2) + 1e-6).all()


def test_deterministic_blockwise_and_overflow(monkeypatch):
    scheme = QUANTIZATIONS["q8f16"]
    w = np.random.default_rng(1).standard_normal((5, 40)).astype(np.float32)
    a, b = scheme.quantize("w", w), scheme.quantize("w", w.copy())
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    monkeypatch.setattr(base, "BLOCK_VALUES", 80)  # 2 rows per block
    c = scheme.quantize("w", w)
    assert all(a[k].tobytes() == c[k].tobytes() for k in a)
    with pytest.raises(KilnError, match="too large"):
        scheme.quantize("w", np.full((1, 8), 1e8, np.float32))
