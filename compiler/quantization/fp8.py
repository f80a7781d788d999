"""FP8 e4m3 weights with one float32 scale per output channel (fp8e4m3, fp8e4m3_bf16).

Storage of a (rows, cols) weight:

* `scale` (rows,) float32: the row's max |w| / 448, 448 being the largest finite e4m3 value.
  Float32 rather than the model dtype: a row whose weights are all below ~0.03 would get an
  fp16 scale in fp16's subnormal range and lose bits that the 3-bit mantissa cannot spare.
* `qweight` (rows, cols) uint8: w / scale (computed in float32) in the OCP FP8 "e4m3fn" encoding
  (`float8_e4m3fn`: sign bit, 4 exponent bits with bias 7, 3 mantissa bits; subnormals; no
  infinities; 0x7f and 0xff are NaN and never written), rounded to nearest, ties to even.

Dequantized: w = e4m3(q) * scale, computed in float32 and rounded once to the model dtype
(fp16, or bf16 for fp8e4m3_bf16, which costs nothing extra: only the final rounding differs).
A row of zeros gets scale 0.

Every target reads the bytes as uint8 and decodes them with integer arithmetic in the kernel's
dequantize stage (no fp8 hardware needed, so it runs everywhere). Feeding the e4m3 bytes to
native FP8 tensor cores (Hopper and newer) is a later performance task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from tvm import te, tirx
from tvm.relax.frontend import nn

from kiln.compiler.quantization.base import (
    ParamLayout,
    Shape,
    by_rows,
    np_dtype,
    preset_json,
    quantize_weights,
)
from kiln.runtime.errors import KilnError

MAX_E4M3 = 448.0
MANTISSA_BITS = 3
EXP_BIAS = 7
MIN_NORMAL_EXP = 1 - EXP_BIAS  # the smallest normal number is 2**-6; subnormals step by 2**-9
SIGN = 0x80


def encode_e4m3(x: np.ndarray) -> np.ndarray:
    """float32 -> e4m3fn bytes, round to nearest even; |x| above 448 saturates to 448.

    Within the binade [2**e, 2**(e+1)) the representable values are n * 2**(e-3), n = 8..15
    (subnormals: n = 0..7 at e = -6). The code of n * 2**(e-3) is (e + 6) * 8 + n, which also
    holds when rounding carries n to 16 (the next binade's first value) or a subnormal to 8.
    """
    a = np.minimum(np.abs(x.astype(np.float32, copy=False)), np.float32(MAX_E4M3))
    _, frexp_exp = np.frexp(a)  # a = f * 2**frexp_exp, f in [0.5, 1)
    exp = np.where(a < np.float32(2.0**MIN_NORMAL_EXP), MIN_NORMAL_EXP, frexp_exp - 1)
    n = np.rint(np.ldexp(a, MANTISSA_BITS - exp))  # exact scaling by a power of two
    code = (exp - MIN_NORMAL_EXP) * (1 << MANTISSA_BITS) + n.astype(np.int32)
    return (code | np.where(np.signbit(x), SIGN, 0)).astype(np.uint8)


def decode_e4m3(q: np.ndarray) -> np.ndarray:
    """e4m3fn bytes -> float32 (exact)."""
    q = q.astype(np.int32)
    exp, mant = (q >> MANTISSA_BITS) & 0xF, q & 0x7
    normal = np.ldexp((8 + mant).astype(np.float32), exp - EXP_BIAS - MANTISSA_BITS)
    sub = np.ldexp(mant.astype(np.float32), MIN_NORMAL_EXP - MANTISSA_BITS)
    mag = np.where(exp == 0, sub, normal)
    return np.where(q & SIGN, -mag, mag).astype(np.float32)


def decode_e4m3_te(byte: tirx.PrimExpr) -> tirx.PrimExpr:
    """A uint8 e4m3fn code -> float32, with integer ops and one bit cast.

    Normal numbers become float32 bit patterns directly (exponent rebiased from 7 to 127,
    mantissa moved to the top); subnormals are mant * 2**-9. Float32 subnormals never occur,
    so a flush-to-zero mode on the device cannot change the result.
    """
    b = byte.astype("uint32")
    exp = (b >> MANTISSA_BITS) & tirx.const(0xF, "uint32")
    mant = b & tirx.const(0x7, "uint32")
    rebias = tirx.const(127 - EXP_BIAS, "uint32")
    normal = tirx.reinterpret("float32", ((exp + rebias) << 23) | (mant << (23 - MANTISSA_BITS)))
    sub = mant.astype("float32") * tirx.const(2.0 ** (MIN_NORMAL_EXP - MANTISSA_BITS), "float32")
    mag = tirx.Select(exp == tirx.const(0, "uint32"), sub, normal)
    return tirx.Select(b >= tirx.const(SIGN, "uint32"), -mag, mag)


@dataclass(frozen=True)
class FP8E4M3:
    name: str
    model_dtype: str  # activations, and what stays in float
    description: str
    quantize_vocab: bool = True  # embedding and LM head too

    # -- the preset ----------------------------------------------------------------------------

    def quantize_model(self, model: nn.Module) -> ParamLayout:
        return quantize_weights(model, self, self.quantize_vocab)

    def to_json(self) -> dict[str, Any]:
        return preset_json(
            self,
            scheme="fp8_channel",
            format="e4m3fn",
            scale_dtype="float32",
            quantize_vocab=self.quantize_vocab,
        )

    # -- the scheme ----------------------------------------------------------------------------

    def storage(self, rows: int, cols: int) -> dict[str, tuple[Shape, str]]:
        return {"qweight": ((rows, cols), "uint8"), "scale": ((rows,), "float32")}

    def quantize(self, name: str, weight: np.ndarray) -> dict[str, np.ndarray]:
        return by_rows(lambda block: self._quantize(name, block), weight)

    def _quantize(self, name: str, weight: np.ndarray) -> dict[str, np.ndarray]:
        w = weight.astype(np.float32, copy=False)
        absmax = np.abs(w).max(axis=-1)
        if not np.isfinite(absmax).all():
            raise KilnError(
                f"weight {name} holds values that are not finite: the checkpoint is damaged "
                "(re-download it)"
            )
        scale = absmax / np.float32(MAX_E4M3)
        q = np.zeros(w.shape, np.float32)
        np.divide(w, scale[:, None], out=q, where=scale[:, None] != 0)
        return {"qweight": encode_e4m3(q), "scale": scale.astype(np.float32)}

    def dequantize(self, stored: dict[str, np.ndarray], cols: int) -> np.ndarray:
        w = decode_e4m3(stored["qweight"]) * stored["scale"][:, None]
        return w.astype(np_dtype(self.model_dtype))

    def weight_te(
        self,
        stored: dict[str, te.Tensor],
        row: tirx.PrimExpr,
        col: tirx.PrimExpr,
        dtype: str | None = None,
    ) -> tirx.PrimExpr:
        w = decode_e4m3_te(stored["qweight"][row, col]) * stored["scale"][row]
        return w.astype(dtype or self.model_dtype)
