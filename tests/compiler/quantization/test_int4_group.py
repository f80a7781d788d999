"""int4 group quantization (q4f16, q4f32) against a reference written here from the format's
description, one scalar at a time: packed words, scales and dequantized values bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.compiler.quantization import QUANTIZATIONS, base
from kiln.runtime.errors import KilnError

GROUP = 32


def reference(w: np.ndarray, scale_dtype: type) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(qweight, scale, dequantized) for a float32 (rows, cols) weight, element by element:
    scale = float32 max|w| / 7 rounded to the scale dtype; q = round-half-even(w / scale) in
    [-7, 7]; feature k of a row is bits 4(k % 8)..4(k % 8)+3 of word k // 8, holding q + 8;
    padding up to a whole group holds q = 0; dequantized = (q * scale) in the scale dtype."""
    rows, cols = w.shape
    groups = (cols + GROUP - 1) // GROUP
    qweight = np.zeros((rows, groups * GROUP // 8), np.uint32)
    scale = np.zeros((rows, groups), scale_dtype)
    deq = np.zeros((rows, cols), scale_dtype)
    for r in range(rows):
        for g in range(groups):
            chunk = [np.float32(v) for v in w[r, g * GROUP : (g + 1) * GROUP]]
            s = scale_dtype(max(abs(v) for v in chunk) / np.float32(7))
            scale[r, g] = s
            for j in range(GROUP):
                k = g * GROUP + j
                q = 0
                if k < cols and s != 0:
                    q = int(min(max(np.rint(chunk[j] / np.float32(s)), -7), 7))
                qweight[r, k // 8] |= np.uint32((q + 8) << (4 * (k % 8)))
                if k < cols:
                    deq[r, k] = scale_dtype(q) * s
    return qweight, scale, deq


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(f"u{a.dtype.itemsize}")


def weights(rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * np.float32(0.05)
    w[0, :GROUP] = 0  # an all-zero group: scale 0, q 0
    w[1, :4] = [0.875, -0.875, 0.3125, 0.4375]  # scale 0.125: 2.5 and 3.5 steps, halfway cases
    w[2] *= 1000  # large values
    return w


@pytest.mark.parametrize("preset,dtype", [("q4f16", np.float16), ("q4f32", np.float32)])
@pytest.mark.parametrize("cols", [64, 100])  # 100: the last group is padded
def test_round_trip_matches_reference(preset, dtype, cols):
    scheme = QUANTIZATIONS[preset]
    w = weights(6, cols, cols)
    stored = scheme.quantize("w", w)
    qweight, scale, deq = reference(w, dtype)
    assert stored["qweight"].dtype == np.uint32 and stored["scale"].dtype == dtype
    np.testing.assert_array_equal(stored["qweight"], qweight)
    np.testing.assert_array_equal(bits(stored["scale"]), bits(scale))
    ours = scheme.dequantize(stored, cols)
    assert list(ours[1, :4]) == [0.875, -0.875, 0.25, 0.5]  # halfway rounds to even
    assert ours.dtype == dtype and ours.shape == w.shape
    np.testing.assert_array_equal(bits(ours), bits(deq))
    # The rounding error is at most half a step of each group's scale.
    step = np.repeat(scale.astype(np.float32), GROUP, axis=1)[:, :cols]
    assert (np.abs(ours.astype(np.float32) - w) <= step / 2 * (1 + 1e-2) + 1e-6).all()


def test_storage_shapes_and_nibble_order():
    scheme = QUANTIZATIONS["q4f32"]
    assert scheme.storage(5, 100) == {"qweight": ((5, 16), "uint32"), "scale": ((5, 4), "float32")}
    # q = -7..7 then 0 on features 0..15 of one group with scale 1.
    w = np.zeros((1, 32), np.float32)
    w[0, :16] = [*range(-7, 8), 0]
    w[0, 16] = 7.0
    stored = scheme.quantize("w", w)
    assert stored["scale"][0, 0] == 1.0
    assert [hex(x) for x in stored["qweight"][0, :3]] == ["0x87654321", "0x8fedcba9", "0x8888888f"]


def test_deterministic_and_blockwise(monkeypatch):
    """Same input, same bytes; and quantizing in blocks of rows (which bounds memory on large
    tensors) gives what one block gives."""
    scheme = QUANTIZATIONS["q4f16"]
    w = weights(8, 96, 3)
    a, b = scheme.quantize("w", w), scheme.quantize("w", w.copy())
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    monkeypatch.setattr(base, "BLOCK_VALUES", 200)  # 2 rows of 96 per block
    c = scheme.quantize("w", w)
    assert all(a[k].tobytes() == c[k].tobytes() for k in a)


def test_fp16_scale_overflow_is_a_clear_error():
    w = np.full((2, 32), 1e6, np.float32)
    with pytest.raises(KilnError, match=r"too large.*q4f32"):
        QUANTIZATIONS["q4f16"].quantize("layers.0.mlp.down_proj.weight", w)
    assert np.isfinite(QUANTIZATIONS["q4f32"].quantize("w", w)["scale"]).all()
