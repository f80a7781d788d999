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
    also by the next request; a request whose KV a prefix-cache entry shares runs without them."""
    off = {"device": "cuda", "max_batch_size": 2, "step_graphs": False}
    with kiln.Engine(artifact, prefix_cache=False, **off) as engine:
        want = [_greedy(engine, ids), _sampled(engine, ids)]
    on = {**off, "step_graphs": True}
    with kiln.Engine(artifact, prefix_cache=False, **on) as engine:
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
    # With the prefix cache (as `kiln serve` runs), a lone request runs unforked (graphs), its
    # finished prompt and reply become an entry; the same prompt again forks that entry (two
    # depths of blocks, merged by their lse: other arithmetic than one block), without graphs.
    with kiln.Engine(artifact, **off) as engine:
        want_shared = [_greedy(engine, ids), _greedy(engine, ids)]
    with kiln.Engine(artifact, **on) as engine:
        engine.start()  # as the server runs it: steps (and captures) on the engine's thread
        graphs = engine.runner.step_graphs
        shared = [_greedy(engine, ids)]
        assert graphs.captures == sum(counts.count(c) >= 2 for c in set(counts))
        captured = graphs.captures
        shared.append(_greedy(engine, ids))
        assert graphs.captures == captured and engine.stats.cached_tokens > 0
        assert graphs.off is None
    assert shared == want_shared and shared[0] == want[0]
    differ = [i for i, (a, b) in enumerate(zip(want_shared[1], want[0], strict=True)) if a != b]
    print(f"a prefix-cache hit against none: the greedy tokens first differ at {differ[:1]}")
