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


def route(logits: nn.Tensor, top_k: int, dtype: str) -> nn.Tensor:
    """Each row's weight per expert (..., E) from the router's logits (..., E): the softmax in
    float32, 0 outside the row's top k, renormalized over the k, in `dtype`. (On CUDA,
    kiln.passes.dispatch_moe makes the batch-1 router one kernel, checking these ops.)"""
    probs = op.softmax(logits.astype("float32"), axis=-1)
    # The top k without a sort: expert e is chosen when fewer than k others rank above it (a
    # higher probability, or an equal one at a lower index: ties go to the lower index).
    # Comparisons and sums over the experts fuse into a few small kernels; TVM's top-k was
    # four on a GPU, and the one-hot weights after it three more.
    experts = op.arange(0, probs.shape[-1], dtype="int32")  # (experts,)
    p_e, p_j = op.unsqueeze(probs, -1), op.unsqueeze(probs, -2)  # (..., e, 1), (..., 1, j)
    lower = op.less(op.unsqueeze(experts, 0), op.unsqueeze(experts, 1))  # [e, j]: j < e
    above = op.greater(p_j, p_e).astype("int32") + (
        op.equal(p_j, p_e).astype("int32") * lower.astype("int32")
    )
    chosen = op.less(op.sum(above, axis=-1), op.full((1,), top_k, dtype="int32"))
    top_w = op.where(chosen, probs, op.zeros((1,), dtype="float32"))  # 0 where not chosen
    # Dense combination: every expert's weight, 0 for the unselected, renormalized over the
    # chosen k (kiln.passes.dispatch_moe then reads only the chosen experts at batch 1).
    return (top_w / op.sum(top_w, axis=-1, keepdims=True)).astype(dtype)


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
        weights = route(self.gate(x), self.top_k, x.dtype)  # (b, s, experts)
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
