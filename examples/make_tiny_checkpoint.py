"""Write `examples/tiny-llama`: a tiny Llama checkpoint in Hugging Face format, with random weights.

It exists so that `kiln compile examples/tiny-llama` works on any machine without a download. The
model has the Llama architecture (grouped-query attention, RoPE, RMSNorm, SwiGLU) at a toy size;
its weights are random, so its text is not meaningful, only deterministic.

The tokenizer is a byte-level BPE trained on the source of the Python standard library of the
Python running this script (the first `--corpus-bytes` bytes of its `.py` files, in sorted path
order), a corpus that every machine with Python already has. Running the script twice with the
same Python gives byte-identical files; another Python version has other standard-library sources,
so its tokenizer (and nothing else) may differ.

Only numpy, safetensors and tokenizers are needed:

    python examples/make_tiny_checkpoint.py --output examples/tiny-llama
"""

from __future__ import annotations

import argparse
import json
import sysconfig
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "torch_dtype": "float32",
}

# ChatML-like: BOS, then "<|role|>\n" + content + EOS per message; the role markers are plain text.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

README = """\
# tiny-llama

A tiny Llama-architecture checkpoint in Hugging Face format, shipped with Kiln so that the
quick-start works without downloading a model:

    kiln compile examples/tiny-llama --output tiny-llama-cpu
    kiln run tiny-llama-cpu --prompt "def fibonacci(n):" --max-tokens 32 --temperature 0

**The weights are random.** The model generates deterministic but meaningless text; it is for
trying the compiler and runtime end to end, and for tests, not for use as a language model.

- Architecture: `LlamaForCausalLM`, 4 layers, hidden size 128, 4 attention heads with 2 key/value
  heads (grouped-query attention), SwiGLU MLP of width 344, RoPE (theta 10000), RMSNorm,
  untied input and output embeddings, 512 positions. About 1.25 million parameters, stored as
  float16 in `model.safetensors`.
- Tokenizer: a byte-level BPE with 2048 tokens (`<unk>` = 0, `<s>` = 1 (BOS), `</s>` = 2 (EOS)),
  trained on source files of the Python standard library, which is distributed under the Python
  Software Foundation License. The tokenizer adds `<s>` in front of every encoded text.
- Chat template: a minimal ChatML-like template (`<|user|>`, `<|assistant|>` as plain-text role
  markers) so that `kiln run --chat` and `Model.chat` can be tried.

Everything here is produced by `examples/make_tiny_checkpoint.py` from a fixed seed, using only
numpy, safetensors and tokenizers:

    python examples/make_tiny_checkpoint.py --output examples/tiny-llama

Running it again with the same Python version reproduces the files byte for byte. The weights
depend only on the seed; the tokenizer depends on the standard-library sources of the Python that
runs the script, so another Python version may give a slightly different vocabulary.
"""


def stdlib_corpus(max_bytes: int) -> list[str]:
    """The first max_bytes of the standard library's .py sources, in sorted relative-path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (p for p in root.rglob("*.py") if p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    texts: list[str] = []
    total = 0
    for path in files:
        parts = path.relative_to(root).parts
        # Third-party packages installed into the interpreter are not the standard library.
        if "site-packages" in parts or "dist-packages" in parts or "__pycache__" in parts:
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # some test files are deliberately not UTF-8
        texts.append(text)
        total += len(text.encode("utf-8"))
        if total >= max_bytes:
            break
    if not texts:
        raise SystemExit(f"no Python sources found under {root}")
    return texts


def train_tokenizer(corpus: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    for token, want in zip(SPECIAL_TOKENS, (UNK_ID, BOS_ID, EOS_ID), strict=True):
        got = tokenizer.token_to_id(token)
        if got != want:
            raise SystemExit(f"special token {token} got id {got}, expected {want}")
    if tokenizer.get_vocab_size() != vocab_size:
        raise SystemExit(f"vocabulary has {tokenizer.get_vocab_size()} tokens, not {vocab_size}")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s> $B",
        special_tokens=[("<s>", BOS_ID)],
    )
    return tokenizer


def random_weights(seed: int) -> dict[str, np.ndarray]:
    """LlamaForCausalLM's tensors, (out_features, in_features) layout, float16.

    Projections are normal with std 1/sqrt(fan_in), so activations keep unit scale through the
    layers and the logits spread enough for greedy decoding to wander rather than repeat one token.
    """
    rng = np.random.default_rng(seed)
    c = CONFIG
    hidden, inter = c["hidden_size"], c["intermediate_size"]
    head_dim = hidden // c["num_attention_heads"]
    q_out = c["num_attention_heads"] * head_dim
    kv_out = c["num_key_value_heads"] * head_dim

    def linear(out_features: int, in_features: int) -> np.ndarray:
        w = rng.standard_normal((out_features, in_features)) / np.sqrt(in_features)
        return w.astype(np.float16)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float16)

    tensors: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": rng.standard_normal((VOCAB_SIZE, hidden)).astype(np.float16)
    }
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = ones(hidden)
        tensors[p + "self_attn.q_proj.weight"] = linear(q_out, hidden)
        tensors[p + "self_attn.k_proj.weight"] = linear(kv_out, hidden)
        tensors[p + "self_attn.v_proj.weight"] = linear(kv_out, hidden)
        tensors[p + "self_attn.o_proj.weight"] = linear(hidden, q_out)
        tensors[p + "post_attention_layernorm.weight"] = ones(hidden)
        tensors[p + "mlp.gate_proj.weight"] = linear(inter, hidden)
        tensors[p + "mlp.up_proj.weight"] = linear(inter, hidden)
        tensors[p + "mlp.down_proj.weight"] = linear(hidden, inter)
    tensors["model.norm.weight"] = ones(hidden)
    tensors["lm_head.weight"] = linear(VOCAB_SIZE, hidden)
    return tensors


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer_files(out: Path, tokenizer: Tokenizer, max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json (with the chat template), generation_config.json."""
    tokenizer.save(str(out / "tokenizer.json"))
    write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "add_bos_token": True,
            "add_eos_token": False,
            "model_max_length": max_length,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    write_json(out / "generation_config.json", {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="examples/tiny-llama", help="directory to write")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    parser.add_argument(
        "--corpus-bytes",
        type=int,
        default=2_000_000,
        help="how much standard-library source to train the tokenizer on",
    )
    args = parser.parse_args()

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer(stdlib_corpus(args.corpus_bytes))
    write_tokenizer_files(out, tokenizer, CONFIG["max_position_embeddings"])
    write_json(out / "config.json", CONFIG)
    # Fixed metadata (no timestamps) keeps the file byte-identical between runs.
    save_file(random_weights(args.seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "README.md").write_text(README, encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
