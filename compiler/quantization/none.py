"""Presets without quantization: weights are stored and computed in one float dtype."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NoQuant:
    name: str
    model_dtype: str  # dtype of weights and activations
    description: str

    def transform(self, name: str, array: np.ndarray) -> dict[str, np.ndarray]:
        return {name: array.astype(self.model_dtype)}
