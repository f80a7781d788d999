"""Presets without quantization: weights are stored and computed in one float dtype."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tvm.relax.frontend import nn

from kiln.compiler.quantization.base import ParamLayout, float_layout, preset_json


@dataclass(frozen=True)
class NoQuant:
    name: str
    model_dtype: str  # dtype of weights and activations
    description: str

    def quantize_model(self, model: nn.Module) -> ParamLayout:
        return float_layout(model, self.model_dtype)

    def to_json(self) -> dict[str, Any]:
        return preset_json(self, scheme="none")
