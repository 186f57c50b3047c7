"""Prometheus metrics of ``dsv3 serve`` (``GET /metrics``), with prometheus_client.

Latencies are observed by the app as each request's events arrive (:class:`RequestTimer`); the
scheduler's state (running and waiting requests, pages, prefix-cache hits, preemptions, MTP drafts)
is read from ``Scheduler.stats()`` when the metrics are scraped, so nothing is counted twice.
Names follow Prometheus' conventions (``_total`` counters, ``_seconds`` histograms) with a ``dsv3_``
prefix; each server has its own registry.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Latency buckets in seconds: from a fast decode step to a long prefill on a CPU.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

#: Scheduler.stats() keys exported as gauges (a state now) and as counters (since start-up).
_GAUGES = {
    "slots_used": ("requests_running", "Requests holding a cache slot (prefilling or decoding)."),
    "prefilling": ("requests_prefilling", "Requests whose prompt is still being prefilled."),
    "waiting": ("requests_waiting", "Requests queued for a slot or pages."),
    "pages_total": ("cache_pages_total", "Pages in the cache pool."),
    "pages_used": ("cache_pages_used", "Pages held by requests."),
    "pages_free": ("cache_pages_free", "Pages neither held nor caching a prefix."),
    "pages_cached": ("cache_pages_cached", "Pages keeping a cached prompt prefix (held or evictable)."),
}
_COUNTERS = {
    "submitted": ("scheduler_requests", "Requests submitted to the scheduler."),
    "finished": ("scheduler_finished_requests", "Requests that ran to a stop or length limit."),
    "cancelled": ("scheduler_cancelled_requests", "Requests cancelled (client gone, stop string)."),
    "errors": ("scheduler_failed_requests", "Requests ended by a model error."),
    "preempted": ("preemptions", "Requests preempted when the page pool ran out (recomputed later)."),
    "prefill_tokens": ("prefill_tokens", "Prompt tokens prefilled (cached prefix tokens not included)."),
    "prefix_hit_tokens": ("prefix_cache_hit_tokens", "Prompt tokens read from the prefix cache instead of prefilled."),
    "tokens": ("generation_tokens", "Tokens generated."),
    "steps": ("decode_steps", "Decode (or draft-and-verify) steps run."),
    "drafts": ("mtp_draft_tokens", "MTP draft tokens proposed (speculative decoding)."),
    "accepted_drafts": ("mtp_accepted_tokens", "MTP draft tokens the main model accepted."),
}


class _SchedulerCollector(Collector):
    """The scheduler's stats at scrape time."""

    def __init__(self, stats: Callable[[], dict]):
        self.stats = stats

    def collect(self) -> Iterator:
        s = self.stats()
        for key, (name, doc) in _GAUGES.items():
            if key in s:
                yield GaugeMetricFamily(f"dsv3_{name}", doc, value=s[key])
        for key, (name, doc) in _COUNTERS.items():
            if key in s:
                yield CounterMetricFamily(f"dsv3_{name}", doc, value=s[key])
        looked_up = s.get("prefill_tokens", 0) + s.get("prefix_hit_tokens", 0)
        rate = s.get("prefix_hit_tokens", 0) / looked_up if looked_up else 0.0
        yield GaugeMetricFamily(
            "dsv3_prefix_cache_hit_rate", "Share of prompt tokens read from the prefix cache.", rate
        )


class ServeMetrics:
    """One server's metrics: HTTP requests by endpoint and status, request latencies, the scheduler's state."""

    def __init__(self, stats: Callable[[], dict]):
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "dsv3_http_requests",
            "HTTP requests answered, by endpoint and status code.",
            ("endpoint", "status"),
            registry=self.registry,
        )
        self.ttft = Histogram(
            "dsv3_time_to_first_token_seconds",
            "From submission to a request's first token.",
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.inter_token = Histogram(
            "dsv3_inter_token_latency_seconds",
            "Between two tokens of one request (a step's tokens share its gap).",
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "dsv3_e2e_request_latency_seconds",
            "From submission to a request's end.",
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "dsv3_prompt_tokens", "Prompt tokens of finished requests.", registry=self.registry
        )
        self.registry.register(_SchedulerCollector(stats))

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)

    def timer(self, prompt_tokens: int) -> RequestTimer:
        return RequestTimer(self, prompt_tokens)


class CountRequests:
    """ASGI middleware counting HTTP responses by endpoint and status in ``metrics.http_requests``.

    Plain ASGI on purpose: starlette's ``BaseHTTPMiddleware`` would hide a client's disconnect from
    ``Request.is_disconnected``, which the app polls to cancel abandoned requests. ``endpoints``: the
    paths counted by name; ``/v1/models/<id>`` counts as ``/v1/models/{name}``, anything else as ``other``.
    """

    def __init__(self, app, metrics: ServeMetrics, endpoints: frozenset[str]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    def _endpoint(self, path: str) -> str:
        if path in self.endpoints:
            return path
        return "/v1/models/{name}" if path.startswith("/v1/models/") else "other"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # nothing sent: the app failed before answering

        async def counted(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            self.metrics.http_requests.labels(self._endpoint(scope["path"]), str(status)).inc()


class RequestTimer:
    """One sequence's latencies: call :meth:`tokens` as its tokens arrive and :meth:`finish` once."""

    def __init__(self, metrics: ServeMetrics, prompt_tokens: int):
        self.metrics, self.prompt_tokens = metrics, prompt_tokens
        self.start = self.last = time.perf_counter()
        self.seen = 0
        self.done = False

    def tokens(self, n: int) -> None:
        if n <= 0 or self.done:
            return
        now = time.perf_counter()
        if self.seen == 0:  # the first event's other tokens (MTP) have no gap of their own: the prefill is TTFT's
            self.metrics.ttft.observe(now - self.start)
        else:
            for _ in range(n):  # several tokens of one step (MTP) share the gap since the last event
                self.metrics.inter_token.observe((now - self.last) / n)
        self.seen += n
        self.last = now

    def finish(self) -> None:
        if not self.done:
            self.done = True
            self.metrics.e2e.observe(time.perf_counter() - self.start)
            self.metrics.prompt_tokens.inc(self.prompt_tokens)
