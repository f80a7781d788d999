"""Mixtral: Mistral attention with a sparse mixture of SwiGLU experts, top-k of N per token."""

from __future__ import annotations

from typing import Any

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from kiln.compiler.weights import Source
from kiln.models.llama import (
    LlamaConfig,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    llama_weight_map,
)
from kiln.models.mistral import MistralConfig
from kiln.runtime.errors import KilnError


class MixtralConfig(LlamaConfig):
    @classmethod
    def from_hf(cls, cfg: dict[str, Any], **extra: Any) -> LlamaConfig:
        try:
            experts = int(cfg["num_local_experts"])
            top_k = int(cfg["num_experts_per_tok"])
        except KeyError as e:
            raise KilnError(f"config.json: required field {e.args[0]!r} is missing") from None
        if not 0 < top_k <= experts:
            raise KilnError(
                f"config.json: num_experts_per_tok ({top_k}) must be between 1 and "
                f"num_local_experts ({experts})"
            )
        return MistralConfig.from_hf(
            cfg, num_local_experts=experts, num_experts_per_tok=top_k, **extra
        )


class MixtralMoE(nn.Module):
    """Routes each token to its top-k experts exactly as transformers does: softmax over the
    router logits in float32, top-k, renormalize the k weights to sum to one."""

    # Quantization presets keep the router in the float dtype: it is tiny (hidden x experts),
    # and rounding its weights would flip top-k choices, which costs far more than it saves.
    float_modules = ("gate",)

    def __init__(self, config: LlamaConfig, dtype: str):
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, self.num_experts, False, dtype)
        self.experts = nn.ModuleList(
            [
                LlamaMLP(
                    config.hidden_size, config.intermediate_size // config.tensor_parallel, dtype
                )
                for _ in range(self.num_experts)
            ]
        )

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        probs = op.softmax(self.gate(x).astype("float32"), axis=-1)  # (b, s, experts)
        top_w, top_i = op.topk(probs, self.top_k, axis=-1, ret_type="both", dtype="int32")
        top_w = top_w / op.sum(top_w, axis=-1, keepdims=True)  # (b, s, k)
        # Dense combination: every expert runs on every token and unselected experts get weight
        # 0. Exact, and simple; a gathered grouped-GEMM MoE kernel is the fast path to come.
        experts = op.arange(0, self.num_experts, dtype="int32")  # (experts,)
        # (b, s, k, experts) one-hot of the chosen experts, weighted, summed over k
        chosen = op.equal(op.unsqueeze(top_i, -1), experts).astype("float32")
        weights = op.sum(chosen * op.unsqueeze(top_w, -1), axis=2).astype(x.dtype)
        per_expert = op.split(weights, self.num_experts, axis=-1)  # experts x (b, s, 1)
        out = None
        for w, expert in zip(per_expert, self.experts, strict=True):
            y = expert(x) * w
            out = y if out is None else out + y
        return out


class MixtralDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, config: LlamaConfig, dtype: str) -> nn.Module:
        return MixtralMoE(config, dtype)


class MixtralForCausalLM(LlamaForCausalLM):
    layer_class = MixtralDecoderLayer


def _moe_map(config: LlamaConfig, i: int) -> dict[str, Source]:
    hf, kl = f"model.layers.{i}.block_sparse_moe", f"layers.{i}.mlp"
    wmap = {f"{kl}.gate.weight": Source((f"{hf}.gate.weight",))}
    for e in range(config.num_local_experts):
        ex = f"{hf}.experts.{e}"
        # w1 = gate, w3 = up, w2 = down in Mixtral's naming.
        for mine, theirs in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            wmap[f"{kl}.experts.{e}.{mine}.weight"] = Source((f"{ex}.{theirs}.weight",))
    return wmap


def mixtral_weight_map(config: LlamaConfig) -> dict[str, Source]:
    return llama_weight_map(config, _moe_map)
