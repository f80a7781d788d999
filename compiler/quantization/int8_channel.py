"""Symmetric int8 weights with one float scale per output channel (q8f16).

Per-channel rather than group-wise: with 255 levels the rounding error is already small, the
scales cost one value per row instead of one per 32 weights, and the int8 weights need no
packing or padding (any input width works).

Storage of a (rows, cols) weight:

* `scale` (rows,) in the model dtype: the row's max |w| / 127 (computed in float32), rounded
  to that dtype.
* `qweight` (rows, cols) int8: q = clip(round_half_even(w / scale), -127, 127).

Dequantized: w = q * scale, computed in the model dtype. A row of zeros gets scale 0.
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

MAX_Q = 127


@dataclass(frozen=True)
class Int8Channel:
    name: str
    model_dtype: str  # activations, scales, and what stays in float
    description: str
    quantize_vocab: bool = True  # embedding and LM head too

    # -- the preset ----------------------------------------------------------------------------

    def quantize_model(self, model: nn.Module) -> ParamLayout:
        return quantize_weights(model, self, self.quantize_vocab)

    def to_json(self) -> dict[str, Any]:
        return preset_json(
            self,
            scheme="int8_channel",
            bits=8,
            scale_dtype=self.model_dtype,
            quantize_vocab=self.quantize_vocab,
        )

    # -- the scheme ----------------------------------------------------------------------------

    def storage(self, rows: int, cols: int) -> dict[str, tuple[Shape, str]]:
        return {"qweight": ((rows, cols), "int8"), "scale": ((rows,), self.model_dtype)}

    def quantize(self, name: str, weight: np.ndarray) -> dict[str, np.ndarray]:
        return by_rows(lambda block: self._quantize(name, block), weight)

    def _quantize(self, name: str, weight: np.ndarray) -> dict[str, np.ndarray]:
        w = weight.astype(np.float32, copy=False)
        with np.errstate(over="ignore", invalid="ignore"):
            scale = (np.abs(w).max(axis=-1) / np.float32(MAX_Q)).astype(np_dtype(self.model_dtype))
        if not np.isfinite(scale).all():
            raise KilnError(
                f"weight {name} has values too large (or not finite) for {self.model_dtype} "
                f"scales (max |w| = {np.abs(w).max()}): use a float32 preset (q4f32, q0f32)"
            )
        s = scale.astype(np.float32)[:, None]  # (rows, 1)
        q = np.zeros(w.shape, np.float32)
        np.divide(w, s, out=q, where=s != 0)
        np.clip(np.rint(q, out=q), -MAX_Q, MAX_Q, out=q)
        return {"qweight": q.astype(np.int8), "scale": scale}

    def dequantize(self, stored: dict[str, np.ndarray], cols: int) -> np.ndarray:
        dtype = np_dtype(self.model_dtype)
        return stored["qweight"].astype(dtype) * stored["scale"].astype(dtype)[:, None]

    def weight_te(
        self,
        stored: dict[str, te.Tensor],
        row: tirx.PrimExpr,
        col: tirx.PrimExpr,
        dtype: str | None = None,
    ) -> tirx.PrimExpr:
        dtype = dtype or self.model_dtype
        return stored["qweight"][row, col].astype(dtype) * stored["scale"][row].astype(dtype)
