"""`kiln serve` on a live server over loopback, with the shipped tiny checkpoint on the CPU.

Outputs are compared with independent runs: `kiln.load(...).generate` / `chat` (temperature 0,
or the same seed), or the engine run alone for logprobs. Also: 32 concurrent streams and what
/metrics says about them, cancellation on disconnect (KV pages read from /metrics), every error
status, a fuzz test of request bodies, graceful shutdown, the chat page in headless Chromium,
and the `kiln serve` command itself.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kiln
from kiln.runtime.sampler import SamplingParams
from kiln.runtime.server import ServerConfig, create_app, make_server

MODEL = "tiny-llama"
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "def fibonacci(n):"
MESSAGES = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "Sort a list."},
]


# -- a server in a background thread --------------------------------------------------------


@dataclass
class Live:
    host: str
    port: int
    server: Any  # uvicorn.Server
    engine: kiln.Engine
    thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@contextlib.contextmanager
def live_server(
    path,
    *,
    api_key: str | None = KEY,
    max_batch_size: int = 8,
    max_queue: int = 64,
    shutdown_grace: float = 30.0,
    context_length: int | None = None,
) -> Iterator[Live]:
    engine = kiln.Engine(path, max_batch_size=max_batch_size, context_length=context_length)
    config = ServerConfig(MODEL, api_key, max_queue, shutdown_grace)
    server = make_server(create_app(engine, config), "127.0.0.1", 0, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Live("127.0.0.1", port, server, engine, thread)
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        assert not thread.is_alive(), "the server did not shut down"


@pytest.fixture(scope="module")
def tiny_path(artifact):
    return artifact("tiny-llama")


@pytest.fixture(scope="module")
def model(tiny_path):
    """The reference: the same artifact through the Python API, one request at a time."""
    return kiln.load(tiny_path)


@pytest.fixture(scope="module")
def live(tiny_path):
    with live_server(tiny_path) as s:
        yield s


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=60)


# -- plain HTTP --------------------------------------------------------------------------------


def call(
    live: Live,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: (status, headers, body). `body`: bytes as they are,
    anything else as JSON."""
    conn = http.client.HTTPConnection(live.host, live.port, timeout=60)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(
            method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})}
        )
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def post(live: Live, path: str, body: Any, headers: dict[str, str] | None = None):
    return call(live, "POST", path, body, AUTH if headers is None else headers)


def scrape(live: Live) -> dict[str, float]:
    status, _, text = call(live, "GET", "/metrics")
    assert status == 200
    samples = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def events(raw: bytes) -> list[dict[str, Any]]:
    """The JSON payloads of a well-formed server-sent event stream that ends with [DONE]."""
    text = raw.decode()
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    blocks = text.split("\n\n")[:-1]
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks), text[:500]
    payloads = [b[len("data: ") :] for b in blocks]
    assert payloads.count("[DONE]") == 1
    return [json.loads(p) for p in payloads[:-1]]


def streamed(chunks: list[dict[str, Any]], chat: bool) -> tuple[str, str, dict | None]:
    """(text, finish_reason, usage) of a one-choice stream, checking its shape on the way."""
    assert len({c["id"] for c in chunks}) == 1
    kind = "chat.completion.chunk" if chat else "text_completion"
    assert all(c["object"] == kind and c["model"] == MODEL for c in chunks)
    with_choice = [c for c in chunks if c["choices"]]
    finishes = [c["choices"][0]["finish_reason"] for c in with_choice]
    assert finishes[-1] is not None and all(f is None for f in finishes[:-1])
    if chat:
        assert with_choice[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in with_choice)
    else:
        text = "".join(c["choices"][0]["text"] for c in with_choice)
    rest = chunks[len(with_choice) :]
    assert chunks[: len(with_choice)] == with_choice and len(rest) <= 1  # usage comes last
    return text, finishes[-1], rest[0]["usage"] if rest else None


def assert_error(status: int, body: bytes, expected: int) -> dict[str, Any]:
    assert status == expected, body[:300]
    error = json.loads(body)["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    return error


# -- the openai client against the Python API ----------------------------------------------


def test_completions_equal_generate(client, model):
    ids = model.tokenizer.encode(PROMPT)
    expect_ids = model.generate_ids(ids, max_tokens=24, temperature=0)
    expect = model.generate(PROMPT, max_tokens=24, temperature=0)
    reason = "length" if len(expect_ids) == 24 else "stop"

    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    assert out.choices[0].text == expect
    assert out.choices[0].finish_reason == reason
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), len(expect_ids))

    stream = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert len(pieces) > 2 and "".join(pieces) == expect
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expect_ids)

    # Token ids as the prompt, and several prompts in one request.
    out = client.completions.create(model=MODEL, prompt=[ids, ids[:3]], max_tokens=5, temperature=0)
    assert [c.text for c in out.choices] == [
        model.generate(PROMPT, max_tokens=5, temperature=0),
        model.tokenizer.decode(model.generate_ids(ids[:3], max_tokens=5, temperature=0)),
    ]


def test_chat_equals_model_chat(client, model):
    expect = model.chat(MESSAGES, max_tokens=24, temperature=0)
    prompt_ids = model.tokenizer.encode_chat(MESSAGES)

    out = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0
    )
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expect
    assert out.usage.prompt_tokens == len(prompt_ids)

    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_completion_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expect
    assert chunks[-1].usage.prompt_tokens == len(prompt_ids)
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_sampling_options_equal_the_python_api(client, model):
    options = dict(
        temperature=0.9,
        top_p=0.9,
        top_k=40,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        max_tokens=24,
    )
    full = model.generate(PROMPT, seed=11, **options)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expect = [model.generate(PROMPT, seed=11 + i, stop=[stop], **options) for i in range(2)]
    assert len(expect[0]) < len(full)  # the stop string really cut the first choice

    server_options = {k: v for k, v in options.items() if k != "top_k"}
    out = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        n=2,
        seed=11,
        stop=[stop],
        extra_body={"top_k": 40},
        **server_options,
    )
    assert [c.text for c in out.choices] == expect
    assert out.choices[0].finish_reason == "stop"

    chat = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, seed=5, n=2, extra_body={"top_k": 40}, **server_options
    )
    assert [c.message.content for c in chat.choices] == [
        model.chat(MESSAGES, seed=5 + i, **options) for i in range(2)
    ]


def test_logprobs_equal_the_engine(client, model):
    # Log-probabilities agree to float32 rounding only: the server's prefix cache may hold the
    # prompt's first pages, so its prefill runs in other chunks than the engine's run alone.
    def approx(values):
        return pytest.approx(values, rel=1e-5, abs=1e-5)

    def engine_logprobs(ids: list[int], top: int):
        params = SamplingParams(temperature=0, max_tokens=6, logprobs=top)
        return model.engine.submit(ids, params).result().logprobs

    def text(token: int) -> str:
        return model.tokenizer.decode([token], skip_special_tokens=False)

    ref = engine_logprobs(model.tokenizer.encode(PROMPT), 3)
    out = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3
    )
    lp = out.choices[0].logprobs
    assert lp.tokens == [text(r.token) for r in ref]
    assert lp.token_logprobs == approx([r.logprob for r in ref])
    assert [list(t) for t in lp.top_logprobs] == [[text(t) for t, _ in r.top] for r in ref]
    assert [list(t.values()) for t in lp.top_logprobs] == [
        approx([v for _, v in r.top]) for r in ref
    ]

    ref = engine_logprobs(model.tokenizer.encode_chat(MESSAGES), 2)
    chat = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert [c.token for c in content] == [text(r.token) for r in ref]
    assert [c.logprob for c in content] == approx([r.logprob for r in ref])
    assert [[t.token for t in c.top_logprobs] for c in content] == [
        [text(t) for t, _ in r.top] for r in ref
    ]
    assert [[t.logprob for t in c.top_logprobs] for c in content] == [
        approx([v for _, v in r.top]) for r in ref
    ]
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, stream=True
    )
    streamed_lps = [
        e.logprob
        for c in stream
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert streamed_lps == approx([r.logprob for r in ref])


def test_models_and_health(client, live):
    assert [m.id for m in client.models.list().data] == [MODEL]
    status, _, body = call(live, "GET", "/health")
    assert (status, json.loads(body)) == (200, {"status": "ok"})


# -- many clients at once ----------------------------------------------------------------------


def test_32_concurrent_streams_equal_single_requests(live, model):
    requests = []
    for i in range(32):
        chat, max_tokens = i % 2 == 1, 8 + (7 * i) % 33
        if chat:
            messages = [{"role": "user", "content": f"Question {i}: what is {i} squared?"}]
            expect = model.chat(messages, max_tokens=max_tokens, temperature=0)
            body = {"messages": messages}
        else:
            prompt = f"def function_{i}(x, y={i}):"
            expect = model.generate(prompt, max_tokens=max_tokens, temperature=0)
            body = {"prompt": prompt}
        body |= {
            "model": MODEL,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        requests.append((chat, body, expect))

    before = scrape(live)
    seen = {"running": 0.0, "waiting": 0.0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            now = scrape(live)
            seen["running"] = max(seen["running"], now["kiln_requests_running"])
            seen["waiting"] = max(seen["waiting"], now["kiln_requests_waiting"])
            time.sleep(0.01)

    def run(request):
        chat, body, _ = request
        return post(live, "/v1/chat/completions" if chat else "/v1/completions", body)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(run, requests))
    finally:
        done.set()
        watcher.join()

    tokens = 0
    for (chat, _, expect), (status, headers, raw) in zip(requests, results, strict=True):
        assert status == 200 and headers["content-type"].startswith("text/event-stream")
        text, _, usage = streamed(events(raw), chat)
        assert text == expect
        tokens += usage["completion_tokens"]

    after = scrape(live)

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert seen["running"] == 8 and seen["waiting"] > 0  # batched, the rest queued
    assert after["kiln_requests_running"] == after["kiln_requests_waiting"] == 0
    assert after["kiln_http_requests_in_flight"] == 0
    assert grew("kiln_generation_tokens_total") == tokens
    assert (
        grew('kiln_requests_finished_total{reason="length"}')
        + grew('kiln_requests_finished_total{reason="stop"}')
        == 32
    )
    assert grew("kiln_time_to_first_token_seconds_count") == 32
    assert grew("kiln_inter_token_latency_seconds_count") == tokens - 32
    assert after["kiln_generation_tokens_per_second"] > 0


# -- disconnects free their pages --------------------------------------------------------------


def open_stream(live: Live, body: dict[str, Any], path: str = "/v1/completions") -> socket.socket:
    """Send a streaming request on a raw socket and return it, unread."""
    data = json.dumps(body | {"stream": True}).encode()
    sock = socket.create_connection((live.host, live.port), timeout=30)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {live.host}\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


def read_events(sock: socket.socket, count: int) -> bytes:
    """Read until `count` events arrived (or the stream ended)."""
    seen = b""
    while seen.count(b"data: ") < count:
        data = sock.recv(65536)
        if not data:
            break
        seen += data
    return seen


def wait_for(live: Live, check, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(live)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.02)


def test_disconnect_mid_stream_cancels_and_frees_pages(live, monkeypatch):
    # Each pass 5 ms longer, so that the request outlives its client's leaving: the tiny model
    # could otherwise finish its 480 tokens before the server hears of it on a busy machine
    # (the engine's thread starving the event loop's of the GIL).
    decode = live.engine.runner.decode
    monkeypatch.setattr(
        live.engine.runner, "decode", lambda *a, **k: time.sleep(0.005) or decode(*a, **k)
    )
    before = wait_for(live, lambda m: m["kiln_requests_running"] == 0)
    # Without the prefix cache, which would keep the cancelled conversation's whole pages for a
    # next turn (its job), every page the request takes must come back.
    monkeypatch.setattr(live.engine, "prefix_cache", None)
    sock = open_stream(live, {"prompt": "x", "max_tokens": 480, "temperature": 0})
    read_events(sock, 100)
    during = scrape(live)
    sock.close()
    after = wait_for(live, lambda m: m["kiln_requests_running"] == 0, timeout=5)

    cancelled = 'kiln_requests_finished_total{reason="cancelled"}'
    assert during["kiln_requests_running"] == 1
    assert during["kiln_kv_pages_used"] >= before["kiln_kv_pages_used"] + 6  # ~100 tokens
    assert after["kiln_requests_running"] == 0
    assert after["kiln_kv_pages_used"] == before["kiln_kv_pages_used"]
    assert after[cancelled] == before.get(cancelled, 0) + 1
    generated = after["kiln_generation_tokens_total"] - before["kiln_generation_tokens_total"]
    assert 100 <= generated < 480


def test_disconnect_while_queued_or_not_streaming(tiny_path):
    """A client that leaves before its first token (queued behind another) or during a
    non-streaming request has its request cancelled too."""
    with live_server(tiny_path, max_batch_size=1) as live:
        first = open_stream(live, {"prompt": "x", "max_tokens": 480, "temperature": 0})
        read_events(first, 1)
        body = json.dumps({"prompt": "y", "max_tokens": 480}).encode()
        waiting = socket.create_connection((live.host, live.port))
        waiting.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert (
            wait_for(live, lambda m: m["kiln_requests_waiting"] == 1)["kiln_requests_waiting"] == 1
        )
        waiting.close()
        first.close()
        after = wait_for(live, lambda m: m["kiln_http_requests_in_flight"] == 0)
        assert after["kiln_http_requests_in_flight"] == 0
        assert after["kiln_requests_running"] == after["kiln_requests_waiting"] == 0
        assert after['kiln_requests_finished_total{reason="cancelled"}'] == 2
        assert after["kiln_kv_pages_used"] == 0


# -- errors ------------------------------------------------------------------------------------


def test_error_statuses(live, client, model):
    completions, chat = "/v1/completions", "/v1/chat/completions"
    ok = {"prompt": PROMPT, "max_tokens": 4}
    too_long = [1] * (live.engine.context_length + 10)
    cases = [
        (completions, b'{"prompt": "x",', AUTH, 400, "JSON"),
        (completions, b"\xff\xfe", AUTH, 400, "JSON"),
        (completions, b"[1, 2]", AUTH, 400, "object"),
        (completions, {"max_tokens": 4}, AUTH, 400, "prompt is required"),
        (completions, ok | {"max_tokens": "ten"}, AUTH, 400, "max_tokens"),
        (completions, ok | {"temperature": "hot"}, AUTH, 400, "temperature"),
        (completions, ok | {"stream": 1}, AUTH, 400, "stream"),
        (completions, ok | {"prompt": {"text": "x"}}, AUTH, 400, "prompt must be"),
        (chat, {"messages": "hello"}, AUTH, 400, "messages"),
        (chat, {"messages": [{"content": "no role"}]}, AUTH, 400, "role"),
        (completions, ok | {"temperature": -1}, AUTH, 400, "temperature"),
        (completions, ok | {"top_p": 0}, AUTH, 400, "top_p"),
        (completions, ok | {"max_tokens": 0}, AUTH, 400, "max_tokens"),
        (completions, ok | {"n": 0}, AUTH, 400, "n is 0"),
        (completions, ok | {"seed": -3}, AUTH, 400, "seed"),
        (completions, ok | {"presence_penalty": 9}, AUTH, 400, "presence_penalty"),
        (completions, ok | {"stop": [""]}, AUTH, 400, "stop"),
        (completions, ok | {"logprobs": 99}, AUTH, 400, "logprobs"),
        (completions, ok | {"logit_bias": {"5": 10}}, AUTH, 400, "logit_bias"),
        (completions, ok | {"stream_options": {"include_usage": True}}, AUTH, 400, "stream"),
        (completions, {"prompt": [5, 99999]}, AUTH, 400, "vocabulary"),
        (completions, {"prompt": []}, AUTH, 400, "empty"),
        (completions, {"prompt": too_long}, AUTH, 400, str(live.engine.context_length)),
        (
            chat,
            {"messages": [{"role": "user", "content": "word " * 600}]},
            AUTH,
            400,
            str(live.engine.context_length),
        ),
        (completions, ok | {"max_tokens": 100_000}, AUTH, 400, str(live.engine.context_length)),
        (completions, ok | {"model": "gpt-4"}, AUTH, 404, "gpt-4"),
        (chat, {"model": "nope", "messages": MESSAGES}, AUTH, 404, "nope"),
        (completions, ok, {}, 401, "API key"),
        (completions, ok, {"Authorization": "Bearer wrong"}, 401, "API key"),
        (chat, {"messages": MESSAGES}, {"Authorization": KEY}, 401, "API key"),
        ("/v1/embeddings", ok, AUTH, 404, "Not Found"),
    ]
    before = scrape(live)
    for path, body, headers, expected, needle in cases:
        status, _, raw = post(live, path, body, headers)
        error = assert_error(status, raw, expected)
        assert needle in error["message"], (path, body, error)
    status, _, raw = call(live, "GET", "/v1/models")
    assert_error(status, raw, 401)
    status, _, raw = call(live, "GET", completions, headers=AUTH)
    assert_error(status, raw, 405)

    # The openai client maps them to its exception types.
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match=str(live.engine.context_length)):
        client.completions.create(model=MODEL, prompt=too_long, max_tokens=2)
    bad_key = openai.OpenAI(base_url=f"{live.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()

    after = scrape(live)
    assert after['kiln_http_errors_total{status="400"}'] > before.get(
        'kiln_http_errors_total{status="400"}', 0
    )
    # Nothing was left running, and the server still answers.
    assert after["kiln_http_requests_in_flight"] == 0
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert out.choices[0].text == model.generate(PROMPT, max_tokens=8, temperature=0)


def test_full_queue_gets_429(tiny_path):
    with live_server(tiny_path, max_batch_size=1, max_queue=1) as live:
        status, _, raw = post(live, "/v1/completions", {"prompt": "x", "n": 3})
        assert "at most 2" in assert_error(status, raw, 400)["message"]

        # Two generations fill it: one runs, one waits.
        sock = open_stream(live, {"prompt": "x", "n": 2, "max_tokens": 480, "temperature": 0})
        read_events(sock, 1)
        assert scrape(live)["kiln_http_requests_in_flight"] == 2
        status, headers, raw = post(live, "/v1/completions", {"prompt": "y", "max_tokens": 2})
        assert_error(status, raw, 429)
        assert int(headers["retry-after"]) >= 1
        sock.close()

        wait_for(live, lambda m: m["kiln_http_requests_in_flight"] == 0)
        status, _, raw = post(live, "/v1/completions", {"prompt": "y", "max_tokens": 2})
        assert status == 200, raw


# -- fuzzing -----------------------------------------------------------------------------------

# Bodies start valid (so that fuzzing reaches generation) and then get up to two fields set to
# arbitrary JSON or edge values, maybe lose a required field, or are replaced by random bytes.
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
_edge = st.sampled_from(
    [0, -1, 1, 2**63, 2**64, -(2**63), 1e308, -1e308, 5e-324, 0.5, "", "1", [], {}, None, True]
)
_stops = st.text(min_size=1, max_size=3)
_options = {
    "model": st.just(MODEL),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 50),
    "seed": st.integers(0, 2**64),
    "stop": _stops | st.lists(_stops, max_size=3),
    "n": st.integers(1, 3),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "user": st.text(max_size=5),
}
_completion_options = {**_options, "logprobs": st.integers(0, 5)}
_chat_options = {
    **_options,
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 5),
    "max_completion_tokens": st.integers(1, 8),
}
_prompt = (
    st.text(max_size=40)
    | st.lists(st.integers(0, 2047), min_size=1, max_size=10)
    | st.lists(st.text(max_size=10), min_size=1, max_size=2)
)
_content = st.text(max_size=30) | st.lists(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)}), max_size=2
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": _content}
)
_fields = sorted({*_chat_options, *_completion_options, "prompt", "messages", "max_tokens"})


@st.composite
def _requests(draw) -> tuple[str, Any]:
    chat = draw(st.booleans())
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if draw(st.integers(0, 19)) == 0:
        return path, draw(st.binary(max_size=40))
    body: dict[str, Any] = {"max_tokens": draw(st.integers(1, 8))}
    if chat:
        body["messages"] = draw(st.lists(_message, min_size=1, max_size=3))
    else:
        body["prompt"] = draw(_prompt)
    options = _chat_options if chat else _completion_options
    body |= draw(st.fixed_dictionaries({}, optional=options))
    if "stream_options" in body:
        body["stream"] = True
    broken = st.sampled_from(_fields) | st.text(max_size=6)
    body |= draw(st.dictionaries(broken, _edge | _json, max_size=2))
    for key in draw(st.lists(st.sampled_from(["max_tokens", "prompt", "messages"]), max_size=1)):
        body.pop(key, None)
    return path, body


@pytest.fixture(scope="module")
def small_live(tiny_path):
    """A server with a short context and queue, so that a fuzzed request that happens to be
    valid generates little."""
    with live_server(tiny_path, context_length=48, max_queue=8) as s:
        yield s


@settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(case=_requests())
def test_fuzzed_bodies_never_get_a_5xx(small_live, case):
    path, body = case
    status, headers, raw = post(small_live, path, body)
    assert status < 500, raw[:300]
    if status >= 400:
        assert_error(status, raw, status)
    elif headers["content-type"].startswith("text/event-stream"):
        assert events(raw)
    else:
        assert json.loads(raw)["choices"]


def test_fuzzing_left_nothing_behind(small_live):
    """After the fuzz test, on its server: nothing still runs and nothing failed inside."""
    samples = wait_for(small_live, lambda m: m["kiln_http_requests_in_flight"] == 0)
    assert samples["kiln_http_requests_in_flight"] == 0
    assert samples["kiln_requests_running"] == samples["kiln_requests_waiting"] == 0
    assert not any(k.startswith('kiln_http_errors_total{status="5') for k in samples)
    assert samples.get('kiln_requests_finished_total{reason="error"}', 0) == 0


# -- shutdown ----------------------------------------------------------------------------------


def test_shutdown_lets_running_requests_finish(tiny_path, model):
    expect = model.generate(PROMPT, max_tokens=200, temperature=0)
    with live_server(tiny_path, shutdown_grace=30) as live:
        sock = open_stream(live, {"prompt": PROMPT, "max_tokens": 200, "temperature": 0})
        raw = read_events(sock, 2)
        live.server.should_exit = True
        while data := sock.recv(65536):
            raw += data
        sock.close()
        live.thread.join(timeout=30)
        assert not live.thread.is_alive()
    body = raw.split(b"\r\n\r\n", 1)[1]
    chunks = events(_unchunk(body))
    assert streamed(chunks, chat=False)[0] == expect
    assert not live.engine.running_in_background


def test_shutdown_cancels_what_outlives_the_grace_period(tiny_path):
    with live_server(tiny_path, shutdown_grace=0) as live:
        sock = open_stream(live, {"prompt": "x", "max_tokens": 480, "temperature": 0})
        raw = read_events(sock, 2)
        live.server.should_exit = True
        while data := sock.recv(65536):
            raw += data
        sock.close()
        live.thread.join(timeout=30)
        assert not live.thread.is_alive()
    chunks = events(_unchunk(raw.split(b"\r\n\r\n", 1)[1]))
    assert "shut down" in chunks[-1]["error"]["message"]
    stats = live.engine.stats
    assert stats.running == stats.waiting == 0 and stats.free_pages == stats.total_pages


def _unchunk(body: bytes) -> bytes:
    """Decode an HTTP/1.1 chunked body."""
    out = b""
    while body:
        size, _, body = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out, body = out + body[:n], body[n + 2 :]
    return out


# -- the chat page -----------------------------------------------------------------------------


def _chromium() -> str | None:
    return next(
        filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
    )


def test_chat_page_streams_an_answer_in_chromium(live, model):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium chromium-driver)")
    driver_path = shutil.which("chromedriver")
    assert driver_path, "chromium is installed but chromedriver is not (chromium-driver)"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(f"{live.url}/")
        key = driver.find_element(By.ID, "api-key")
        key.send_keys(KEY, Keys.TAB)
        for field, value in (("temperature", "0"), ("max-tokens", "32")):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        message = "Write a function that adds two numbers."
        driver.find_element(By.ID, "input").send_keys(message, Keys.ENTER)
        answer = WebDriverWait(driver, 30).until(
            lambda d: d.find_element(By.CSS_SELECTOR, ".message[data-done='true']")
        )
        assert "error" not in answer.get_attribute("class"), answer.text
        expect = model.chat([{"role": "user", "content": message}], max_tokens=32, temperature=0)
        assert answer.get_property("textContent") == expect
        assert int(answer.get_attribute("data-chunks")) > 1  # it arrived piece by piece
        user = driver.find_element(By.CSS_SELECTOR, ".message.user")
        assert user.get_property("textContent") == message
    finally:
        driver.quit()


# -- the command -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_kiln_serve_command_runs_on_the_runtime_alone(tiny_path, model):
    port = _free_port()
    code = (
        "import atexit, json, sys\n"
        "atexit.register(lambda: print('MODULES', json.dumps(sorted(m for m in sys.modules if "
        "m.startswith(('tvm.relax', 'kiln.models', 'transformers')) or "
        "(m.startswith('kiln.compiler.') and m != 'kiln.compiler.cli'))), flush=True))\n"
        "from kiln.compiler.cli import main\n"
        f"main(['serve', {str(tiny_path)!r}, '--port', '{port}', '--model-name', {MODEL!r}, "
        f"'--api-key', {KEY!r}, '--shutdown-grace', '5'])\n"
    )
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    env.pop("KILN_DEBUG", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    live = Live("127.0.0.1", port, None, None, None)  # type: ignore[arg-type]
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()
            with contextlib.suppress(OSError):
                if call(live, "GET", "/health")[0] == 200:
                    break
            assert time.monotonic() < deadline, "kiln serve did not come up"
            time.sleep(0.2)
        status, _, raw = post(
            live, "/v1/completions", {"prompt": PROMPT, "max_tokens": 12, "temperature": 0}
        )
        assert status == 200
        assert json.loads(raw)["choices"][0]["text"] == model.generate(
            PROMPT, max_tokens=12, temperature=0
        )
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "serving tiny-llama" in err
    assert out.strip().splitlines()[-1] == "MODULES []"
