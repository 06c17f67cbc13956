"""Prometheus metrics, served at /metrics.

One registry per application (not the library's global one), so that two apps
in one process (the tests) keep their own counts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase

PREFIX = "inngest_outbox"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
# A client chooses the method: anything else is "other", so labels stay few.
# The outbox gauges cost queries: read at most this often.
OUTBOX_REFRESH_SECONDS = 5.0
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests answered, by route, method and status code",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "Time to answer an HTTP request, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rows = Gauge(
            f"{PREFIX}_rows",
            "Outbox rows by status: pending, sending, failed (delivered rows: deliveries_total)",
            ["status"],
            registry=r,
        )
        self.oldest_pending_age = Gauge(
            f"{PREFIX}_oldest_pending_age_seconds",
            "Age of the oldest row not yet delivered or failed (0 when there is none)",
            registry=r,
        )
        self.deliveries = Counter(
            f"{PREFIX}_deliveries", "Events this process's worker delivered", registry=r
        )
        self.failures = Counter(
            f"{PREFIX}_failures", "Events this process's worker moved to failed", registry=r
        )
        self.retries = Counter(
            f"{PREFIX}_retries", "Events this process's worker rescheduled", registry=r
        )
        self.deferrals = Counter(
            f"{PREFIX}_deferrals",
            "Events this process's worker gave back unspent because Inngest was unavailable",
            registry=r,
        )
        self.send_seconds = Histogram(
            f"{PREFIX}_send_duration_seconds",
            "Time of one request to Inngest's event API, by outcome",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_events = Histogram(
            f"{PREFIX}_send_batch_events",
            "Events per request to Inngest",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        # Label children, looked up once: labels() costs a lock and a tuple
        # per call, and the request counter is on every request's path.
        self._children: dict[tuple[str, ...], MetricWrapperBase] = {}
        self._outbox_read_at: float | None = None

    def outbox_due(self, now: float) -> bool:
        """Whether the outbox gauges are stale (and, if so, now taken as refreshed)."""
        if self._outbox_read_at is not None and now - self._outbox_read_at < OUTBOX_REFRESH_SECONDS:
            return False
        self._outbox_read_at = now
        return True

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method if method in METHODS else "other", str(status))
        counter = self._children.get(key)
        if counter is None:
            counter = self._children[key] = self.requests.labels(*key)
        counter.inc()  # type: ignore[attr-defined]
        latency = self._children.get((route,))
        if latency is None:
            latency = self._children[(route,)] = self.request_seconds.labels(route)
        latency.observe(seconds)  # type: ignore[attr-defined]

    def render(self) -> bytes:
        return generate_latest(self.registry)
