"""Quantization presets by name (one scheme per file)."""

from __future__ import annotations

from kiln.compiler.quantization.none import NoQuant
from kiln.runtime.errors import KilnError

QUANTIZATIONS: dict[str, NoQuant] = {
    "q0f32": NoQuant("q0f32", "float32", "no quantization, float32 weights and activations"),
    "q0f16": NoQuant("q0f16", "float16", "no quantization, float16 weights and activations"),
}


def get_quantization(name: str) -> NoQuant:
    if name not in QUANTIZATIONS:
        raise KilnError(f"unknown quantization {name!r}: choose one of {', '.join(QUANTIZATIONS)}")
    return QUANTIZATIONS[name]
