"""kiln.runtime.step_graph's bookkeeping on the CPU: which steps it is given, keyed by what,
and its way back when a capture fails. The CPU cannot capture (its work runs as it is issued),
so a driver on host memory stands in for CUDA's: its copies are real (memmove between the
tensors' data), a capture fails as a failed capture on a GPU would. The captures themselves run
in tests/gpu (tests/step_graph_checks.py)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import tvm_ffi

import kiln
from kiln.runtime.step_graph import CudaDriver, StepGraphs

GREEDY = {"temperature": 0, "ignore_eos": True}


class HostDriver(CudaDriver):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def check(self, name: str, result: int) -> None:
        if result != 0:
            raise RuntimeError(f"{name}: no capture on the host")

    def call(self, name: str, *args) -> int:
        self.calls.append(name)
        if name == "cuStreamCreate":
            args[0]._obj.value = 1  # a handle for TVM's current stream, never used
        if name == "cuMemcpyDtoDAsync_v2":
            dst, src, size, _stream = args
            ctypes.memmove(dst.value, src.value, size.value)
        return 1 if name == "cuStreamBeginCapture_v2" else 0


@pytest.fixture(scope="module")
def llama(artifact):
    return artifact("llama")


def run(engine, prompts, **sampling):
    return [out.token_ids for out in engine.generate(prompts, **sampling)]


def test_lone_unforked_sequences_take_the_graph_path_keyed_by_page_count(llama):
    rng = np.random.default_rng(3)
    prompts = [[1, *rng.integers(3, 320, n).tolist()] for n in (20, 37)]
    positions = tvm_ffi.get_global_func("vm.builtin.attention_kv_cache_get_query_positions")
    settings = dict(max_batch_size=2, prefix_cache=False, decode_steps=4)
    with kiln.Engine(llama, **settings) as engine:
        want = [run(engine, [p], max_tokens=40, **GREEDY)[0] for p in prompts]
        want_sampled = run(engine, prompts[:1], max_tokens=12, temperature=0.8, seed=5)
        want_batch = run(engine, prompts, max_tokens=10, **GREEDY)
    with kiln.Engine(llama, **settings) as engine:
        runner = engine.runner
        graphs = runner.step_graphs = StepGraphs(runner, HostDriver(), entry="decode_1")
        keys = []
        step = graphs.step

        def spy(pages: int, greedy: bool):
            # the pass has begun: TVM asks the new token's position, one less than the length
            (position,) = positions(runner.kv.cache).numpy().tolist()
            assert pages == -(-(position + 1) // runner.page_size)
            keys.append((pages, greedy))
            return step(pages, greedy)

        graphs.step = spy
        relax_graphs = []  # steps on decode_1 itself, once capture is off
        decode_1 = graphs._decode_1
        graphs._decode_1 = lambda *args: relax_graphs.append(1) or decode_1(*args)
        with pytest.warns(UserWarning, match="whole-step CUDA graphs are off"):
            got = [run(engine, [p], max_tokens=40, **GREEDY)[0] for p in prompts]
        assert got == want
        assert graphs.off and "no capture on the host" in graphs.off
        # one step a pass: 39 decode passes for each prompt; the first capture was tried on
        # the second step of the first page count, and none after
        assert len(keys) == 2 * 39 and all(greedy for _, greedy in keys)
        assert graphs._cu.calls.count("cuStreamBeginCapture_v2") == 1
        assert len(relax_graphs) == 2 * 39 - 1  # all but the first step (before the capture)
        keys.clear()
        assert run(engine, prompts[:1], max_tokens=12, temperature=0.8, seed=5) == want_sampled
        assert len(keys) == 11 and not any(greedy for _, greedy in keys)
        keys.clear()
        assert run(engine, prompts, max_tokens=10, **GREEDY) == want_batch
        assert keys == []  # two sequences a pass: the batched decode


def test_forked_sequences_keep_the_usual_path(llama):
    ids = [1, *np.random.default_rng(4).integers(3, 320, 40).tolist()]
    with kiln.Engine(llama, max_batch_size=2) as engine:  # the prefix cache forks each request
        want = run(engine, [ids], max_tokens=20, **GREEDY)
        runner = engine.runner
        runner.step_graphs = StepGraphs(runner, HostDriver(), entry="decode_1")
        calls = []
        runner.step_graphs.step = lambda *args: calls.append(args)
        assert run(engine, [ids], max_tokens=20, **GREEDY) == want
        assert calls == []
