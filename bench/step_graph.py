"""Batch-1 greedy decode with Relax's CUDA graphs against whole-step graphs
(kiln.runtime.step_graph), on one artifact in one process, rounds alternating.

    python bench/step_graph.py ARTIFACT [--steps 256] [--rounds 3]

Each round prefills a 128-token prompt and times `steps` greedy passes (Runner.decode_greedy);
the first round of each way is a warm-up (whole-step graphs capture there, once a page count).
It prints tokens/s next to the decode roofline of the card's copy bandwidth, and a hash of the
tokens, which both ways must share.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

PROMPT = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from kiln.runtime.benchmark import copy_bandwidth, decode_step_bytes
    from kiln.runtime.runner import Runner

    runner = Runner(args.artifact, "cuda", max_batch_size=1, kv_tokens=4096, step_graphs=True)
    graphs = runner.step_graphs
    rng = np.random.default_rng(0)
    prompt = [1, *rng.integers(3, runner.vocab_size, PROMPT - 1).tolist()]
    roof = copy_bandwidth(runner.device) / decode_step_bytes(runner, 1, PROMPT, args.steps)

    def round_(whole_step: bool) -> tuple[float, int]:
        runner.step_graphs = graphs if whole_step else None
        runner.kv.add(0)
        first = int(np.argmax(runner.prefill([0], [prompt])[0]))
        began = time.perf_counter()
        tokens = runner.decode_greedy([0], [first], args.steps)
        seconds = time.perf_counter() - began
        runner.kv.remove(0)
        return args.steps / seconds, hash(tuple(t[0] for t in tokens))

    for whole_step in (False, True):
        round_(whole_step)  # warm-up
    print(f"roofline {roof:.1f} tok/s; {graphs.captures} graphs captured in the warm-up")
    for _ in range(args.rounds):
        for whole_step in (False, True):
            rate, tokens = round_(whole_step)
            way = "whole-step graphs" if whole_step else "Relax's graphs  "
            print(f"{way}: {rate:7.1f} tok/s, {1e3 / rate:.3f} ms a step, "
                  f"{100 * rate / roof:.1f}% of the roofline, tokens {tokens}")  # fmt: skip
    if graphs.off:
        print(f"whole-step graphs went off: {graphs.off}")


if __name__ == "__main__":
    main()
