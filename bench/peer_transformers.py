"""The peer on the same card: Hugging Face transformers + torch in fp16, with random weights of
the benchmarked shape (N(0, 1/fan_in) matrices, like bench/random_weights.py gives Kiln).

Figures, through `model.generate` (what users of transformers run), greedy:
- decode tokens/s at batch 1 (128-token prompt, 256 new) and batch 64 (512-token prompts, 128
  new): new tokens / (time of the generation - time of the same generation with 1 new token);
- prefill tokens/s of one 512- and one 2048-token forward pass (logits of the last token only);
- with --compile, decode at batch 1 again with a static cache and torch.compile.

    python bench/peer_transformers.py CONFIG.json --json OUT.json [--compile]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformers


def build(config: dict) -> torch.nn.Module:
    cfg = transformers.AutoConfig.for_model(**config)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
            else:
                p.normal_(1.0, 0.1)
    return model.eval()


def seconds(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def decode_rate(model, batch: int, prompt: int, new: int, vocab: int) -> float:
    ids = torch.randint(3, vocab, (batch, prompt), device="cuda")

    def gen(n: int):
        return lambda: model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip

    with torch.no_grad():
        gen(2)()  # warm-up
        first = seconds(gen(1))
        total = seconds(gen(new))
    return batch * (new - 1) / (total - first)


def prefill_rate(model, n: int, vocab: int) -> float:
    ids = torch.randint(3, vocab, (1, n), device="cuda")
    with torch.no_grad():
        model(ids, logits_to_keep=1)  # warm-up
        return n / min(seconds(lambda: model(ids, logits_to_keep=1)) for _ in range(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    config = json.loads(args.config.read_text())
    vocab = config["vocab_size"]
    model = build(config)
    out = {"transformers": transformers.__version__, "torch": torch.__version__}
    out["eager decode tokens/s, batch 1"] = decode_rate(model, 1, 128, 256, vocab)
    out["eager decode tokens/s, batch 64"] = decode_rate(model, 64, 512, 128, vocab)
    for n in (512, 2048):
        out[f"eager prefill tokens/s, {n} tokens"] = prefill_rate(model, n, vocab)
    print(json.dumps(out, indent=1), flush=True)
    if args.compile:
        try:
            model.generation_config.cache_implementation = "static"
            model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
            out["static+compile decode tokens/s, batch 1"] = decode_rate(model, 1, 128, 256, vocab)
        except Exception as e:  # the peer's failure is a result too
            out["static+compile error"] = f"{type(e).__name__}: {str(e)[:300]}"
    args.json.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
