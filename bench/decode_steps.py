"""Greedy decode with 1 to N passes a step (`kiln.Engine(decode_steps=...)`): tokens/s at each
batch size, one artifact in one process, each next to its memory roofline, and whether every
setting gives the same tokens as one pass a step.

    python bench/decode_steps.py ARTIFACT [--steps 1,2,4,8,16] [--batches 1,8,64] [--device cuda]
                                          [--repeats 3]

Batch 1 is `kiln bench`'s (a 128-token prompt, 256 new tokens), larger batches 512-token
prompts and 128 new tokens each, timed over the steps in which every request decodes; each
figure is the best of `--repeats` runs.
"""

from __future__ import annotations

import argparse

import numpy as np

import kiln
from kiln.runtime.benchmark import batched_decode, copy_bandwidth, decode_step_bytes

GREEDY = {"temperature": 0, "ignore_eos": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", default="1,2,4,8,16")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    batches = [int(b) for b in args.batches.split(",")]

    # No prefix cache: every run prefills its prompts afresh, so that the settings' tokens are
    # comparable (a prompt forked from the cache is prefilled in other chunks, which rounds
    # differently, and random weights give near-ties that such differences flip).
    with kiln.Engine(
        args.artifact, args.device, max_batch_size=max(batches), prefix_cache=False
    ) as engine:
        runner = engine.runner
        bandwidth = copy_bandwidth(runner.device)
        print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; default decode_steps "
              f"{engine.decode_steps}", flush=True)  # fmt: skip
        rng = np.random.default_rng(0)
        engine.generate([[1, 2, 3]] * 2, max_tokens=4, **GREEDY)  # warm-up
        for batch in batches:
            length, new = (128, 256) if batch == 1 else (512, 128)
            prompts = [[1, *rng.integers(3, runner.vocab_size, length - 1).tolist()]
                       for _ in range(batch)]  # fmt: skip
            roof = batch / (decode_step_bytes(runner, batch, length, new) / bandwidth)
            first = None

            def tokens(prompts=prompts, new=new) -> list[list[int]]:
                return [o.token_ids for o in engine.generate(prompts, max_tokens=new, **GREEDY)]

            for n in steps:
                engine.decode_steps, engine.step_seconds = n, None  # n passes, whatever they take
                rate = max(batched_decode(engine, prompts, new) for _ in range(args.repeats))
                got = tokens()
                if first is None:
                    first = got
                    if tokens() != first:
                        print("the first setting gives other tokens when run again", flush=True)
                same = "same tokens" if got == first else "TOKENS DIFFER from the first setting"
                print(f"batch {batch:3d}, {n:2d} passes a step: {rate:9.1f} tok/s "
                      f"({100 * rate / roof:.1f}% of {roof:.0f}), {same}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
