"""The registry of model families: config.json `architectures` -> family."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tvm.relax.frontend import nn

from kiln.compiler.weights import Source
from kiln.models import llama, mistral, mixtral
from kiln.models.sharding import Split
from kiln.runtime.errors import KilnError


@dataclass(frozen=True)
class ModelFamily:
    name: str
    config_class: type[llama.LlamaConfig]
    model_class: type[nn.Module]
    weight_map: Callable[[llama.LlamaConfig], dict[str, Source]]
    # Checkpoint tensors that may be present and carry nothing the model needs (regexes).
    ignore: tuple[str, ...] = llama.HARMLESS_TENSORS
    # How the float parameters split over GPUs (kiln.models.sharding).
    weight_splits: Callable[[llama.LlamaConfig, list[str]], dict[str, Split]] = llama.weight_splits


MODELS: dict[str, ModelFamily] = {
    "llama": ModelFamily(
        "llama", llama.LlamaConfig, llama.LlamaForCausalLM, llama.llama_weight_map
    ),
    "mistral": ModelFamily(
        "mistral", mistral.MistralConfig, mistral.MistralForCausalLM, mistral.mistral_weight_map
    ),
    "mixtral": ModelFamily(
        "mixtral", mixtral.MixtralConfig, mixtral.MixtralForCausalLM, mixtral.mixtral_weight_map
    ),
}

# config.json `architectures` entry -> family name. CodeLlama and Llama 3 publish LlamaForCausalLM.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mixtral",
}


def family_of(hf_config: dict[str, Any]) -> ModelFamily:
    archs = hf_config.get("architectures") or []
    if not isinstance(archs, list) or not archs:
        raise KilnError(
            "config.json has no 'architectures' list: cannot tell which model family this is "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    for arch in archs:
        if arch in ARCHITECTURES:
            return MODELS[ARCHITECTURES[arch]]
    raise KilnError(
        f"config.json: architecture {archs[0]!r} is not supported "
        f"(supported: {', '.join(ARCHITECTURES)})"
    )
