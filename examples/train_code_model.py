"""Train the small Python code model that ships with Kiln (examples/tiny-code-llama).

Two steps, so the corpus and tokenizer are made once, on one Python, and the training can run
where a GPU is:

    python examples/train_code_model.py prepare --work build/code-model      # CPU, ~1 min
    python examples/train_code_model.py train --work build/code-model \\
        --output examples/tiny-code-llama                                    # GPU, minutes

The corpus is the Python standard library's source (PSF license), split by file: every 20th file
(in sorted path order) is held out for validation (`heldout.txt`, which the perplexity tests
read). The model is a Llama (GQA, RoPE, SwiGLU, RMSNorm) of about 7M parameters, saved in
transformers' format as float16 safetensors. Seeded; the README written next to the weights
records hardware, time and losses.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sysconfig
import time
from pathlib import Path

import numpy as np

from kiln.examples.make_tiny_checkpoint import (
    BOS_ID,
    EOS_ID,
    train_tokenizer,
    write_tokenizer_files,
)

VOCAB = 4096
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": VOCAB,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "initializer_range": 0.02,
    "torch_dtype": "float16",
}
HOLDOUT_EVERY = 20


def stdlib_files() -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        parts = path.relative_to(root).parts
        if {"site-packages", "dist-packages", "__pycache__"} & set(parts):
            continue
        try:
            out.append((path.relative_to(root).as_posix(), path.read_text("utf-8")))
        except (OSError, UnicodeDecodeError):
            continue
    return out


def prepare(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    files = stdlib_files()
    train = [t for i, (_, t) in enumerate(files) if i % HOLDOUT_EVERY]
    heldout = [t for i, (_, t) in enumerate(files) if i % HOLDOUT_EVERY == 0]
    tokenizer = train_tokenizer(train, VOCAB)
    write_tokenizer_files(work, tokenizer, CONFIG["max_position_embeddings"])
    for name, texts in (("train", train), ("heldout", heldout)):
        ids = [i for enc in tokenizer.encode_batch(texts) for i in [*enc.ids, EOS_ID]]
        np.save(work / f"{name}.npy", np.array(ids, dtype=np.uint16))
        print(f"{name}: {len(texts)} files, {len(ids)} tokens")
    # A sample of the held-out files, small enough to ship: the perplexity tests score it.
    (work / "heldout.txt").write_text("\n".join(heldout)[:65536], encoding="utf-8")
    print(f"python {platform.python_version()}, {len(files)} files")


def train(work: Path, output: Path, steps: int, batch: int, seq: int, minutes: float) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = torch.from_numpy(np.load(work / "train.npy").astype(np.int64))
    heldout = torch.from_numpy(np.load(work / "heldout.npy").astype(np.int64))
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).to(device)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = 100

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(0)

    def batch_of(tokens: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(tokens) - seq - 1, (n,), generator=g)
        return torch.stack([tokens[s : s + seq] for s in starts.tolist()]).to(device)

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            return model(input_ids=x, labels=x).loss

    start, done, losses = time.time(), 0, []
    model.train()
    for step in range(steps):
        loss = loss_of(batch_of(data, batch, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        done = step + 1
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.3f} {time.time() - start:.0f}s", flush=True)
        if time.time() - start > minutes * 60:
            break
    seconds = time.time() - start

    model.eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        val = float(np.mean([loss_of(batch_of(heldout, batch, g)).item() for _ in range(20)]))
    output.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(output, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (output / name).write_bytes((work / name).read_bytes())
    (output / "heldout.txt").write_bytes((work / "heldout.txt").read_bytes())
    gpu = torch.cuda.get_device_name() if device == "cuda" else platform.processor()
    record = {
        "parameters": params,
        "steps": done,
        "batch": batch,
        "sequence": seq,
        "tokens_seen": done * batch * seq,
        "seconds": round(seconds, 1),
        "hardware": gpu,
        "final_train_loss": round(float(np.mean(losses[-50:])), 4),
        "heldout_loss": round(val, 4),
        "heldout_perplexity": round(math.exp(val), 3),
        "torch": torch.__version__,
    }
    (output / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--work", type=Path, required=True)
    t = sub.add_parser("train")
    t.add_argument("--work", type=Path, required=True)
    t.add_argument("--output", type=Path, default=Path("examples/tiny-code-llama"))
    t.add_argument("--steps", type=int, default=4000)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--seq", type=int, default=512)
    t.add_argument("--minutes", type=float, default=6.0, help="stop early after this long")
    args = parser.parse_args()
    if args.cmd == "prepare":
        prepare(args.work)
    else:
        train(args.work, args.output, args.steps, args.batch, args.seq, args.minutes)


if __name__ == "__main__":
    main()
