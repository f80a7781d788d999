"""Batched greedy decode with and without the batched decode's CUDA graphs (the artifact's
batch_graphs entry: Relax's graphs captured per batch size), on one artifact in one process,
rounds alternating.

    python bench/batch_graphs.py ARTIFACT [--batches 8,32,64,128] [--steps 128] [--rounds 2]
                                          [--all-sizes]

Each round prefills `batch` 512-token prompts and times `steps` greedy passes of them all
(Runner.decode_greedy, as the engine runs them); each batch size's graphs are captured before
its first round (as a server's later steps find them). It prints tokens/s next to the decode
roofline of the card's copy bandwidth (weights once a step plus the K/V read), and a hash of
the tokens, which both ways must share. `--all-sizes` first runs a pass of every batch size
from 2 to the bound with graphs (capturing them), then without, and prints the time and GPU
memory each took.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

PROMPT = 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--batches", default="8,32,64,128")
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--all-sizes", action="store_true")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    from kiln.runtime.benchmark import copy_bandwidth, decode_step_bytes
    from kiln.runtime.runner import Runner

    most = max(batches)
    runner = Runner(
        args.artifact, "cuda", max_batch_size=most, kv_tokens=most * (PROMPT + args.steps) + 4096,
        prefill_chunk=8192, step_graphs=False,
    )  # fmt: skip
    graphs = runner.batch_graphs
    if graphs is None:
        raise SystemExit(f"{args.artifact} has no batched decode graphs (compile it again)")
    bandwidth = copy_bandwidth(runner.device)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")

    def start(batch: int, length: int, seed: int = 0) -> list[int]:
        """Sequences 0..batch-1 prefilled with `length`-token prompts; their first tokens."""
        rng = np.random.default_rng(seed)
        first = []
        per_pass = max(1, runner.prefill_chunk // length)
        for at in range(0, batch, per_pass):
            seqs = list(range(at, min(batch, at + per_pass)))
            for s in seqs:
                runner.kv.add(s)
            prompts = [[1, *rng.integers(3, runner.vocab_size, length - 1).tolist()] for _ in seqs]
            first += runner.prefill(seqs, prompts, on_device=True).greedy()
        return first

    def stop(batch: int) -> None:
        for s in range(batch):
            runner.kv.remove(s)

    def capture(batch: int, graphed: bool = True) -> None:
        """A pass of `batch` one-token sequences: with graphs, it captures them."""
        runner.batch_graphs = graphs if graphed else None
        ids = list(range(batch))
        for s in ids:
            runner.kv.add(s)
        runner.prefill(ids, [[1]] * batch, on_device=True)
        runner.decode(ids, [1] * batch, on_device=True)
        stop(batch)

    if args.all_sizes:
        # With graphs first: their static memory, and each size's logits, which its graph
        # keeps (a replay writes them where the capture did); then without, where the VM's pool
        # keeps a buffer of each size a pass allocates.
        for graphed in (True, False):
            free = runner.device.available_global_memory
            began = time.perf_counter()
            for batch in range(2, runner.batch_graph_max + 1):
                capture(batch, graphed)
            seconds = time.perf_counter() - began
            used = (free - runner.device.available_global_memory) / 2**20
            print(f"batch sizes 2..{runner.batch_graph_max} {'with' if graphed else 'without'} "
                  f"graphs: {seconds:.1f} s, {used:.0f} MiB more GPU memory")  # fmt: skip

    def round_(batch: int, graphed: bool, seed: int) -> tuple[float, int]:
        runner.batch_graphs = graphs if graphed else None
        first = start(batch, PROMPT, seed)
        began = time.perf_counter()
        tokens = runner.decode_greedy(list(range(batch)), first, args.steps)
        seconds = time.perf_counter() - began
        stop(batch)
        return batch * args.steps / seconds, hash(tuple(map(tuple, tokens)))

    for batch in batches:
        capture(batch)
        roof = batch * bandwidth / decode_step_bytes(runner, batch, PROMPT, args.steps)
        for seed in range(args.rounds):  # the same prompts both ways
            for graphed in (False, True):
                rate, tokens = round_(batch, graphed, seed)
                way = "graphs   " if graphed else "no graphs"
                print(f"batch {batch:3d} {way}: {rate:8.1f} tok/s, "
                      f"{1e3 * batch / rate:.3f} ms a step, {100 * rate / roof:.1f}% of the "
                      f"roofline, tokens {tokens}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
