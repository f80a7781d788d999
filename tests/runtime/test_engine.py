"""kiln.Engine: continuous batching, chunked prefill, prefix caching, preemption, cancel,
the background thread and asyncio, against requests run alone and against transformers."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
import tvm_ffi

import kiln
from kiln.runtime.engine import STEP_SECONDS, greedy_steps_cap
from kiln.runtime.errors import KilnError

GREEDY = {"temperature": 0, "ignore_eos": True}


def random_prompt(rng: np.random.Generator, n: int, vocab: int = 320) -> list[int]:
    return [1, *rng.integers(3, vocab, n - 1).tolist()]


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
        )
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def llama(artifact):
    return artifact("llama")


@pytest.fixture(scope="module")
def alone(llama):
    """Greedy ids of a request run on its own (kiln.load, one request at a time)."""
    model = kiln.load(llama)
    return lambda ids, n: model.generate_ids(ids, max_tokens=n, **GREEDY)


def run_staggered(engine, schedule: list[tuple[int, list[int], int]]) -> dict:
    """Submit (step, prompt, max_tokens) requests when the engine reaches `step`; run to the
    end. Returns {index: RequestOutput}."""
    handles, step = {}, 0
    while len(handles) < len(schedule) or engine.step():
        for i, (at, ids, n) in enumerate(schedule):
            if at == step:
                handles[i] = engine.submit(ids, max_tokens=n, **GREEDY)
        if len(handles) < len(schedule):
            engine.step()
        step += 1
        assert step < 2000, "the engine stopped making progress"
    return {i: h.result() for i, h in handles.items()}


def test_24_staggered_requests_equal_alone_and_transformers(llama, alone, checkpoint, reference):
    rng = np.random.default_rng(0)
    schedule = [
        (int(rng.integers(0, 12)), random_prompt(rng, int(rng.integers(1, 80))), int(n))
        for n in rng.integers(1, 24, 24)
    ]
    engine = kiln.Engine(llama, max_batch_size=8, prefill_chunk=48)
    outputs = run_staggered(engine, schedule)
    ref = reference(checkpoint("llama"))
    for i, (_, ids, n) in enumerate(schedule):
        out = outputs[i]
        assert out.finish_reason == "length"
        assert out.usage.completion_tokens == n
        assert out.token_ids == alone(ids, n), f"request {i}"
        assert out.token_ids == hf_greedy(ref, ids, n), f"request {i}"
    stats = engine.stats
    assert stats.running == stats.waiting == 0
    assert stats.decode_tokens > stats.steps / 2  # requests really shared decode passes


def test_sliding_window_batches_match_transformers(artifact, checkpoint, reference):
    """Mistral (window 16): prompts longer than the window, prefilled together in one pass
    (each sequence's chunk stays within the window), decoded past it."""
    rng = np.random.default_rng(1)
    requests = [(random_prompt(rng, int(rng.integers(5, 50))), 12) for _ in range(5)]
    engine = kiln.Engine(artifact("mistral"), max_batch_size=8)
    assert engine.runner.sequence_chunk == 16
    outputs = engine.generate([ids for ids, _ in requests], max_tokens=12, **GREEDY)
    ref = reference(checkpoint("mistral"))
    for (ids, n), out in zip(requests, outputs, strict=True):
        assert out.token_ids == hf_greedy(ref, ids, n)


def test_sliding_window_shares_prefixes_only_within_the_window(
    custom_checkpoint, tmp_path, reference
):
    """Mistral with a 48-token window: requests sharing a two-page prefix fork it when prompt +
    max_tokens fit the window, and equal transformers; requests that outgrow the window
    recompute it (TVM's window kernels are not exact across a fork there) and equal it too."""
    ckpt = custom_checkpoint("mistral", sliding_window=48)
    art = kiln.compile(ckpt, output=tmp_path / "artifact")
    ref = reference(ckpt)
    rng = np.random.default_rng(11)
    shared = random_prompt(rng, 32)
    prompts = [shared + rng.integers(3, 320, 6).tolist() for _ in range(3)]
    for max_tokens, cached in ((10, 32), (20, 0)):  # 38 + 10 fits the window, 38 + 20 not
        engine = kiln.Engine(art, max_batch_size=4)
        for ids in prompts:  # one after another, so the later ones find the first's prefix
            out = engine.submit(ids, max_tokens=max_tokens, **GREEDY).result()
            assert out.token_ids == hf_greedy(ref, ids, max_tokens)
            assert out.usage.cached_tokens == (cached if ids is not prompts[0] else 0)


def test_chunked_prefill_keeps_others_decoding(llama):
    engine = kiln.Engine(llama, max_batch_size=4, prefill_chunk=16)
    rng = np.random.default_rng(2)
    short = engine.submit(random_prompt(rng, 5), max_tokens=40, **GREEDY)
    engine.step()
    engine.step()
    long = engine.submit(random_prompt(rng, 120), max_tokens=4, **GREEDY)
    counts = []
    while not long._deltas:
        engine.step()
        counts.append(len(short._deltas))
    # The 120-token prompt took several steps, and each of them decoded the short request.
    assert len(counts) >= 120 // 16
    assert np.all(np.diff(counts) == 1)
    engine.run_until_idle()
    assert long.result().finish_reason == short.result().finish_reason == "length"


def test_shared_prefix_uses_fewer_pages_and_same_outputs(llama, alone):
    rng = np.random.default_rng(3)
    shared = random_prompt(rng, 48)  # three 16-token pages
    a = shared + rng.integers(3, 320, 5).tolist()
    b = shared + rng.integers(3, 320, 7).tolist()

    def run(prefix_cache: bool):
        engine = kiln.Engine(llama, max_batch_size=4, prefix_cache=prefix_cache)
        ha = engine.submit(a, max_tokens=10, **GREEDY)
        engine.step()  # a's prompt is in the cache (and, with caching on, its prefix too)
        hb = engine.submit(b, max_tokens=10, **GREEDY)
        lowest = engine.stats.free_pages
        while engine.step():
            lowest = min(lowest, engine.stats.free_pages)
        return engine.stats.total_pages - lowest, ha.result(), hb.result()

    used_with, a_with, b_with = run(True)
    used_without, a_without, b_without = run(False)
    assert used_with == used_without - 3
    assert b_with.usage.cached_tokens == 48 and b_without.usage.cached_tokens == 0
    assert a_with.token_ids == a_without.token_ids == alone(a, 10)
    assert b_with.token_ids == b_without.token_ids == alone(b, 10)


def test_a_finished_turn_with_its_reply_is_the_next_turns_prefix(llama, alone):
    """A lone request stays unforked while it runs (whole-step graphs need its KV in one
    block); when it finishes, its prompt and reply become the entry that the conversation's
    next turn forks: cached tokens past the first prompt, and the output of the whole prompt."""
    rng = np.random.default_rng(12)
    first = random_prompt(rng, 30)
    engine = kiln.Engine(llama, max_batch_size=2)
    handle = engine.submit(first, max_tokens=25, **GREEDY)
    while engine.step():
        assert not engine.kv.forked and len(engine.prefix_cache) == 0
    reply = handle.result().token_ids
    assert len(engine.prefix_cache) == 1
    # 30 + 24 tokens computed (the last reply token was never fed): 3 whole pages of 16
    second = first + reply + random_prompt(rng, 6)[1:]
    out = engine.submit(second, max_tokens=8, **GREEDY).result()
    assert out.usage.cached_tokens == 48
    assert out.token_ids == alone(second, 8)


def test_a_request_admitted_later_shares_a_running_ones_reply_so_far(llama, alone):
    """A request that arrives while another runs finds the other's computed tokens, its reply
    so far included (they become an entry just before it is admitted); neither output moves."""
    rng = np.random.default_rng(13)
    a = random_prompt(rng, 20)
    a_reply = alone(a, 40)
    b = a + a_reply[:34] + random_prompt(rng, 4)[1:]
    engine = kiln.Engine(llama, max_batch_size=2)
    ha = engine.submit(a, max_tokens=40, **GREEDY)
    while len(ha._deltas) < 34:  # a's 20 + 33 tokens computed, 3 whole pages
        engine.step()
    hb = engine.submit(b, max_tokens=6, **GREEDY)
    engine.run_until_idle()
    assert ha.result().token_ids == a_reply
    assert hb.result().usage.cached_tokens == 48
    assert hb.result().token_ids == alone(b, 6)


def test_prefix_cache_evicts_least_recently_used_when_pages_run_out(llama, alone):
    rng = np.random.default_rng(4)
    engine = kiln.Engine(llama, max_batch_size=2, kv_tokens=160)  # 10 pages
    prompts = [random_prompt(rng, 40) for _ in range(6)]  # 2 cacheable pages each
    for ids in prompts:
        assert engine.submit(ids, max_tokens=6, **GREEDY).result().token_ids == alone(ids, 6)
    cache = engine.prefix_cache
    assert 0 < len(cache) < len(prompts)
    # The newest prompts survive: their prefixes are hits, the oldest is a miss.
    assert cache.match(prompts[-1]) is not None
    assert cache.match(prompts[0]) is None


def test_pool_too_small_preempts_and_every_request_completes(llama, alone):
    rng = np.random.default_rng(5)
    requests = [(random_prompt(rng, int(rng.integers(10, 60))), int(rng.integers(10, 40)))
                for _ in range(10)]  # fmt: skip
    engine = kiln.Engine(llama, max_batch_size=8, kv_tokens=128, prefill_chunk=32)
    assert engine.stats.total_pages < sum(len(ids) + n for ids, n in requests) // 16
    handles = [engine.submit(ids, max_tokens=n, **GREEDY) for ids, n in requests]
    outputs = [h.result() for h in handles]
    assert engine.stats.preemptions > 0
    for (ids, n), out in zip(requests, outputs, strict=True):
        assert out.finish_reason == "length"
        assert out.token_ids == alone(ids, n)
    engine.prefix_cache.clear()
    assert engine.stats.free_pages == engine.stats.total_pages


def test_cancel_mid_stream_frees_pages(llama):
    engine = kiln.Engine(llama, max_batch_size=4, prefix_cache=False)
    free = engine.stats.free_pages
    rng = np.random.default_rng(6)
    other = engine.submit(random_prompt(rng, 30), max_tokens=30, **GREEDY)
    handle = engine.submit(random_prompt(rng, 70), max_tokens=100, **GREEDY)
    tokens = handle.tokens()
    first = [next(tokens) for _ in range(3)]
    held = free - engine.stats.free_pages
    handle.cancel()
    out = handle.result()
    assert out.finish_reason == "cancelled" and out.token_ids[:3] == first
    assert free - engine.stats.free_pages < held - 4  # the 70-token sequence's pages came back
    assert other.result().finish_reason == "length"  # the other request went on
    assert engine.stats.free_pages == free


def test_background_thread_and_asyncio(llama, alone):
    rng = np.random.default_rng(7)
    prompts = [random_prompt(rng, int(n)) for n in rng.integers(3, 40, 6)]

    async def serve(engine):
        outputs = await asyncio.gather(
            *(engine.generate_async(ids, max_tokens=8, **GREEDY) for ids in prompts)
        )
        handle = engine.submit(prompts[0], max_tokens=8, **GREEDY)
        streamed = [d.token async for d in handle.adeltas()]
        return outputs, streamed

    with kiln.Engine(llama, max_batch_size=4) as engine:
        outputs, streamed = asyncio.run(serve(engine))
        assert engine.running_in_background
        # Synchronous readers wait on the thread instead of stepping themselves.
        again = engine.submit(prompts[1], max_tokens=8, **GREEDY).result()
        assert again.token_ids == outputs[1].token_ids
    assert not engine.running_in_background
    for ids, out in zip(prompts, outputs, strict=True):
        assert out.token_ids == alone(ids, 8)
    assert streamed == outputs[0].token_ids


def test_text_stream_and_output_fields(artifact):
    engine = kiln.Engine(artifact("tiny-llama"), max_batch_size=2)
    model = kiln.load(artifact("tiny-llama"))
    prompt = "def fibonacci(n):"
    full = model.generate(prompt, max_tokens=30, temperature=0)
    handle = engine.submit(prompt, max_tokens=30, temperature=0)
    pieces = list(handle)
    out = handle.result()
    assert "".join(pieces) == out.text == full
    assert out.usage.prompt_tokens == len(engine.tokenizer.encode(prompt))
    assert out.time_to_first_token is not None and out.latency >= out.time_to_first_token
    stop = full[8:12]
    cut = engine.submit(prompt, max_tokens=30, temperature=0, stop=stop).result()
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)]
    token = out.token_ids[4]
    eos = engine.submit(prompt, max_tokens=30, temperature=0, stop_token_ids=[token]).result()
    assert eos.token_ids == out.token_ids[: out.token_ids.index(token) + 1]
    assert eos.finish_reason == "stop"

    async def stream() -> list[str]:
        return [piece async for piece in engine.submit(prompt, max_tokens=30, temperature=0)]

    assert "".join(asyncio.run(stream())) == full
    engine.close()


def test_a_failing_pass_fails_its_requests_not_the_engine(llama, alone, monkeypatch):
    engine = kiln.Engine(llama, max_batch_size=4, prefix_cache=False)
    rng = np.random.default_rng(8)
    ids = random_prompt(rng, 20)
    real = engine.runner.decode

    def broken(*args, **kwargs):
        monkeypatch.setattr(engine.runner, "decode", real)
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "decode", broken)
    failed = engine.submit(ids, max_tokens=5, **GREEDY)
    assert failed.result().finish_reason == "error"
    assert "device lost" in failed.result().error
    with pytest.raises(KilnError, match="device lost"):
        list(failed.tokens())
    assert engine.stats.free_pages == engine.stats.total_pages
    assert engine.submit(ids, max_tokens=5, **GREEDY).result().token_ids == alone(ids, 5)


def test_bad_submissions(llama):
    engine = kiln.Engine(llama, max_batch_size=2, kv_tokens=64)
    assert engine.context_length == 64  # a request never outgrows the cache
    with pytest.raises(KilnError, match="context"):
        engine.submit([1] * 65)
    with pytest.raises(KilnError, match="no tokenizer"):
        engine.submit("text needs a tokenizer")
    with pytest.raises(KilnError, match="stop strings"):
        engine.submit([1, 2], stop=["x"])
    with pytest.raises(KilnError, match="max_batch_size"):
        kiln.Engine(llama, max_batch_size=0)
    with pytest.raises(KilnError, match="kv_tokens or kv_memory"):
        kiln.Engine(llama, kv_tokens=64, kv_memory=1 << 20)


# -- greedy passes in a row (decode_steps) -----------------------------------------------------


def test_greedy_bursts_equal_single_passes_and_transformers(llama, alone, checkpoint, reference):
    """Staggered requests with up to 4 passes a step: requests start between bursts, bursts
    stop short of every request's max_tokens, and each request's tokens are its own."""
    rng = np.random.default_rng(12)
    schedule = [
        (int(rng.integers(0, 20)), random_prompt(rng, int(rng.integers(1, 60))), int(n))
        for n in rng.integers(1, 30, 12)
    ]
    engine = kiln.Engine(llama, max_batch_size=4, prefill_chunk=48, decode_steps=4)
    calls = []
    burst = engine.runner.decode_greedy
    engine.runner.decode_greedy = lambda *a: calls.append(a[2]) or burst(*a)
    outputs = run_staggered(engine, schedule)
    ref = reference(checkpoint("llama"))
    for i, (_, ids, n) in enumerate(schedule):
        assert outputs[i].finish_reason == "length"
        assert outputs[i].token_ids == alone(ids, n), f"request {i}"
        assert outputs[i].token_ids == hf_greedy(ref, ids, n), f"request {i}"
    assert calls and max(calls) == 4 and min(calls) < 4  # full bursts, and ones cut short
    assert engine.stats.decode_tokens == sum(n - 1 for _, _, n in schedule)
    engine.prefix_cache.clear()
    assert engine.stats.free_pages == engine.stats.total_pages


def test_greedy_bursts_take_fewer_steps_and_stop_within_a_burst(llama, alone):
    rng = np.random.default_rng(13)
    ids = random_prompt(rng, 20)
    full = alone(ids, 9)
    one = kiln.Engine(llama, max_batch_size=2, prefix_cache=False, decode_steps=1)
    four = kiln.Engine(llama, max_batch_size=2, prefix_cache=False, decode_steps=4)
    for engine in (one, four):
        assert engine.submit(ids, max_tokens=9, **GREEDY).result().token_ids == full
    assert one.stats.steps == 9  # the prefill's token, then one decode pass a step
    assert four.stats.steps == 3  # the prefill's token, then 4 + 4
    # A stop token that is the 3rd of a burst: the request ends there, and so do the passes.
    stop = full[3]
    passes = []
    decode_1 = four.runner._decode_1
    four.runner._decode_1 = lambda *args: passes.append(1) or decode_1(*args)
    cut = four.submit(ids, max_tokens=9, temperature=0, stop_token_ids=[stop]).result()
    assert cut.finish_reason == "stop" and cut.token_ids == full[: full.index(stop) + 1]
    assert len(passes) == full.index(stop)  # a pass for each token after the prefill's
    assert four.stats.decode_tokens == 8 + len(cut.token_ids) - 1
    assert four.stats.free_pages == four.stats.total_pages
    # Another request goes on with its own tokens while one stops within a burst (whose later
    # tokens are dropped, and its sequence, longer by them, freed).
    other = random_prompt(rng, 33)
    handles = [
        four.submit(ids, max_tokens=9, temperature=0, stop_token_ids=[stop]),
        four.submit(other, max_tokens=12, **GREEDY),
    ]
    assert handles[0].result().token_ids == cut.token_ids
    assert handles[1].result().token_ids == alone(other, 12)


def test_greedy_bursts_fall_back_to_single_passes(llama, alone):
    """No burst where its pages are not free (none are evicted for it) or where a request
    samples; the tokens are the same either way."""
    rng = np.random.default_rng(14)
    ids, other = random_prompt(rng, 14), random_prompt(rng, 14)
    # 3 pages of 16 tokens: after both prompts (a page each), a burst of 4 would need a page
    # for each request, and one is free.
    engine = kiln.Engine(llama, max_batch_size=2, kv_tokens=48, prefix_cache=False,
                         decode_steps=4)  # fmt: skip
    single = []
    decode = engine.runner.decode
    engine.runner.decode = lambda seq_ids, *a, **k: (
        single.append(len(seq_ids)) or decode(seq_ids, *a, **k)
    )
    outs = engine.generate([ids, other], max_tokens=10, **GREEDY)
    assert [o.token_ids for o in outs] == [alone(ids, 10), alone(other, 10)]
    assert single[0] == 2  # both decode, greedy, far from max_tokens: one pass for the pages
    sampled = kiln.Engine(llama, max_batch_size=2, prefix_cache=False, decode_steps=4)
    handles = [
        sampled.submit(ids, max_tokens=6, **GREEDY),
        sampled.submit(ids, max_tokens=6, temperature=0.8, seed=1),
    ]
    assert handles[0].result().token_ids == alone(ids, 6)
    assert len(handles[1].result().token_ids) == 6
    assert sampled.stats.steps == 6  # a sampling request in the batch: one pass a step
    with pytest.raises(KilnError, match="decode_steps"):
        kiln.Engine(llama, decode_steps=0)


def test_greedy_steps_are_held_to_a_time_on_gpus(llama, alone):
    """By default a GPU's steps run only as many passes as take STEP_SECONDS at the last
    passes' speed; a number given is the number run (no time cap), and the CPU runs one."""
    assert greedy_steps_cap(8, STEP_SECONDS, 0.0025) == 8  # a 7B at batch 1: 20 would fit
    assert greedy_steps_cap(8, 0.05, 0.014) == 3
    assert greedy_steps_cap(8, 0.05, 0.06) == 1  # a slow model: one a step
    assert greedy_steps_cap(8, 0.05, 0.0) == 8  # no pass timed yet
    assert greedy_steps_cap(8, None, 1.0) == 8
    default = kiln.Engine(llama)
    assert (default.decode_steps, default.step_seconds) == (1, None)  # the CPU
    engine = kiln.Engine(llama, max_batch_size=2, prefix_cache=False, decode_steps=8)
    assert engine.step_seconds is None
    engine.step_seconds = 1e-9  # as a GPU's default, with passes far slower than the budget
    ids = random_prompt(np.random.default_rng(16), 20)
    assert engine.submit(ids, max_tokens=14, **GREEDY).result().token_ids == alone(ids, 14)
    # the prefill's token; 8 passes while none was timed; then one a step for the other 5
    assert engine.stats.steps == 1 + 1 + 5


def test_a_failing_burst_fails_its_requests_not_the_engine(llama, alone, monkeypatch):
    engine = kiln.Engine(llama, max_batch_size=2, prefix_cache=False, decode_steps=4)
    ids = random_prompt(np.random.default_rng(15), 20)

    def broken(*args, **kwargs):
        monkeypatch.undo()
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "decode_greedy", broken)
    failed = engine.submit(ids, max_tokens=6, **GREEDY).result()
    assert failed.finish_reason == "error" and "device lost" in failed.error
    assert engine.stats.free_pages == engine.stats.total_pages
    assert engine.submit(ids, max_tokens=6, **GREEDY).result().token_ids == alone(ids, 6)


def test_kv_bookkeeping_follows_the_cache(llama):
    """PagedKV's lengths and forked set (what a whole-step graph is keyed by) against TVM's own
    query positions: a one-token pass of a sequence of n tokens asks position n. The engine's
    prefix cache forks each request's sequence, which then counts as forked, as does its entry."""
    positions = tvm_ffi.get_global_func("vm.builtin.attention_kv_cache_get_query_positions")
    with kiln.Engine(llama, max_batch_size=2) as engine:
        kv, runner = engine.kv, engine.runner
        kv.add(100)
        runner.prefill([100], [list(range(1, 21))])
        kv.fork(100, 101, 16)
        for seq, want in ((100, 20), (101, 16)):
            assert kv.lengths[seq] == want
            kv.begin([seq], [1])
            assert positions(kv.cache).numpy().tolist() == [want]
            kv.end()
            assert kv.lengths[seq] == want + 1
        assert kv.forked == {100, 101}
        kv.remove(101)
        assert kv.forked == {100} and 101 not in kv.lengths
        kv.remove(100)

        ids = random_prompt(np.random.default_rng(5), 40)
        engine.generate([ids], max_tokens=3, **GREEDY)
        assert kv.lengths and set(kv.lengths) == kv.forked  # the prefix cache's entry alone


def test_greedy_passes_stopped_early_leave_the_cache_as_they_ran(llama):
    """Runner.decode_greedy begins each next pass in the cache while the last one runs; a stop
    takes that back: the cache (lengths, TVM's next position, free pages) is as after the
    passes that ran, and the sequences go on to the tokens of an unstopped run."""
    positions = tvm_ffi.get_global_func("vm.builtin.attention_kv_cache_get_query_positions")
    rng = np.random.default_rng(17)
    prompts = [random_prompt(rng, n) for n in (15, 30)]  # 15 + 1 starts a page of 16
    runs = []
    for stop_after in (6, 1, 3):  # 6: not stopped
        with kiln.Engine(llama, max_batch_size=2, prefix_cache=False) as engine:
            kv, runner = engine.kv, engine.runner
            for seq, ids in enumerate(prompts):
                kv.add(seq)
                runner.prefill([seq], [ids])
            free = kv.free_pages()
            seen = []

            def done(tokens: list[int], seen: list = seen, stop_after: int = stop_after) -> bool:
                seen.append(tokens)
                return len(seen) == stop_after

            tokens = runner.decode_greedy([0, 1], [5, 7], 6, done)
            assert len(tokens) == stop_after
            assert [kv.lengths[0], kv.lengths[1]] == [15 + stop_after, 30 + stop_after]
            assert kv.free_pages() == free - kv.new_pages(15, stop_after) - kv.new_pages(
                30, stop_after
            )
            kv.begin([0, 1], [1, 1])
            assert positions(kv.cache).numpy().tolist() == [15 + stop_after, 30 + stop_after]
            kv.undo_begin([0, 1])
            if stop_after < 6:
                tokens += runner.decode_greedy([0, 1], tokens[-1], 6 - stop_after)
            runs.append(tokens)
    assert runs[1] == runs[0] and runs[2] == runs[0]


def test_greedy_passes_hand_over_each_pass_while_the_next_runs(llama):
    """Runner.decode_greedy's `each` gets every pass's tokens, in order, once the next pass is
    queued (so the engine's work on them overlaps it): the cache holds that next pass's token
    when it is called, except for the last pass, and for a pass a stop ends the run at."""
    rng = np.random.default_rng(19)
    with kiln.Engine(llama, max_batch_size=2, prefix_cache=False) as engine:
        kv, runner = engine.kv, engine.runner
        for seq, n in enumerate((12, 20)):
            kv.add(seq)
            runner.prefill([seq], [random_prompt(rng, n)])
        for steps, stop in ((5, None), (5, 2)):
            start = kv.lengths[0]
            seen, lengths = [], []

            def each(tokens: list[int], seen: list = seen, lengths: list = lengths) -> None:
                seen.append(tokens)
                lengths.append(kv.lengths[0])

            done = (
                None if stop is None else (lambda _t, seen=seen, stop=stop: len(seen) == stop - 1)
            )
            picked = runner.decode_greedy([0, 1], [5, 7], steps, done, each)
            assert seen == picked and len(picked) == (stop or steps)
            ran = len(picked)
            # each(k) once pass k + 1 is queued, when the cache holds pass k + 2's token too
            # (begun ahead, up to `steps`); the last pass's, or the stopped one's, at the end
            ahead = [min(start + k + 2, start + steps) for k in range(1, ran)]
            assert lengths == [*ahead, start + ran]


def test_step_graphs_are_refused_off_cuda_when_asked_and_skipped_by_default(llama):
    with pytest.raises(KilnError, match=r"one CUDA GPU.*: leave out step_graphs"):
        kiln.Engine(llama, step_graphs=True)
    with kiln.Engine(llama) as engine:  # step_graphs=None: where they run
        assert engine.runner.step_graphs is None
