"""Requests as the engine sees them, and the handle a caller holds.

A `Request` is the engine's record: the tokens so far, how many of them are in the KV cache,
its sampler and text stream. A `RequestHandle` is the caller's view: iterate it for text pieces
(or `tokens()` for ids), `async for` it in a server, `result()` for the `RequestOutput`, and
`cancel()`. The engine thread appends `Delta`s to the handle; readers keep their own cursor.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kiln.runtime.errors import KilnError
from kiln.runtime.sampler import SamplingParams, TokenLogprob, TokenSampler
from kiln.runtime.tokenizer import TextStream

if TYPE_CHECKING:
    from kiln.runtime.engine import Engine


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache


@dataclass(frozen=True)
class RequestOutput:
    """A finished request. `finish_reason`: "stop" (a stop token or string), "length"
    (max_tokens or the end of the context), "cancelled" or "error" (then `error` says why).
    `token_ids` ends with the stop token when one was hit; `text` never holds it, nor a stop
    string or anything after one."""

    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str
    usage: Usage
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None
    time_to_first_token: float | None = None  # seconds from submit
    latency: float = 0.0  # seconds from submit to finish


@dataclass(frozen=True)
class Delta:
    """One generated token and the text that became final with it (often ""). The last delta
    of a request may carry no token: text held back until the end (token None)."""

    token: int | None
    text: str
    logprob: TokenLogprob | None = None


WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass(eq=False)
class Request:
    """The engine's record of one request (touched only under the engine's lock)."""

    id: int
    prompt: list[int]
    params: SamplingParams
    sampler: TokenSampler
    stops: frozenset[int]  # token ids that end generation
    text: TextStream | None
    handle: RequestHandle
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    computed: int = 0  # tokens[:computed] are in the KV cache
    seq_id: int | None = None
    state: str = WAITING
    cached_tokens: int = 0
    cached_prefix: bool = False  # its computed tokens went into the prefix cache while running
    logprobs: list[TokenLogprob] = field(default_factory=list)
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt)

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt) :]

    @property
    def pending(self) -> int:
        """Tokens not yet in the KV cache."""
        return len(self.tokens) - self.computed

    @property
    def decoding(self) -> bool:
        """Ready for a decode step: everything but the last sampled token is cached."""
        return self.computed > 0 and self.pending == 1

    def output(self, reason: str, error: str | None = None) -> RequestOutput:
        now = time.perf_counter()
        return RequestOutput(
            request_id=self.id,
            prompt_token_ids=list(self.prompt),
            token_ids=self.generated,
            text=self.handle.text if self.text is not None else None,
            finish_reason=reason,
            usage=Usage(len(self.prompt), len(self.generated), self.cached_tokens),
            logprobs=list(self.logprobs) if self.params.logprobs is not None else None,
            error=error,
            time_to_first_token=(
                None if self.first_token is None else self.first_token - self.submitted
            ),
            latency=now - self.submitted,
        )


class RequestHandle:
    """A submitted request. Iterate for text pieces, `tokens()` for ids, `result()` for the
    final `RequestOutput`; `async for` and `await handle.result_async()` in asyncio code.

    Without a background thread (`Engine.start()`), reading a handle drives the engine's
    steps itself, so a plain script needs no threads at all.
    """

    def __init__(self, engine: Engine, request_id: int, has_text: bool):
        self._engine = engine
        self.request_id = request_id
        self._has_text = has_text
        self._deltas: list[Delta] = []
        self._output: RequestOutput | None = None
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    # -- written by the engine ---------------------------------------------------------------

    def _push(self, delta: Delta | None = None, output: RequestOutput | None = None) -> None:
        with self._cond:
            if delta is not None:
                self._deltas.append(delta)
            if output is not None:
                self._output = output
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            loop.call_soon_threadsafe(_resolve, future)

    # -- read by the caller ------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self._output is not None

    @property
    def text(self) -> str:
        """The text generated so far."""
        with self._cond:
            return "".join(d.text for d in self._deltas)

    def cancel(self) -> None:
        """Stop generating. The request's KV pages are free before the engine's next step
        (at once when no background thread runs); `result()` then says "cancelled"."""
        self._engine._cancel(self)

    def _wait(self, seen: int) -> None:
        """Block until there is a delta past `seen` or the request finished."""
        while True:
            with self._cond:
                if len(self._deltas) > seen or self._output is not None:
                    return
                if self._engine.running_in_background:
                    # A timeout, so that a reader notices when the thread is stopped.
                    self._cond.wait(timeout=0.1)
                    continue
            self._engine.step()

    def deltas(self) -> Iterator[Delta]:
        """Each generated token as it comes; raises KilnError if the request failed."""
        yield from self._read(raise_error=True)

    def _read(self, raise_error: bool) -> Iterator[Delta]:
        seen = 0
        while True:
            self._wait(seen)
            with self._cond:
                new, done = self._deltas[seen:], self._output is not None
            yield from new
            seen += len(new)
            if done and seen == len(self._deltas):
                if raise_error:
                    self._raise_if_error()
                return

    def __iter__(self) -> Iterator[str]:
        self._require_text()
        return (d.text for d in self.deltas() if d.text)

    def _require_text(self) -> None:
        if not self._has_text:
            raise KilnError(
                "this model has no tokenizer, so a request streams no text: iterate "
                "handle.tokens() (or async for over handle.adeltas()) for token ids"
            )

    def tokens(self) -> Iterator[int]:
        return (d.token for d in self.deltas() if d.token is not None)

    def result(self) -> RequestOutput:
        """Wait for the request to finish (a failed one says why in `error`)."""
        for _ in self._read(raise_error=False):
            pass
        assert self._output is not None
        return self._output

    # -- asyncio -------------------------------------------------------------------------------

    async def _wait_async(self, seen: int) -> None:
        loop = asyncio.get_running_loop()
        with self._cond:
            if len(self._deltas) > seen or self._output is not None:
                return
            future: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, future))
        await future

    async def adeltas(self, raise_error: bool = True) -> AsyncIterator[Delta]:
        if not self._engine.running_in_background:
            # asyncio callers need the background thread; start() takes the engine's lock,
            # which a running step holds, so it is not called (on the event loop) needlessly
            self._engine.start()
        seen = 0
        while True:
            await self._wait_async(seen)
            with self._cond:
                new, done = self._deltas[seen:], self._output is not None
            for delta in new:
                yield delta
            seen += len(new)
            if done and seen == len(self._deltas):
                if raise_error:
                    self._raise_if_error()
                return

    def __aiter__(self) -> AsyncIterator[str]:
        self._require_text()
        return self._atext()

    async def _atext(self) -> AsyncIterator[str]:
        async for delta in self.adeltas():
            if delta.text:
                yield delta.text

    async def result_async(self) -> RequestOutput:
        async for _ in self.adeltas(raise_error=False):
            pass
        assert self._output is not None
        return self._output

    def _raise_if_error(self) -> None:
        if self._output is not None and self._output.finish_reason == "error":
            raise KilnError(f"request {self.request_id} failed: {self._output.error}")

    def __repr__(self) -> str:
        state = self._output.finish_reason if self._output else "running"
        return f"<RequestHandle {self.request_id} {state}, {len(self._deltas)} tokens>"


def _resolve(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_result(None)
