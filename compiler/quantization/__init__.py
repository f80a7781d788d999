"""Quantization presets by name (one scheme per file; the contract is in base.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.compiler.quantization.awq import AWQInt4
from kiln.compiler.quantization.base import ParamLayout, Quantization
from kiln.compiler.quantization.fp8 import FP8E4M3
from kiln.compiler.quantization.int4_group import Int4Group
from kiln.compiler.quantization.int8_channel import Int8Channel
from kiln.compiler.quantization.none import NoQuant
from kiln.runtime.errors import KilnError

__all__ = [
    "QUANTIZATIONS",
    "ParamLayout",
    "Quantization",
    "for_checkpoint",
    "get_quantization",
    "imports_checkpoint",
]

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
    "q4f16_awq": AWQInt4(
        "q4f16_awq",
        "float16",
        "imports an AutoAWQ (GEMM) checkpoint as published: int4 weights with fp16 scales and "
        "int4 zero points per group of input features; embedding and LM head stay fp16; fp16 "
        "activations",
    ),
}


def get_quantization(name: str) -> Quantization:
    if name not in QUANTIZATIONS:
        raise KilnError(f"unknown quantization {name!r}: choose one of {', '.join(QUANTIZATIONS)}")
    return QUANTIZATIONS[name]


def imports_checkpoint(preset: Quantization) -> bool:
    """Whether the preset reads a pre-quantized checkpoint as it is, rather than quantizing
    a full-precision one."""
    return isinstance(preset, AWQInt4)


def for_checkpoint(
    preset: Quantization, hf_config: dict[str, Any], model_dir: Path
) -> tuple[Quantization, dict[str, Any]]:
    """The preset as it applies to this checkpoint, and config.json without the
    `quantization_config` the preset has taken in. A pre-quantized checkpoint compiles with
    the preset that imports it, and only with that one."""
    if isinstance(preset, AWQInt4):
        preset = preset.for_checkpoint(hf_config, model_dir)
        return preset, {k: v for k, v in hf_config.items() if k != "quantization_config"}
    qc = hf_config.get("quantization_config")
    if not qc:
        return preset, hf_config
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method == "awq":
        raise KilnError(
            f"{model_dir} holds AWQ-quantized weights (config.json has an AWQ "
            f"quantization_config), which --quantization {preset.name} cannot start from: "
            "compile it with --quantization q4f16_awq, or point Kiln at the full-precision "
            f"checkpoint to quantize it with {preset.name}"
        )
    raise KilnError(
        f"{model_dir} is pre-quantized (config.json: quantization_config, quant_method "
        f"{method!r}), which Kiln cannot import: point Kiln at the full-precision checkpoint "
        "and choose --quantization, or use an AutoAWQ checkpoint with --quantization q4f16_awq"
    )
