"""Llama 1/2/3 and CodeLlama: config, layers, model and the Hugging Face weight map.

Mistral and Mixtral reuse these pieces (mistral.py, mixtral.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from kiln.compiler.weights import Source
from kiln.models.attention import AttentionSpec, CausalKV, RoPE
from kiln.models.ops import Embedding
from kiln.models.sharding import Split, all_reduce
from kiln.runtime.errors import KilnError

# Checkpoint tensors that carry no weights (older exports saved RoPE tables).
HARMLESS_TENSORS = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)


def _rope_from_hf(cfg: dict[str, Any]) -> RoPE:
    # transformers 5 writes `rope_parameters`; published checkpoints write rope_theta/rope_scaling.
    # Like transformers, a `rope_scaling` entry wins over `rope_parameters`.
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(scaling, dict):
        raise KilnError(f"config.json: rope_scaling must be an object, not {scaling!r}")
    scaling = dict(scaling)
    theta = float(scaling.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    if not scaling:
        return RoPE(theta)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return RoPE(theta)
    if kind == "linear":
        if "factor" not in scaling:
            raise KilnError("config.json: rope_scaling of type linear lacks factor")
        return RoPE(theta, {"rope_type": "linear", "factor": float(scaling["factor"])})
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in scaling]
        if missing:
            raise KilnError(f"config.json: rope_scaling of type llama3 lacks {', '.join(missing)}")
        return RoPE(theta, {"rope_type": "llama3", **{k: scaling[k] for k in keys}})
    raise KilnError(
        f"config.json: rope_scaling type {kind!r} is not supported "
        "(supported: default, linear, llama3)"
    )


def check_unsupported(cfg: dict[str, Any]) -> None:
    """Refuse config fields that would change the math in ways this family does not implement."""
    if cfg.get("quantization_config"):
        raise KilnError(
            "config.json: the checkpoint is pre-quantized (quantization_config): compile it "
            "with kiln.compile / kiln compile and the preset that reads its format (q4f16_awq "
            "for AutoAWQ), or use the full-precision checkpoint with any --quantization"
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise KilnError(f"config.json: hidden_act {act!r} is not supported (only 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise KilnError(f"config.json: {flag}=true is not supported by this family")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RoPE
    context_length: int
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    num_local_experts: int = 0  # Mixtral
    num_experts_per_tok: int = 0  # Mixtral
    tensor_parallel: int = 1  # GPUs the model is sharded over (kiln.models.sharding)
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], **extra: Any) -> LlamaConfig:
        check_unsupported(cfg)
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            if heads <= 0:
                raise KilnError("config.json: num_attention_heads must be positive")
            eos = cfg.get("eos_token_id")
            fields = dict(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope=_rope_from_hf(cfg),
                context_length=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
            )
        except KeyError as e:
            raise KilnError(f"config.json: required field {e.args[0]!r} is missing") from None
        except (TypeError, ValueError) as e:
            raise KilnError(f"config.json: a field has the wrong type ({e})") from None
        config = cls(**{**fields, **extra})
        config.validate()
        return config

    def validate(self) -> None:
        for name in ("num_key_value_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise KilnError(f"config.json: {name} must be positive")
        if self.num_attention_heads % self.num_key_value_heads:
            raise KilnError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) is not a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
            if getattr(self, name) <= 0:
                raise KilnError(f"config.json: {name} must be positive")
        if self.context_length <= 0:
            raise KilnError("config.json: max_position_embeddings must be positive")
        tp = self.tensor_parallel
        if not isinstance(tp, int) or tp < 1:
            raise KilnError(f"tensor_parallel is {tp!r}; it must be an integer >= 1")
        # Each GPU takes whole attention heads (and whole KV heads) and an equal part of the MLP.
        for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            if getattr(self, name) % tp:
                raise KilnError(
                    f"--tensor-parallel {tp} does not divide this model's {name} "
                    f"({getattr(self, name)}): choose a number of GPUs that divides "
                    f"{self.num_attention_heads} attention heads, {self.num_key_value_heads} KV "
                    f"heads and intermediate_size {self.intermediate_size}"
                )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LlamaConfig:
        data = dict(data)
        data["rope"] = RoPE(**data["rope"])
        data["eos_token_id"] = tuple(data["eos_token_id"])
        return cls(**data)

    def attention_spec(self) -> AttentionSpec:
        """Attention as one GPU runs it: its share of the heads."""
        return AttentionSpec(
            num_layers=self.num_hidden_layers,
            num_q_heads=self.num_attention_heads // self.tensor_parallel,
            num_kv_heads=self.num_key_value_heads // self.tensor_parallel,
            head_dim=self.head_dim,
            rope=self.rope,
            context_length=self.context_length,
            sliding_window=self.sliding_window,
        )


class LlamaAttention(nn.Module):
    """One GPU's heads (all of them without tensor parallelism); o_proj's output is then that
    GPU's partial sum."""

    def __init__(self, config: LlamaConfig, layer_id: int, dtype: str):
        self.layer_id = layer_id
        self.q_heads = config.num_attention_heads // config.tensor_parallel
        self.kv_heads = config.num_key_value_heads // config.tensor_parallel
        self.head_dim = config.head_dim
        hidden, hd = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(hidden, self.q_heads * hd, False, dtype)
        self.k_proj = nn.Linear(hidden, self.kv_heads * hd, False, dtype)
        self.v_proj = nn.Linear(hidden, self.kv_heads * hd, False, dtype)
        self.o_proj = nn.Linear(self.q_heads * self.head_dim, config.hidden_size, False, dtype)

    def forward(self, x: nn.Tensor, kv: CausalKV) -> nn.Tensor:
        b, s, _ = x.shape
        # Three matmuls here; the compiler makes them one (kiln.passes.combine_parallel_matmul).
        qkv = op.concat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        qkv = op.reshape(qkv, (b, s, self.q_heads + 2 * self.kv_heads, self.head_dim))
        out = kv.attention(self.layer_id, qkv, self.q_heads)  # (b, s, q_heads, head_dim)
        return self.o_proj(op.reshape(out, (b, s, self.q_heads * self.head_dim)))


class LlamaMLP(nn.Module):
    """SwiGLU over `inter` features (one GPU's share under tensor parallelism)."""

    def __init__(self, hidden: int, inter: int, dtype: str):
        self.inter = inter
        self.gate_proj = nn.Linear(hidden, inter, False, dtype)
        self.up_proj = nn.Linear(hidden, inter, False, dtype)
        self.down_proj = nn.Linear(inter, hidden, False, dtype)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        # gate and up become one matmul in the compiler (kiln.passes.combine_parallel_matmul).
        return self.down_proj(op.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_id: int, dtype: str):
        eps = config.rms_norm_eps
        self.ranks = config.tensor_parallel
        self.input_layernorm = nn.RMSNorm(config.hidden_size, -1, eps, False, dtype)
        self.self_attn = LlamaAttention(config, layer_id, dtype)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, -1, eps, False, dtype)
        self.mlp = self.make_mlp(config, dtype)

    def make_mlp(self, config: LlamaConfig, dtype: str) -> nn.Module:
        return LlamaMLP(
            config.hidden_size, config.intermediate_size // config.tensor_parallel, dtype
        )

    def forward(self, x: nn.Tensor, kv: CausalKV) -> nn.Tensor:
        x = x + all_reduce(self.self_attn(self.input_layernorm(x), kv), self.ranks)
        return x + all_reduce(self.mlp(self.post_attention_layernorm(x)), self.ranks)


class LlamaForCausalLM(nn.Module):
    layer_class = LlamaDecoderLayer
    # The embedding and LM head, which some quantization presets keep in the float dtype.
    vocab_modules = ("embed_tokens", "lm_head")

    def __init__(self, config: LlamaConfig, dtype: str = "float32"):
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype)
        self.layers = nn.ModuleList(
            [self.layer_class(config, i, dtype) for i in range(config.num_hidden_layers)]
        )
        self.norm = nn.RMSNorm(config.hidden_size, -1, config.rms_norm_eps, False, dtype)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, False, dtype)

    def hidden_states(self, input_ids: nn.Tensor, kv: CausalKV) -> nn.Tensor:
        b, s = input_ids.shape
        x = self.embed_tokens.lookup(op.reshape(input_ids, (b * s,)))
        x = op.reshape(x, (b, s, self.config.hidden_size))  # (b, s, hidden)
        for layer in self.layers:
            x = layer(x, kv)
        return x

    def logits(self, hidden: nn.Tensor) -> nn.Tensor:
        """hidden: (b, s, hidden) -> float32 logits (b, s, vocab)."""
        hidden = self.norm(hidden)
        if self.config.tie_word_embeddings:
            logits = self.embed_tokens.project(hidden)
        else:
            logits = self.lm_head(hidden)
        return logits.astype("float32") if logits.dtype != "float32" else logits


MlpMap = Callable[[LlamaConfig, int], dict[str, Source]]


def llama_weight_map(config: LlamaConfig, mlp_map: MlpMap | None = None) -> dict[str, Source]:
    """Kiln parameter name -> the Hugging Face tensor it is built from (one each: the compiler
    concatenates the weights of the projections it combines, kiln.compiler.combine)."""
    wmap = {
        "embed_tokens.weight": Source(("model.embed_tokens.weight",)),
        "norm.weight": Source(("model.norm.weight",)),
    }
    if not config.tie_word_embeddings:
        wmap["lm_head.weight"] = Source(("lm_head.weight",))
    for i in range(config.num_hidden_layers):
        hf, kl = f"model.layers.{i}", f"layers.{i}"
        for name in ("input_layernorm", "post_attention_layernorm"):
            wmap[f"{kl}.{name}.weight"] = Source((f"{hf}.{name}.weight",))
        for p in "qkvo":
            wmap[f"{kl}.self_attn.{p}_proj.weight"] = Source((f"{hf}.self_attn.{p}_proj.weight",))
        wmap.update((mlp_map or mlp_weight_map)(config, i))
    return wmap


def mlp_weight_map(config: LlamaConfig, i: int) -> dict[str, Source]:
    mlp = f"model.layers.{i}.mlp"
    return {
        f"layers.{i}.mlp.{p}.weight": Source((f"{mlp}.{p}.weight",))
        for p in ("gate_proj", "up_proj", "down_proj")
    }


def weight_splits(config: LlamaConfig, names: list[str]) -> dict[str, Split]:
    """How the float parameters `names` split under tensor parallelism (kiln.models.sharding):
    q/k/v and gate/up by output rows (whole heads), o_proj and down_proj by input columns
    (Mixtral's experts each as an MLP); the rest is replicated."""
    by_suffix = {
        **{f"self_attn.{p}_proj.weight": Split(0) for p in "qkv"},
        "self_attn.o_proj.weight": Split(1),
        "gate_proj.weight": Split(0),
        "up_proj.weight": Split(0),
        "down_proj.weight": Split(1),
    }
    return {
        name: split
        for name in names
        for suffix, split in by_suffix.items()
        if name.endswith(f".{suffix}")
    }
