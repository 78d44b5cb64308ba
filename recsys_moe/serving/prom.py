"""Prometheus metrics of the scoring endpoint.

Each app gets its own `CollectorRegistry`, so two apps in one process (tests, or a blue/green
pair) do not share or collide on counters. Request metrics are recorded by a small pure-ASGI
middleware (cheaper than Starlette's BaseHTTPMiddleware on the hot path); the endpoint label is
the route path, or "other" for paths the app does not serve, so scanners cannot blow up the
label cardinality.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from recsys_moe.serving.model_holder import LoadedModel

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Latency buckets around the 20 ms p99 target of /v1/rank.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "recsys_serving_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "recsys_serving_request_seconds",
            "request latency (server side)",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rows_scored = Counter("recsys_serving_rows_scored", "rows scored", ["endpoint"], registry=r)
        self.rows_rejected = Counter(
            "recsys_serving_rows_rejected", "rows the model's validation rejected", ["endpoint"], registry=r
        )
        self.model_info = Gauge(
            "recsys_serving_model_info",
            "the model being served (value 1)",
            ["name", "version", "run_id", "spec"],
            registry=r,
        )
        self.model_version = Gauge(
            "recsys_serving_model_version", "registry version being served (0 for a bundle directory)", registry=r
        )
        self.model_loaded = Gauge(
            "recsys_serving_model_loaded_timestamp_seconds", "when the current model was loaded", registry=r
        )
        self.swaps = Counter("recsys_serving_model_swaps", "model swaps after startup", registry=r)
        self.poll_errors = Counter("recsys_serving_model_poll_errors", "failed alias checks or loads", registry=r)

    def on_swap(self, old: LoadedModel | None, new: LoadedModel) -> None:
        if old is not None:
            self.swaps.inc()
        self.model_info.clear()
        self.model_info.labels(new.name, new.version, new.run_id or "", new.scorer.spec.name).set(1)
        self.model_version.set(float(new.version) if new.version.isdigit() else 0.0)
        self.model_loaded.set(new.loaded_at)

    def on_error(self, exc: Exception) -> None:
        self.poll_errors.inc()

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Counts every HTTP request by endpoint and status and times it (an unhandled error is 500)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, paths: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            path = scope.get("path", "")
            self.metrics.observe(path if path in self.paths else "other", status, time.perf_counter() - start)
