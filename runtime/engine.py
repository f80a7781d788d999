"""`kiln.Engine`: continuous batching over one compiled artifact.

Each `step()` does, under one lock:

1. take in new requests and cancellations (submit/cancel only queue them, from any thread);
2. schedule: every running request whose prompt is in the KV cache decodes one token; if the
   pages for that run short, prefix-cache entries are evicted, then the newest request is
   preempted (its sequence removed; later it recomputes prompt + generated tokens). The left
   over token budget (`prefill_chunk`) goes to prefill chunks, oldest request first, so a long
   prompt is spread over several steps and never stalls the others for its whole length;
3. one ragged prefill pass for the chunks, one batched decode pass for the rest;
4. sample each finished row with the request's own sampler, stream text, finish requests.

When every running request decodes greedily and none prefills, a step runs up to
`decode_steps` decode passes in a row instead (`Runner.decode_greedy`): each pass takes the
argmax of the one before where it lies on the device, and none of a step's other work
(scheduling, sampling, streaming text, counting) runs between them. A request that stops within
them keeps only its tokens up to the stop (its sequence is removed with the rest); no request is
taken past its max_tokens or the context, and the passes end when every request has met a stop
token.

Run it from a background thread (`start()`, needed by asyncio callers) or let readers of a
`RequestHandle` drive `step()` themselves. Pages are checked before every pass: TVM's cache
cannot undo a pass that runs out of pages (see kiln.runtime.kv).
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.runtime.errors import KilnError
from kiln.runtime.prefix_cache import PrefixCache
from kiln.runtime.request import (
    FINISHED,
    RUNNING,
    WAITING,
    Delta,
    Request,
    RequestHandle,
    RequestOutput,
)
from kiln.runtime.runner import Logits, Runner
from kiln.runtime.sampler import SamplingParams, TokenSampler

# The engine's KV sequence ids start here, clear of small ids a caller may use on the same
# cache through `Runner` (the tests do).
SEQ_ID_BASE = 1 << 20

# Greedy decode passes a GPU step runs in a row by default: at most DECODE_STEPS, and no more
# than take about STEP_SECONDS by the last passes' time, so that streamed text still arrives in
# 20 groups a second or more (8 passes of a 7B are ~20 ms at batch 1; at batch 64, 3 passes of
# ~14 ms); a slow model's passes go one a step, where a step's own work is small beside a pass.
DECODE_STEPS = 8
STEP_SECONDS = 0.05


def greedy_steps_cap(most: int, step_seconds: float | None, pass_seconds: float) -> int:
    """Passes a step may run in a row: `most`, or as many as take `step_seconds` at
    `pass_seconds` a pass (at least one; `most` while no pass has been timed)."""
    if step_seconds is None or pass_seconds <= 0:
        return most
    return max(1, min(most, int(step_seconds / pass_seconds)))


@dataclass(frozen=True)
class EngineStats:
    """Counters since the engine started. Host overhead is a step's wall time minus the time
    spent in the compiled entry points: scheduling, KV bookkeeping, sampling, detokenizing."""

    steps: int
    prefill_tokens: int
    decode_tokens: int
    preemptions: int
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    running: int
    waiting: int
    free_pages: int
    total_pages: int
    prefix_entries: int
    step_ms: float  # mean wall time of a step that ran a forward pass (or several: decode_steps)
    host_ms: float  # mean host overhead of such a step
    last_host_ms: float
    max_host_ms: float


class Engine:
    """Serve many requests from one artifact with continuous batching.

    `max_batch_size`: requests running at once (holding KV sequences). `kv_memory` (bytes) or
    `kv_tokens` sizes the paged KV cache (default: max_batch_size full contexts, at most 1 GiB
    on the CPU, 80% of free memory on a GPU). `prefill_chunk`: prompt tokens per step, all
    requests together. `prefix_cache`: share the KV pages of common prompt prefixes (with a
    sliding window, among requests whose prompt + max_tokens fit the window).
    `devices`: the GPUs of a tensor-parallel artifact (default cuda:0..N-1 for device "cuda");
    `session`: a Disco session to run in, for tests (kiln.runtime.runner.Runner).
    `decode_steps`: the most greedy decode passes a step runs in a row. By default on GPUs
    DECODE_STEPS, and only as many as take STEP_SECONDS at the last passes' speed
    (`step_seconds`); on the CPU 1, where a step's own work is small beside a pass. Tokens then
    stream in groups of up to this many, and a new request waits up to as many passes to start.
    `step_graphs`: a lone request's decode steps as whole-step CUDA graphs, where its KV is not
    shared with a prefix-cache entry: None (the default) takes them where they run, True
    needs them, False turns them off (kiln.runtime.runner.Runner).
    """

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        *,
        devices: Sequence[str] | None = None,
        session: Any = None,
        max_batch_size: int = 8,
        kv_memory: int | None = None,
        kv_tokens: int | None = None,
        context_length: int | None = None,
        prefill_chunk: int | None = None,
        prefix_cache: bool = True,
        decode_steps: int | None = None,
        step_graphs: bool | None = None,
        verify: bool = True,
    ):
        if decode_steps is not None and (not isinstance(decode_steps, int) or decode_steps < 1):
            raise KilnError(f"decode_steps is {decode_steps!r}; it must be an integer >= 1")
        self.runner = Runner(
            path,
            device,
            devices=devices,
            session=session,
            context_length=context_length,
            max_batch_size=max_batch_size,
            kv_tokens=kv_tokens,
            kv_memory=kv_memory,
            prefill_chunk=prefill_chunk,
            step_graphs=step_graphs,
            verify=verify,
        )
        self.kv = self.runner.kv
        self.tokenizer = self.runner.tokenizer
        self.max_batch_size = max_batch_size
        # A number given is the number run; the default holds a GPU's steps to STEP_SECONDS.
        self.step_seconds: float | None = None
        if decode_steps is None:
            decode_steps = 1
            if self.runner.samples_on_device:
                decode_steps, self.step_seconds = DECODE_STEPS, STEP_SECONDS
        self.decode_steps = decode_steps
        self._pass_seconds = 0.0  # of the last decode step: its time over its passes
        self._seq_ids = itertools.count(SEQ_ID_BASE)
        self._request_ids = itertools.count()
        self.prefix_cache = PrefixCache(self.kv, self.new_seq_id) if prefix_cache else None
        self._waiting: list[Request] = []  # oldest first
        self._running: list[Request] = []  # oldest first; the last is preempted first
        self._requests: dict[int, Request] = {}
        self._inbox: deque[Request] = deque()
        self._cancels: deque[int] = deque()
        self._lock = threading.RLock()
        self._free_pages = self.kv.free_pages()  # as `stats` last read it
        self._reserved = 0  # pages promised to this step's passes
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wakeup = threading.Event()
        self._counters = dict.fromkeys(
            ("steps", "busy_steps", "prefill_tokens", "decode_tokens", "preemptions",
             "cached_tokens"), 0
        )  # fmt: skip
        self._step_seconds = self._host_seconds = self._last_host = self._max_host = 0.0

    @property
    def context_length(self) -> int:
        return self.runner.context_length

    def new_seq_id(self) -> int:
        return next(self._seq_ids)

    # -- requests ----------------------------------------------------------------------------

    def submit(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, **sampling: Any
    ) -> RequestHandle:
        """Queue a request (text, or token ids) and return its handle at once."""
        if params is None:
            params = SamplingParams(**sampling)
        elif sampling:
            raise KilnError("give SamplingParams or keyword sampling options, not both")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise KilnError(
                    f"{self.runner.manifest.root} has no tokenizer: submit token ids, or "
                    "recompile from a checkpoint that has tokenizer.json"
                )
            prompt = self.tokenizer.encode(prompt)
        ids = self.runner.check_ids(prompt)
        if params.stop and self.tokenizer is None:
            raise KilnError("stop strings need a tokenizer: use stop_token_ids instead")
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            stops |= set(self.runner.eos_token_ids)
        request_id = next(self._request_ids)
        handle = RequestHandle(self, request_id, has_text=self.tokenizer is not None)
        text = self.tokenizer.text_stream(params.stop) if self.tokenizer is not None else None
        sampler = TokenSampler(params, ids, self.runner.vocab_size)
        request = Request(request_id, ids, params, sampler, frozenset(stops), text, handle)
        self._inbox.append(request)
        self._wakeup.set()
        return handle

    def generate(
        self, prompts: Sequence[str | Sequence[int]], **sampling: Any
    ) -> list[RequestOutput]:
        """Run several requests together; their outputs in order."""
        handles = [self.submit(p, **sampling) for p in prompts]
        return [h.result() for h in handles]

    async def generate_async(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, **sampling: Any
    ) -> RequestOutput:
        return await self.submit(prompt, params, **sampling).result_async()

    def _cancel(self, handle: RequestHandle) -> None:
        self._cancels.append(handle.request_id)
        self._wakeup.set()
        if not self.running_in_background:
            with self._lock:
                self._take_inbox()

    # -- the background thread ---------------------------------------------------------------

    @property
    def running_in_background(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Run steps on a background thread whenever there is work (idempotent)."""
        with self._lock:
            if self.running_in_background:
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="kiln-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the background thread after its current step; requests stay queued."""
        self._stop.set()
        self._wakeup.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def close(self) -> None:
        """Stop the thread, cancel every request, drop the prefix cache and close the runner
        (a tensor-parallel one's Disco workers exit)."""
        self.stop()
        with self._lock:
            self._take_inbox()
            for request in list(self._requests.values()):
                self._finish(request, "cancelled")
            if self.prefix_cache is not None:
                self.prefix_cache.clear()
            self.runner.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _has_work(self) -> bool:
        return bool(self._inbox or self._cancels or self._running or self._waiting)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wakeup.clear()
            if not self._has_work():
                self._wakeup.wait(timeout=0.5)
                continue
            try:
                self.step()
            except Exception as e:  # never let the thread die with requests waiting on it
                with self._lock:
                    for request in list(self._requests.values()):
                        self._finish(request, "error", f"{type(e).__name__}: {e}")

    # -- one step ----------------------------------------------------------------------------

    def step(self) -> bool:
        """Run one engine step; returns whether requests remain."""
        with self._lock:
            start = time.perf_counter()
            model_before = self.runner.model_seconds
            self._take_inbox()
            decode, prefill = self._schedule()
            if prefill:
                self._run_prefill(prefill)
            if decode:
                steps = 1 if prefill else self._greedy_steps(decode)
                if steps > 1:
                    self._run_decode_greedy(decode, steps)
                else:
                    self._run_decode(decode)
            self._counters["steps"] += 1
            if decode or prefill:
                elapsed = time.perf_counter() - start
                host = elapsed - (self.runner.model_seconds - model_before)
                self._counters["busy_steps"] += 1
                self._step_seconds += elapsed
                self._host_seconds += host
                self._last_host = host
                self._max_host = max(self._max_host, host)
            return self._has_work()

    def run_until_idle(self) -> None:
        while self.step():
            pass

    def _take_inbox(self) -> None:
        while self._inbox:
            request = self._inbox.popleft()
            self._requests[request.id] = request
            self._waiting.append(request)
        while self._cancels:
            request = self._requests.get(self._cancels.popleft())
            if request is not None:
                self._finish(request, "cancelled")

    # -- scheduling --------------------------------------------------------------------------

    def _schedule(self) -> tuple[list[Request], list[tuple[Request, int]]]:
        """This step's decode requests and prefill (request, chunk length) pairs, with the
        pages for both reserved."""
        self._reserved = 0
        decode = [r for r in self._running if r.decoding]
        while not self._reserve(sum(self.kv.new_pages(r.computed, 1) for r in decode)):
            victim = self._running[-1]
            self._preempt(victim)
            if victim in decode:
                decode.remove(victim)

        chunks: list[tuple[Request, int]] = []
        budget = self.runner.prefill_chunk
        prefilling = [r for r in self._running if not r.decoding]
        for request in prefilling + list(self._waiting):
            if budget == 0 or len(chunks) == self.max_batch_size:
                break
            n = self._plan_chunk(request, budget)
            if n == 0:
                break
            chunks.append((request, n))
            budget -= n

        if not decode and not chunks and self._running:
            # Nothing can run: free the newest request's pages so the older ones go on.
            self._preempt(self._running[-1])
            return self._schedule()
        return decode, chunks

    def _plan_chunk(self, request: Request, budget: int) -> int:
        """Tokens of `request` to prefill this step (0: none), admitting it if it waits."""
        limit = min(budget, self.runner.sequence_chunk)
        if request.state == RUNNING:
            return self._fit(request.computed, min(request.pending, limit))
        if len(self._running) >= self.max_batch_size:
            return 0
        match = None
        if self._shares_prefix(request):
            self._cache_running_prefixes()
            match = self.prefix_cache.match(request.tokens)
        start = match[1] if match else 0
        # Admit a request only when its whole prompt fits next to the others, or when nothing
        # else runs: admitting more than fits would only get it (or others) preempted.
        pages = self.kv.new_pages(start, len(request.tokens) - start + 1)
        if self._running and not self._reserve(pages, hold=False):
            return 0
        if match is not None and self.prefix_cache is not None:
            match = self.prefix_cache.match(request.tokens)  # the check may have evicted it
        # Forking costs no pages; from here on the entry may go, the fork keeps its pages.
        self._admit(request, match)
        return self._fit(request.computed, min(request.pending, limit))

    def _cache_running_prefixes(self) -> None:
        """Make the running requests' computed tokens prefix-cache entries, for the request
        about to be admitted to find. Until one waits, a running request stays unforked (its
        KV one block: kiln.runtime.step_graph keys whole-step graphs by it alone)."""
        for request in self._running:
            if not request.cached_prefix and request.computed >= len(request.prompt):
                request.cached_prefix = True
                self._cache_computed(request)

    def _cache_computed(self, request: Request) -> None:
        """The request's computed tokens (prompt and reply so far) as a prefix-cache entry."""
        if self._shares_prefix(request):
            self.prefix_cache.insert(request.seq_id, request.tokens[: request.computed])

    def _shares_prefix(self, request: Request) -> bool:
        """Whether the request may fork from, or become, a prefix-cache entry. With a sliding
        window only a request that never outgrows the window may: TVM's per-layer window
        kernels apply the window to a fork's shared and own pages apart, which is exact only
        while nothing falls out of the window."""
        if self.prefix_cache is None:
            return False
        window = self.runner.sliding_window
        return window is None or len(request.prompt) + request.params.max_tokens <= window

    def _fit(self, length: int, n: int) -> int:
        """The longest chunk <= n that free pages hold for a sequence of `length` tokens;
        its pages are reserved."""
        if n > 0 and not self._reserve(self.kv.new_pages(length, n)):
            free = self.kv.free_pages() - self._reserved
            page = self.kv.page_size
            n = min(n, (-(-length // page) + free) * page - length)
            if n > 0:
                self._reserve(self.kv.new_pages(length, n))
        return max(n, 0)

    def _reserve(self, pages: int, hold: bool = True) -> bool:
        """Promise `pages` to this step, evicting prefix-cache entries while short."""
        while self.kv.free_pages() - self._reserved < pages:
            if self.prefix_cache is None or not self.prefix_cache.evict_one():
                return False
        if hold:
            self._reserved += pages
        return True

    def _admit(self, request: Request, match: tuple[int, int] | None) -> None:
        request.seq_id = self.new_seq_id()
        if match is not None:
            parent, length = match
            self.kv.fork(parent, request.seq_id, length)
            request.computed = length
            cached = min(length, len(request.prompt))
            if not request.cached_tokens:
                request.cached_tokens = cached
                self._counters["cached_tokens"] += cached
        else:
            self.kv.add(request.seq_id)
        request.state = RUNNING
        self._waiting.remove(request)
        bisect.insort(self._running, request, key=lambda r: r.id)

    def _preempt(self, request: Request) -> None:
        """Free the request's sequence; it waits to recompute its tokens."""
        self._release(request)
        request.computed = 0
        request.state = WAITING
        self._running.remove(request)
        bisect.insort(self._waiting, request, key=lambda r: r.id)
        self._counters["preemptions"] += 1

    def _release(self, request: Request) -> None:
        if request.seq_id is not None:
            self.kv.remove(request.seq_id)
            request.seq_id = None

    # -- forward passes and sampling ---------------------------------------------------------

    def _run_prefill(self, chunks: list[tuple[Request, int]]) -> None:
        requests = [r for r, _ in chunks]
        pieces = [r.tokens[r.computed : r.computed + n] for r, n in chunks]
        try:
            logits = self.runner.prefill([r.seq_id for r in requests], pieces, on_device=True)
        except Exception as e:
            self._fail(requests, e)
            return
        self._counters["prefill_tokens"] += sum(n for _, n in chunks)
        rows = []
        for row, (request, n) in enumerate(chunks):
            request.computed += n
            if request.pending == 0:
                rows.append((request, row))
        self._sample(rows, logits)

    def _run_decode(self, requests: list[Request]) -> None:
        start = time.perf_counter()
        try:
            logits = self.runner.decode(
                [r.seq_id for r in requests], [r.tokens[-1] for r in requests], on_device=True
            )
        except Exception as e:
            self._fail(requests, e)
            return
        self._counters["decode_tokens"] += len(requests)
        for request in requests:
            request.computed += 1
        self._sample(list(zip(requests, range(len(requests)), strict=True)), logits)
        self._pass_seconds = time.perf_counter() - start

    def _greedy_steps(self, requests: list[Request]) -> int:
        """Decode passes this step may run in a row for `requests` (1: one, as usual):
        all plain greedy, none taken past its max_tokens or the context, and pages for all
        the passes free now (the first pass's are reserved already; none are evicted)."""
        most = greedy_steps_cap(self.decode_steps, self.step_seconds, self._pass_seconds)
        if most == 1 or not all(r.params.plain_greedy for r in requests):
            return 1
        steps = min(
            most,
            *(r.params.max_tokens - (len(r.tokens) - len(r.prompt)) for r in requests),
            *(self.context_length - len(r.tokens) for r in requests),
        )
        more = sum(
            self.kv.new_pages(r.computed, steps) - self.kv.new_pages(r.computed, 1)
            for r in requests
        )
        if more > self.kv.free_pages() - self._reserved:
            return 1
        return steps

    def _run_decode_greedy(self, requests: list[Request], steps: int) -> None:
        start = time.perf_counter()
        # Each pass's tokens are taken while the next pass runs; a request that ends on one
        # takes no later ones, and finishes (leaves the cache) once the passes are over.
        ended: dict[int, tuple[Request, str]] = {}

        def accept(tokens: list[int]) -> None:
            for request, token in zip(requests, tokens, strict=True):
                if request.id in ended:
                    continue  # its later tokens are not its own
                self._counters["decode_tokens"] += 1
                request.computed += 1
                reason = self._accept(request, token, None, finish=False)
                if reason is not None:
                    ended[request.id] = (request, reason)

        try:
            picked = self.runner.decode_greedy(
                [r.seq_id for r in requests],
                [r.tokens[-1] for r in requests],
                steps,
                # no more passes once every request has met a stop token
                lambda tokens: all(t in r.stops for r, t in zip(requests, tokens, strict=True)),
                accept,
            )
        except Exception as e:
            self._fail([r for r in requests if r.id not in ended], e)
            picked = None
        for request, reason in ended.values():
            self._finish(request, reason)
        if picked:
            self._pass_seconds = (time.perf_counter() - start) / len(picked)

    def _sample(self, rows: list[tuple[Request, int]], logits: Logits) -> None:
        """Choose the next token of each request from its row of `logits`, and accept it.

        Plain greedy rows take the artifact's argmax, and on a GPU rows that need nothing but
        the draw take its sampling kernel (the request's own generator draws the uniform), so
        only token ids cross to the host; penalties and logprobs run on the host."""
        if not rows:
            return
        greedy = [r.params.plain_greedy for r, _ in rows]
        drawn = [
            self.runner.samples_on_device and not g and r.sampler.on_device
            for (r, _), g in zip(rows, greedy, strict=True)
        ]
        argmax = logits.greedy() if any(greedy) else None
        sampled = self._sample_on_device(rows, drawn, logits) if any(drawn) else None
        for i, (request, row) in enumerate(rows):
            if argmax is not None and greedy[i]:
                self._accept(request, argmax[row], None)
            elif sampled is not None and drawn[i]:
                self._accept(request, sampled[row], None)
            else:
                self._accept(request, *request.sampler(logits.numpy()[row]))

    @staticmethod
    def _sample_on_device(
        rows: list[tuple[Request, int]], drawn: list[bool], logits: Logits
    ) -> list[int]:
        n = len(logits)
        temperature, top_p, top_k, uniform = [1.0] * n, [1.0] * n, [0] * n, [0.0] * n
        for (request, row), on in zip(rows, drawn, strict=True):
            if on:
                p = request.params
                temperature[row], top_p[row], top_k[row] = p.temperature, p.top_p, p.top_k
                uniform[row] = request.sampler.uniform()
        return logits.sample(temperature, top_p, top_k, uniform)

    def _accept(
        self, request: Request, token: int, logprob: Any, finish: bool = True
    ) -> str | None:
        """Append a sampled token; stream it; finish the request if it is done (or, with
        `finish` False, leave that to the caller). Returns why it is done, or None."""
        request.tokens.append(token)
        if request.first_token is None:
            request.first_token = time.perf_counter()
        if logprob is not None:
            request.logprobs.append(logprob)
        reason = None
        piece = ""
        if token in request.stops:
            reason = "stop"  # the stop token is returned as an id, never as text
        elif request.text is not None:
            piece = request.text.put(token)
            if request.text.stopped:
                reason = "stop"
        if reason is None and (
            len(request.tokens) - len(request.prompt) >= request.params.max_tokens
            or len(request.tokens) >= self.context_length
        ):
            reason = "length"
        request.handle._push(Delta(token, piece, logprob))
        if reason is not None and finish:
            self._finish(request, reason)
        return reason

    def _fail(self, requests: list[Request], error: Exception) -> None:
        for request in requests:
            self._finish(request, "error", f"{type(error).__name__}: {error}")

    def _finish(self, request: Request, reason: str, error: str | None = None) -> None:
        if reason != "error" and request.seq_id is not None:
            self._cache_computed(request)  # the whole conversation, for a next turn to find
        self._release(request)
        if request.state == RUNNING:
            self._running.remove(request)
        elif request.state == WAITING:
            self._waiting.remove(request)
        request.state = FINISHED
        self._requests.pop(request.id, None)
        rest = request.text.finish() if request.text is not None else ""
        if rest:
            request.handle._push(Delta(None, rest))
        request.handle._push(output=request.output(reason, error))

    # -- introspection -----------------------------------------------------------------------

    @property
    def stats(self) -> EngineStats:
        if not self.runner.executor.single_caller:
            self._free_pages = self.kv.free_pages()
        # A Disco session takes calls from one thread at a time, so its cache is asked only
        # when the engine is not using it; never wait for that: the server reads these stats
        # on its event loop, which must not stall for a step. Else the last count read.
        elif self._lock.acquire(blocking=False):
            try:
                self._free_pages = self.kv.free_pages()
            finally:
                self._lock.release()
        c = self._counters
        busy = max(c["busy_steps"], 1)
        return EngineStats(
            steps=c["steps"],
            prefill_tokens=c["prefill_tokens"],
            decode_tokens=c["decode_tokens"],
            preemptions=c["preemptions"],
            cached_tokens=c["cached_tokens"],
            running=len(self._running),
            waiting=len(self._waiting) + len(self._inbox),
            free_pages=self._free_pages,
            total_pages=self.kv.total_pages,
            prefix_entries=len(self.prefix_cache) if self.prefix_cache else 0,
            step_ms=1e3 * self._step_seconds / busy,
            host_ms=1e3 * self._host_seconds / busy,
            last_host_ms=1e3 * self._last_host,
            max_host_ms=1e3 * self._max_host,
        )
