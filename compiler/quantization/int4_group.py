"""Symmetric int4 weights with one float scale per group of input features (q4f16, q4f32).

Storage of a (rows, cols) weight, with G = group_size and cols padded up to a multiple of G:

* `scale` (rows, ceil(cols / G)) in the model dtype: the group's max |w| / 7, rounded to that
  dtype.
* `qweight` (rows, ceil(cols / G) * G / 8) uint32: q = clip(round_half_even(w / scale), -7, 7)
  stored as the nibble q + 8, eight per word. Input feature j of a row is nibble j % 8 of word
  j // 8, nibble n being bits 4n..4n+3 (the lowest feature in the lowest bits). Padding
  features hold q = 0.

Dequantized: w = (nibble - 8) * scale, computed in the model dtype. A group of zeros gets scale
0; quantizing a float16 model's weights whose scale would overflow float16 is an error.
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

BITS = 4
MAX_Q = 7  # symmetric: q in [-7, 7]; nibble 0 (q = -8) is never written
OFFSET = 8
PER_WORD = 32 // BITS


def pack_nibbles(nibbles: np.ndarray) -> np.ndarray:
    """(rows, 8 * words) values in 0..15 -> (rows, words) uint32, feature j of a row in bits
    4(j % 8)..4(j % 8)+3 of word j // 8."""
    rows = nibbles.shape[0]
    shifts = np.arange(PER_WORD, dtype=np.uint32) * BITS
    words = nibbles.astype(np.uint32).reshape(rows, -1, PER_WORD) << shifts
    return np.bitwise_or.reduce(words, axis=-1).astype(np.uint32, copy=False)


def unpack_nibbles(words: np.ndarray, cols: int) -> np.ndarray:
    """The inverse of `pack_nibbles`: (rows, words) uint32 -> (rows, cols) uint32 in 0..15."""
    shifts = np.arange(PER_WORD, dtype=np.uint32) * BITS
    nibbles = (words[..., None] >> shifts) & np.uint32(0xF)  # (rows, words, 8)
    return nibbles.reshape(words.shape[0], -1)[:, :cols]


def nibble_te(words: te.Tensor, row: tirx.PrimExpr, col: tirx.PrimExpr) -> tirx.PrimExpr:
    """Nibble `col` of row `row` of `pack_nibbles` words, as uint32."""
    shift = ((col % PER_WORD) * BITS).astype("uint32")
    return (words[row, col // PER_WORD] >> shift) & tirx.const(0xF, "uint32")


def nibble_value_te(nibble: tirx.PrimExpr, zero: tirx.PrimExpr | int, dtype: str) -> tirx.PrimExpr:
    """nibble - zero, exactly, in `dtype` (nibble: uint32 in 0..15; zero: an integer 0..15).

    In float32 the integer goes into the mantissa of 2^23 (0x4B000000 | n is 2^23 + n) and
    2^23 + zero is subtracted: an OR and a float add where a conversion would cost a slower
    integer-to-float instruction per weight."""
    if dtype != "float32":
        return (nibble.astype("int32") - zero).astype(dtype)

    def biased(n: tirx.PrimExpr) -> tirx.PrimExpr:
        return tirx.reinterpret("float32", n.astype("uint32") | tirx.const(0x4B000000, "uint32"))

    if isinstance(zero, int):
        return biased(nibble) - tirx.const(float(2**23 + zero), "float32")
    return biased(nibble) - biased(zero)


@dataclass(frozen=True)
class Int4Group:
    name: str
    model_dtype: str  # activations, scales, and what stays in float
    description: str
    group_size: int = 32
    quantize_vocab: bool = True  # embedding and LM head too

    def __post_init__(self) -> None:
        if self.group_size <= 0 or self.group_size % PER_WORD:
            raise ValueError(f"group_size must be a positive multiple of {PER_WORD}")

    # -- the preset ----------------------------------------------------------------------------

    def quantize_model(self, model: nn.Module) -> ParamLayout:
        return quantize_weights(model, self, self.quantize_vocab)

    def to_json(self) -> dict[str, Any]:
        return preset_json(
            self,
            scheme="int4_group",
            bits=BITS,
            group_size=self.group_size,
            scale_dtype=self.model_dtype,
            quantize_vocab=self.quantize_vocab,
        )

    # -- the scheme ----------------------------------------------------------------------------

    def _groups(self, cols: int) -> int:
        return -(-cols // self.group_size)

    def storage(self, rows: int, cols: int) -> dict[str, tuple[Shape, str]]:
        groups = self._groups(cols)
        return {
            "qweight": ((rows, groups * self.group_size // PER_WORD), "uint32"),
            "scale": ((rows, groups), self.model_dtype),
        }

    def quantize(self, name: str, weight: np.ndarray) -> dict[str, np.ndarray]:
        return by_rows(lambda block: self._quantize(name, block), weight)

    def _quantize(self, name: str, weight: np.ndarray) -> dict[str, np.ndarray]:
        rows, cols = weight.shape
        groups = self._groups(cols)
        w = np.zeros((rows, groups * self.group_size), np.float32)
        w[:, :cols] = weight
        w = w.reshape(rows, groups, self.group_size)  # (rows, groups, G)
        with np.errstate(over="ignore", invalid="ignore"):
            scale = (np.abs(w).max(axis=-1) / np.float32(MAX_Q)).astype(np_dtype(self.model_dtype))
        if not np.isfinite(scale).all():
            raise KilnError(
                f"weight {name} has values too large (or not finite) for {self.model_dtype} "
                f"scales (max |w| = {np.abs(weight).max()}): use a float32 preset (q4f32, q0f32)"
            )
        s = scale.astype(np.float32)[..., None]  # (rows, groups, 1)
        q = np.zeros(w.shape, np.float32)
        np.divide(w, s, out=q, where=s != 0)
        del w
        np.clip(np.rint(q, out=q), -MAX_Q, MAX_Q, out=q)
        qweight = pack_nibbles((q.astype(np.int32) + OFFSET).reshape(rows, -1))
        return {"qweight": qweight, "scale": scale}

    def dequantize(self, stored: dict[str, np.ndarray], cols: int) -> np.ndarray:
        qweight, scale = stored["qweight"], stored["scale"]
        q = unpack_nibbles(qweight, cols).astype(np.int32) - OFFSET
        dtype = np_dtype(self.model_dtype)
        group_scale = np.repeat(scale, self.group_size, axis=1)[:, :cols]
        return q.astype(dtype) * group_scale.astype(dtype)

    def weight_te(
        self,
        stored: dict[str, te.Tensor],
        row: tirx.PrimExpr,
        col: tirx.PrimExpr,
        dtype: str | None = None,
    ) -> tirx.PrimExpr:
        dtype = dtype or self.model_dtype
        q = nibble_value_te(nibble_te(stored["qweight"], row, col), OFFSET, dtype)
        return q * stored["scale"][row, col // self.group_size].astype(dtype)
