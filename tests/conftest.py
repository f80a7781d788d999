"""Shared fixtures: tiny random Hugging Face checkpoints (made here with transformers and saved
as safetensors) and their compiled CPU artifacts, built once per test session."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pytest

# Tests make their own checkpoints; never reach for the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The checkpoint that ships with Kiln (random weights, a real byte-level BPE tokenizer).
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny-llama"

TINY = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
)

# name -> (transformers config class, model class, config overrides)
CHECKPOINTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    # GQA, CodeLlama's large rope_theta
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"rope_theta": 1e6}),
    # Llama 3: llama3 rope scaling and tied embeddings
    "llama3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "tie_word_embeddings": True,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            "rope_theta": 500000.0,
        },
    ),
    # linear rope scaling, plain multi-head attention (head_dim 32: TVM's CUDA decode kernel
    # cannot launch multi-head attention with head_dim 16)
    "llama_linear": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"rope_type": "linear", "factor": 4.0},
        },
    ),
    # sliding window shorter than the test prompts
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 16}),
    # an intermediate size of a multiple of 32: the batch-1 decode's int4 experts then run on
    # Kiln's CUDA kernels that read only the routed experts (kiln.passes.dispatch_moe)
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 96},
    ),
}


def make_checkpoint(name: str, out: Path, **changes: Any) -> Path:
    """Save a tiny random model of family `name` to `out` (safetensors, fp32); `changes`
    override its config."""
    import torch
    import transformers

    config_cls, model_cls, overrides = CHECKPOINTS[name]
    config = getattr(transformers, config_cls)(**{**TINY, **overrides, **changes})
    torch.manual_seed(sum(map(ord, name)))
    model = getattr(transformers, model_cls)(config).eval()
    # transformers' init (std 0.02) makes near-uniform logits and constant greedy output;
    # weights of unit-scale activations give varied tokens, which makes the comparison bite.
    # A tied embedding that dominates the residual stream would make each token predict itself.
    embed_std = 0.2 if config.tie_word_embeddings else 1.0
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, embed_std if "embed" in pname else p.shape[-1] ** -0.5)
            else:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out, safe_serialization=True)
    return out


def _has_cuda_gpu() -> bool:
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return (
        cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    )


@pytest.fixture(autouse=True)
def _clean_cli_state(monkeypatch):
    # The CLI installs its own warnings.showwarning; put the original back after each test.
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.delenv("KILN_DEBUG", raising=False)


def pytest_collection_modifyitems(config, items):
    if _has_cuda_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> directory of a tiny saved transformers model (made once)."""
    made: dict[str, Path] = {"tiny-llama": EXAMPLE}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = make_checkpoint(name, tmp_path_factory.mktemp(f"ckpt-{name}"))
        return made[name]

    return get


@pytest.fixture(scope="session")
def custom_checkpoint(tmp_path_factory):
    """custom_checkpoint(name, **changes) -> a tiny checkpoint of family `name` with config
    fields changed (made on every call)."""

    def make(name: str, **changes: Any) -> Path:
        return make_checkpoint(name, tmp_path_factory.mktemp(f"ckpt-{name}"), **changes)

    return make


@pytest.fixture(scope="session")
def artifact(tmp_path_factory, checkpoint):
    """artifact(name, quantization="q0f32") -> compiled CPU artifact directory (made once)."""
    import kiln

    made: dict[tuple[str, str], Path] = {}

    def get(name: str, quantization: str = "q0f32") -> Path:
        key = (name, quantization)
        if key not in made:
            out = tmp_path_factory.mktemp(f"art-{name}-{quantization}") / "artifact"
            made[key] = kiln.compile(
                str(checkpoint(name)), target="cpu", quantization=quantization, output=out
            )
        return made[key]

    return get


@pytest.fixture(scope="session")
def reference():
    """reference(checkpoint_dir) -> the transformers model loaded from it (fp32, eval)."""
    import transformers

    cache: dict[Path, Any] = {}

    def get(path: Path):
        if path not in cache:
            cache[path] = transformers.AutoModelForCausalLM.from_pretrained(
                path, dtype="float32"
            ).eval()
        return cache[path]

    return get


@pytest.fixture(scope="session")
def gpu_build(checkpoint, tmp_path_factory):
    """gpu_build(name, preset) -> (checkpoint, CUDA artifact for sm_90). With KILN_GPU_ARTIFACTS
    set, both come from that folder (tests/gpu/build_artifacts.py made it, so the GPU machine
    needs only the TVM runtime); otherwise they are compiled here."""
    import kiln

    prebuilt = os.environ.get("KILN_GPU_ARTIFACTS")

    def get(name: str, preset: str) -> tuple[Path, Path]:
        if prebuilt:
            root = Path(prebuilt)
            ckpt = root / f"ckpt-{name}" if name != "tiny-llama" else checkpoint(name)
            return ckpt, root / f"{name}-{preset}"
        out = tmp_path_factory.mktemp(f"cuda-{name}-{preset}") / "artifact"
        ckpt = checkpoint(name)
        kiln.compile(str(ckpt), target="cuda", quantization=preset, output=out, arch="sm_90")
        return ckpt, out

    return get
