"""Mistral: Llama layers with sliding-window attention."""

from __future__ import annotations

from typing import Any

from kiln.compiler.weights import Source
from kiln.models.llama import LlamaConfig, LlamaForCausalLM, llama_weight_map
from kiln.runtime.errors import KilnError


class MistralConfig(LlamaConfig):
    @classmethod
    def from_hf(cls, cfg: dict[str, Any], **extra: Any) -> LlamaConfig:
        window = cfg.get("sliding_window")
        if window is not None and (not isinstance(window, int) or window <= 0):
            raise KilnError(
                f"config.json: sliding_window must be a positive integer, not {window!r}"
            )
        return LlamaConfig.from_hf(cfg, sliding_window=window, **extra)


class MistralForCausalLM(LlamaForCausalLM):
    pass


def mistral_weight_map(config: LlamaConfig) -> dict[str, Source]:
    return llama_weight_map(config)
