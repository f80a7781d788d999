"""`kiln serve`: an OpenAI-compatible HTTP server over one `Engine` (FastAPI + uvicorn).

Every request becomes one engine request per choice, submitted to the same continuously
batching engine as the Python API, so concurrent clients share its forward passes. The engine
runs on its background thread; the event loop only parses, submits and streams, reading each
choice's deltas with `RequestHandle.adeltas`.

A generation lives inside `async with Generation(...)`: leaving it for any reason (finished,
client gone, error, shutdown) cancels whatever still runs, which frees its KV pages before the
engine's next step. A watcher on the connection's ASGI `receive` notices a client that leaves
while its request is queued or generating, streaming or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from kiln.runtime.engine import Engine
from kiln.runtime.errors import KilnError
from kiln.runtime.request import Delta, RequestHandle, RequestOutput
from kiln.runtime.server_metrics import ServerMetrics
from kiln.runtime.server_protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Job,
    LogprobFormatter,
    build_job,
    chat_messages,
    error_body,
    parse_body,
    usage,
)

CHAT_PAGE = Path(__file__).resolve().parent / "static" / "chat.html"
RETRY_AFTER_S = 1  # what a client refused for a full queue is told to wait
log = logging.getLogger("kiln.serve")


@dataclass(frozen=True)
class ServerConfig:
    """`max_queue`: generations that may wait for a batch slot beyond the engine's
    max_batch_size; more get 429. `shutdown_grace`: seconds running requests get to finish
    when the server stops, after which they are cancelled."""

    model_name: str
    api_key: str | None = None
    max_queue: int = 256
    shutdown_grace: float = 30.0


class Generation:
    """The engine requests (one per choice) of one HTTP request, read together."""

    def __init__(self, server: KilnServer, job: Job, arrived: float):
        self.server = server
        self.job = job
        self.arrived = arrived
        self.handles: list[RequestHandle] = []
        self.shut_down = False  # cancelled by a shutdown, not by its client

    async def __aenter__(self) -> Generation:
        try:
            for p, params in self.job.choices:
                self.handles.append(self.server.engine.submit(self.job.prompts[p], params))
        except BaseException:
            self.cancel()
            raise
        return self

    async def __aexit__(self, *_exc: object) -> None:
        for handle in self.handles:
            if not handle.finished:
                handle.cancel()
        self.server.release(self)

    def cancel(self, shutdown: bool = False) -> None:
        self.shut_down |= shutdown
        for handle in self.handles:
            if not handle.finished:
                handle.cancel()

    def watch(self, receive: Receive) -> asyncio.Task[None]:
        """A task that cancels this generation when the client disconnects."""

        async def wait() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.cancel()

        return asyncio.create_task(wait())

    async def events(self) -> AsyncIterator[tuple[int, Delta | RequestOutput]]:
        """(choice, Delta) as tokens come and (choice, RequestOutput) when a choice ends, in
        arrival order across choices; records the latency metrics on the way."""
        queue: asyncio.Queue[tuple[int, Delta | RequestOutput]] = asyncio.Queue()

        async def pump(i: int, handle: RequestHandle) -> None:
            async for delta in handle.adeltas(raise_error=False):
                queue.put_nowait((i, delta))
            queue.put_nowait((i, await handle.result_async()))

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(self.handles)]
        metrics = self.server.metrics
        last: dict[int, float] = {}
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                now = time.monotonic()
                if isinstance(item, RequestOutput):
                    remaining -= 1
                    metrics.finished[item.finish_reason] += 1
                    metrics.prompt_tokens += item.usage.prompt_tokens
                elif item.token is not None:
                    hist = metrics.itl if i in last else metrics.ttft
                    hist.observe(now - last.get(i, self.arrived))
                    last[i] = now
                    metrics.token(now)
                yield i, item
        finally:
            for task in tasks:
                task.cancel()


class KilnServer:
    """The state behind the routes: the engine, admission and the live generations."""

    def __init__(self, engine: Engine, config: ServerConfig):
        if engine.tokenizer is None:
            raise KilnError(
                f"{engine.runner.manifest.root} has no tokenizer, which serving needs: "
                "recompile it from a checkpoint that has tokenizer.json"
            )
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.config = config
        self.metrics = ServerMetrics()
        self.started = int(time.time())
        self.capacity = engine.max_batch_size + config.max_queue
        self.in_flight = 0  # engine requests admitted and not yet released
        self.live: set[Generation] = set()
        self.draining = False
        self._token_text: dict[int, str] = {}

    # -- admission -------------------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), key):
            raise ApiError(
                401,
                "Missing or wrong API key: send it as the header 'Authorization: Bearer KEY'.",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.model_name:
            raise ApiError(
                404,
                f"The model {model!r} does not exist; this server serves "
                f"{self.config.model_name!r}.",
                param="model",
                code="model_not_found",
            )

    def admit(self, job: Job, arrived: float) -> Generation:
        if self.draining:
            raise ApiError(503, "The server is shutting down.", type="service_unavailable")
        if self.in_flight + len(job.choices) > self.capacity:
            raise ApiError(
                429,
                f"The server's queue is full ({self.engine.max_batch_size} running, "
                f"{self.config.max_queue} queued): retry in {RETRY_AFTER_S} s.",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        generation = Generation(self, job, arrived)
        self.in_flight += len(job.choices)
        self.live.add(generation)
        return generation

    def release(self, generation: Generation) -> None:
        if generation in self.live:
            self.live.remove(generation)
            self.in_flight -= len(generation.job.choices)

    def drain(self) -> None:
        """Start a graceful shutdown: refuse new requests, let running ones finish for
        `shutdown_grace` seconds, then cancel the rest (their clients are told why)."""
        self.draining = True
        if self.live:
            log.info(
                "waiting up to %g s for %d requests", self.config.shutdown_grace, len(self.live)
            )
        asyncio.get_running_loop().call_later(self.config.shutdown_grace, self._cancel_all)

    def _cancel_all(self) -> None:
        for generation in list(self.live):
            generation.cancel(shutdown=True)

    # -- requests --------------------------------------------------------------------------

    def token_text(self, token: int) -> str:
        if token not in self._token_text:
            self._token_text[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return self._token_text[token]

    def prompts(self, body: CompletionRequest | ChatRequest) -> list[list[int]]:
        """Token ids of each prompt: encoded text, given ids, or the rendered chat."""
        if isinstance(body, ChatRequest):
            if self.tokenizer.chat_template is None:
                raise ApiError(
                    400,
                    "This model has no chat template: use /v1/completions with a plain prompt.",
                    param="messages",
                )
            try:
                return [self.tokenizer.encode_chat(chat_messages(body))]
            except KilnError as e:
                raise ApiError(400, str(e), param="messages") from None
        prompt = body.prompt
        if isinstance(prompt, str):
            return [self.tokenizer.encode(prompt)]
        if not prompt:
            raise ApiError(400, "prompt is empty.", param="prompt")
        if isinstance(prompt[0], str):
            return [self.tokenizer.encode(p) for p in prompt]  # type: ignore[arg-type]
        if isinstance(prompt[0], int):
            return [list(prompt)]  # type: ignore[arg-type]
        return [list(p) for p in prompt]  # type: ignore[union-attr]

    async def generate(
        self, request: Request, kind: type[CompletionRequest | ChatRequest]
    ) -> Response:
        """Handle a completions or chat request: refuse it with an ApiError, or answer it
        (a JSON body, or an event stream that owns the generation)."""
        arrived = time.monotonic()
        self.authorize(request)
        body = parse_body(await request.body(), kind)
        self.check_model(body.model)
        prompts = self.prompts(body)
        job = build_job(body, prompts, self.engine.context_length, self.capacity)
        for ids in prompts:
            try:
                self.engine.runner.check_ids(ids)
            except KilnError as e:
                raise ApiError(400, str(e), param="prompt") from None
        generation = self.admit(job, arrived)
        writer = _Writer(self, generation, chat=kind is ChatRequest)
        if job.stream:
            return _EventStream(writer)
        try:
            async with generation:
                watcher = generation.watch(request.receive)
                try:
                    return JSONResponse(await writer.collect())
                finally:
                    watcher.cancel()
        finally:
            self.release(generation)  # also when submitting failed


class _Writer:
    """Turns a generation's events into OpenAI response objects (completion or chat)."""

    def __init__(self, server: KilnServer, generation: Generation, chat: bool):
        self.server = server
        self.generation = generation
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        kind = "chat" if chat else "completion"
        self.logprobs = [LogprobFormatter(server.token_text, kind) for _ in generation.job.choices]
        self.outputs: dict[int, RequestOutput] = {}

    def _envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat and chunk else self.object
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.server.config.model_name,
            "system_fingerprint": None,
            "choices": choices,
        }

    def _usage(self) -> dict[str, Any]:
        job = self.generation.job
        cached: dict[int, int] = {}
        for i, output in self.outputs.items():
            p = job.choices[i][0]
            cached[p] = max(cached.get(p, 0), output.usage.cached_tokens)
        return usage(
            sum(len(ids) for ids in job.prompts),
            sum(o.usage.completion_tokens for o in self.outputs.values()),
            sum(cached.values()),
        )

    def _failure(self, output: RequestOutput) -> ApiError | None:
        if output.finish_reason == "error":
            return ApiError(
                500, f"The engine failed on this request: {output.error}", type="server_error"
            )
        if output.finish_reason == "cancelled":
            if self.generation.shut_down:
                return ApiError(
                    503,
                    "The server shut down before this request finished.",
                    type="service_unavailable",
                )
            return ApiError(499, "The request was cancelled.", type="cancelled")
        return None

    def _choice(self, i: int, text: str, logprobs: Any, finish: str | None) -> dict[str, Any]:
        if self.chat:
            return {
                "index": i,
                "delta": {"content": text} if text or finish is None else {},
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}

    async def collect(self) -> dict[str, Any]:
        """The whole response of a non-streaming request."""
        async with contextlib.aclosing(self.generation.events()) as events:
            async for i, item in events:
                if isinstance(item, RequestOutput):
                    self.outputs[i] = item
                    failure = self._failure(item)
                    if failure is not None:
                        raise failure
        choices = []
        for i, output in sorted(self.outputs.items()):
            lps = None
            if output.logprobs is not None:
                lps = self.logprobs[i].format(output.logprobs)
            if self.chat:
                message = {"role": "assistant", "content": output.text or ""}
                choices.append(
                    {
                        "index": i,
                        "message": message,
                        "logprobs": lps,
                        "finish_reason": output.finish_reason,
                    }
                )
            else:
                choices.append(self._choice(i, output.text or "", lps, output.finish_reason))
        return {**self._envelope(choices, chunk=False), "usage": self._usage()}

    async def stream(self) -> AsyncIterator[bytes]:
        """Server-sent events: chunks, the usage chunk when asked for, then [DONE]. A failure
        after the response started is sent as an error event."""
        include_usage = self.generation.job.include_usage

        def chunk(choices: list[dict[str, Any]], usage: Any = None) -> bytes:
            body = self._envelope(choices, chunk=True)
            if include_usage:
                body["usage"] = usage
            return _sse(body)

        if self.chat:
            yield chunk(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for i in range(len(self.generation.job.choices))
                ]
            )
        async with contextlib.aclosing(self.generation.events()) as events:
            async for i, item in events:
                if isinstance(item, RequestOutput):
                    self.outputs[i] = item
                    failure = self._failure(item)
                    if failure is not None:
                        yield _sse(failure.body())
                        yield b"data: [DONE]\n\n"
                        return
                    yield chunk([self._choice(i, "", None, item.finish_reason)])
                elif item.text or item.logprob is not None:
                    lps = None
                    if item.logprob is not None:
                        lps = self.logprobs[i].format([item.logprob])
                    yield chunk([self._choice(i, item.text, lps, None)])
        if include_usage:
            yield chunk([], self._usage())
        yield b"data: [DONE]\n\n"


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + _json(obj) + b"\n\n"


def _json(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


class _EventStream(StreamingResponse):
    """A server-sent event stream that owns its generation: submitted when the response
    starts, cancelled when it ends or the client leaves."""

    def __init__(self, writer: _Writer):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(writer.stream(), media_type="text/event-stream", headers=headers)
        self.generation = writer.generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with self.generation:
                watcher = self.generation.watch(receive)
                try:
                    await send(
                        {
                            "type": "http.response.start",
                            "status": self.status_code,
                            "headers": self.raw_headers,
                        }
                    )
                    async with contextlib.aclosing(self.body_iterator) as events:  # type: ignore[type-var]
                        async for data in events:
                            await send(
                                {"type": "http.response.body", "body": data, "more_body": True}
                            )
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except OSError:
                    pass  # the client left while we wrote; the watcher cancels the rest
                finally:
                    watcher.cancel()
        finally:
            self.generation.server.release(self.generation)


# -- the app ----------------------------------------------------------------------------------


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    """The ASGI app serving `engine`, which it starts and, at shutdown, closes."""
    server = KilnServer(engine, config)
    page = CHAT_PAGE.read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            server._cancel_all()
            engine.close()

    app = FastAPI(title="Kiln", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.kiln = server

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError) -> Response:
        server.metrics.errors[error.status] += 1
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:
        server.metrics.errors[error.status_code] += 1
        message = f"{request.method} {request.url.path}: {error.detail}"
        return JSONResponse(
            error_body(message, "invalid_request_error"),
            status_code=error.status_code,
            headers=error.headers,
        )

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, error: Exception) -> Response:
        server.metrics.errors[500] += 1
        log.exception("internal error")
        message = f"Internal server error ({type(error).__name__}); the server log has details."
        return JSONResponse(error_body(message, "server_error"), status_code=500)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.generate(request, CompletionRequest)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.generate(request, ChatRequest)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        server.authorize(request)
        card = {
            "id": config.model_name,
            "object": "model",
            "created": server.started,
            "owned_by": "kiln",
            "max_model_len": engine.context_length,
        }
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/health")
    async def health() -> Response:
        if server.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        text = server.metrics.render(engine.stats, server.in_flight)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def chat_page() -> Response:
        return HTMLResponse(page)

    return app


class _Server(uvicorn.Server):
    """uvicorn, telling Kiln when shutdown starts so that running requests are finished or
    cancelled (and their clients told) rather than cut off."""

    def __init__(self, config: uvicorn.Config, kiln: KilnServer):
        super().__init__(config)
        self.kiln = kiln

    async def shutdown(self, sockets: Any = None) -> None:
        self.kiln.drain()
        await super().shutdown(sockets)


def make_server(app: FastAPI, host: str, port: int, log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server for `app`; `run()` it (blocks), or `serve()` it in an event loop."""
    kiln: KilnServer = app.state.kiln
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        # A backstop only: drain() cancels what still runs after the grace period.
        timeout_graceful_shutdown=kiln.config.shutdown_grace + 10,
    )
    return _Server(config, kiln)


def serve(
    artifact: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "cpu",
    devices: Sequence[str] | None = None,
    api_key: str | None = None,
    max_queue: int = 256,
    max_batch_size: int = 8,
    context_length: int | None = None,
    model_name: str | None = None,
    shutdown_grace: float = 30.0,
    echo: Callable[[str], None] = print,
) -> None:
    """Load `artifact` and serve it until interrupted (Ctrl-C or SIGTERM stop it
    gracefully). `devices`: the GPUs of a tensor-parallel artifact (default cuda:0..N-1 for
    device "cuda"); the engine's close at shutdown stops their Disco workers."""
    if not isinstance(max_queue, int) or max_queue < 0:
        raise KilnError(f"max_queue is {max_queue!r}; it must be an integer >= 0")
    engine = Engine(
        artifact,
        device,
        devices=devices,
        max_batch_size=max_batch_size,
        context_length=context_length,
    )
    # The app's shutdown closes the engine; this covers a server that never started (a port
    # in use), so that no tensor-parallel worker outlives it.
    with engine:
        name = model_name or Path(artifact).resolve().name
        config = ServerConfig(name, api_key, max_queue, shutdown_grace)
        server = make_server(create_app(engine, config), host, port)
        echo(f"serving {name} ({engine.context_length}-token context) on http://{host}:{port}/")
        with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it handled
            server.run()
