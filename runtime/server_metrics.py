"""Prometheus metrics of `kiln serve`, in the text exposition format (no client library).

Engine state (running and waiting requests, KV pages, preemptions, token counters) is read
from `Engine.stats` when /metrics is scraped. Latencies are measured by the server as the
client sees them: time to first token from the HTTP request's arrival, inter-token latency
between consecutive tokens of one choice. Everything here runs on the event loop's thread.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter, deque

from kiln.runtime.engine import EngineStats

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
RATE_WINDOW = 10.0  # seconds of generated tokens behind the tokens/s gauge


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            cumulative += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
        out += [f"{name}_sum {self.sum!r}", f"{name}_count {self.count}"]
        return out


class ServerMetrics:
    """What the server observes about its requests; `render` adds the engine's state."""

    def __init__(self) -> None:
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.finished: Counter[str] = Counter()  # finish reason -> engine requests
        self.errors: Counter[int] = Counter()  # HTTP status -> refused requests
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) inside RATE_WINDOW

    def token(self, now: float) -> None:
        self.generated_tokens += 1
        if self._recent and self._recent[-1][0] == now:
            self._recent[-1] = (now, self._recent[-1][1] + 1)
        else:
            self._recent.append((now, 1))

    def tokens_per_second(self, now: float) -> float:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / RATE_WINDOW

    def render(self, stats: EngineStats, in_flight: int) -> str:
        now = time.monotonic()
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, *values: str) -> None:
            lines.extend((f"# HELP {name} {help}", f"# TYPE {name} {kind}", *values))

        def one(name: str, kind: str, help: str, value: float) -> None:
            metric(name, kind, help, f"{name} {value}")

        one(
            "kiln_requests_running",
            "gauge",
            "Engine requests (one per choice) generating now.",
            stats.running,
        )
        one(
            "kiln_requests_waiting",
            "gauge",
            "Engine requests queued for a batch slot or KV pages.",
            stats.waiting,
        )
        one(
            "kiln_http_requests_in_flight",
            "gauge",
            "Generations admitted by the server and not finished.",
            in_flight,
        )
        one(
            "kiln_kv_pages_used",
            "gauge",
            "KV-cache pages in use (requests and prefix-cache entries).",
            stats.total_pages - stats.free_pages,
        )
        one("kiln_kv_pages_total", "gauge", "KV-cache pages in all.", stats.total_pages)
        one(
            "kiln_prefix_cache_entries",
            "gauge",
            "Prefixes (prompts, finished turns) kept in the KV cache for reuse.",
            stats.prefix_entries,
        )
        one(
            "kiln_preemptions_total",
            "counter",
            "Requests whose KV pages were taken back to make room (they recompute).",
            stats.preemptions,
        )
        one(
            "kiln_generation_tokens_per_second",
            "gauge",
            f"Tokens generated per second over the last {RATE_WINDOW:g} s.",
            self.tokens_per_second(now),
        )
        one("kiln_generation_tokens_total", "counter", "Tokens generated.", self.generated_tokens)
        one(
            "kiln_prompt_tokens_total",
            "counter",
            "Prompt tokens of finished engine requests.",
            self.prompt_tokens,
        )
        one(
            "kiln_prefill_tokens_total",
            "counter",
            "Tokens run through prefill passes (recomputation included).",
            stats.prefill_tokens,
        )
        one(
            "kiln_cached_prompt_tokens_total",
            "counter",
            "Prompt tokens whose KV came from the prefix cache.",
            stats.cached_tokens,
        )
        metric(
            "kiln_time_to_first_token_seconds",
            "histogram",
            "From the HTTP request's arrival to a choice's first token.",
            *self.ttft.lines("kiln_time_to_first_token_seconds"),
        )
        metric(
            "kiln_inter_token_latency_seconds",
            "histogram",
            "Between consecutive tokens of one choice.",
            *self.itl.lines("kiln_inter_token_latency_seconds"),
        )
        metric(
            "kiln_requests_finished_total",
            "counter",
            "Engine requests finished, by reason (stop, length, cancelled, error).",
            *(
                f'kiln_requests_finished_total{{reason="{r}"}} {n}'
                for r, n in sorted(self.finished.items())
            ),
        )
        metric(
            "kiln_http_errors_total",
            "counter",
            "Requests refused, by HTTP status.",
            *(
                f'kiln_http_errors_total{{status="{s}"}} {n}'
                for s, n in sorted(self.errors.items())
            ),
        )
        return "\n".join(lines) + "\n"
