"""Quantization presets by name (one scheme per file; the contract is in base.py)."""

from __future__ import annotations

from kiln.compiler.quantization.base import ParamLayout, Quantization
from kiln.compiler.quantization.fp8 import FP8E4M3
from kiln.compiler.quantization.int4_group import Int4Group
from kiln.compiler.quantization.int8_channel import Int8Channel
from kiln.compiler.quantization.none import NoQuant
from kiln.runtime.errors import KilnError

__all__ = ["QUANTIZATIONS", "ParamLayout", "Quantization", "get_quantization"]

_INT4 = "int4 weights, symmetric, one {0} scale per 32 input features"
_FP8 = "fp8 e4m3 weights, one fp32 scale per output channel"
QUANTIZATIONS: dict[str, Quantization] = {
    "q0f32": NoQuant("q0f32", "float32", "no quantization, float32 weights and activations"),
    "q0f16": NoQuant("q0f16", "float16", "no quantization, float16 weights and activations"),
    "q0bf16": NoQuant("q0bf16", "bfloat16", "no quantization, bfloat16 weights and activations"),
    "q4f16": Int4Group(
        "q4f16", "float16", _INT4.format("fp16") + " (embedding and LM head too); fp16 activations"
    ),
    "q4f32": Int4Group(
        "q4f32", "float32", _INT4.format("fp32") + " (embedding and LM head too); fp32 activations"
    ),
    "q4f16_fe": Int4Group(
        "q4f16_fe",
        "float16",
        _INT4.format("fp16") + "; embedding and LM head stay fp16; fp16 activations",
        quantize_vocab=False,
    ),
    "q8f16": Int8Channel(
        "q8f16",
        "float16",
        "int8 weights, symmetric, one fp16 scale per output channel (embedding and LM head "
        "too); fp16 activations",
    ),
    "fp8e4m3": FP8E4M3(
        "fp8e4m3", "float16", _FP8 + " (embedding and LM head too); fp16 activations"
    ),
    "fp8e4m3_bf16": FP8E4M3(
        "fp8e4m3_bf16", "bfloat16", _FP8 + " (embedding and LM head too); bf16 activations"
    ),
}


def get_quantization(name: str) -> Quantization:
    if name not in QUANTIZATIONS:
        raise KilnError(f"unknown quantization {name!r}: choose one of {', '.join(QUANTIZATIONS)}")
    return QUANTIZATIONS[name]
