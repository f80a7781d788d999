"""Whole-step CUDA graphs (kiln.runtime.step_graph) against Relax's graphs on one artifact,
shared by the GPU tests of artifacts on TVM's decode attention (tests/gpu/test_cuda.py) and
on Kiln's (tests/gpu/test_attention.py)."""

from __future__ import annotations

from pathlib import Path

import kiln

NEW_TOKENS = 70  # from a 45-token prompt: 5 page counts of 16 tokens


def _greedy(engine: kiln.Engine, ids: list[int]) -> list[int]:
    """Decoded by Runner.decode_greedy (passes in a row, each argmax fed to the next)."""
    out = engine.generate([ids], max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    return out[0].token_ids


def _sampled(engine: kiln.Engine, ids: list[int]) -> list[int]:
    """Decoded by Runner.decode (a pass a call, its logits to the sampling kernel)."""
    out = engine.generate([ids], max_tokens=40, temperature=0.9, seed=11, ignore_eos=True)
    return out[0].token_ids


def check_step_graphs(artifact: Path, ids: list[int]) -> None:
    """The same tokens with and without whole-step graphs, bit for bit (the same kernels run
    on the same inputs); a graph captured on a page count's second step and replayed after,
    also by the next request; a request whose KV the prefix cache shares runs without them."""
    with kiln.Engine(artifact, device="cuda", max_batch_size=2, prefix_cache=False) as engine:
        want = [_greedy(engine, ids), _sampled(engine, ids)]
    with kiln.Engine(
        artifact, device="cuda", max_batch_size=2, prefix_cache=False, step_graphs=True
    ) as engine:
        graphs = engine.runner.step_graphs
        first = _greedy(engine, ids)
        captured = graphs.captures
        page = engine.runner.page_size
        # lengths after each decode pass's token: the prompt's + 1 .. + NEW_TOKENS - 1
        counts = [-(-n // page) for n in range(len(ids) + 1, len(ids) + NEW_TOKENS)]
        assert captured == sum(counts.count(c) >= 2 for c in set(counts))
        again = _greedy(engine, ids)  # replays those, captures a page count seen once
        assert graphs.captures == captured + sum(counts.count(c) == 1 for c in set(counts))
        captured = graphs.captures
        sampled = _sampled(engine, ids)
        assert graphs.captures > captured  # decode's own graphs (logits, no argmax)
        assert graphs.off is None
    assert [first, sampled] == want and again == want[0]
    with kiln.Engine(artifact, device="cuda", max_batch_size=2, step_graphs=True) as engine:
        shared = _greedy(engine, ids)
        assert engine.runner.step_graphs.captures == 0  # forked by the prefix cache
    assert shared == want[0]
