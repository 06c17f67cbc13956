"""Prometheus metrics, served at /metrics.

One registry per application (not the library's global one), so that two apps
in one process (the tests) keep their own counts.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "inngest_outbox"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
# The outbox gauges cost queries: read at most this often.
OUTBOX_REFRESH_SECONDS = 5.0
# A client chooses the method: anything else is "other", so labels stay few.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http = _HttpRequests()
        r.register(self.http)
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
        self.cookies_rejected = Counter(
            f"{PREFIX}_session_cookies_rejected",
            "Session cookies that did not decrypt: forged, tampered with, of another "
            "SESSION_SECRET, or older than SESSION_MAX_AGE",
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
        # Labelled by relay key name: operators create the names, so they stay few.
        self.relay_received = Counter(
            f"{PREFIX}_relay_events_received",
            "Events in valid requests to POST /e/{key}, by key name",
            ["key"],
            registry=r,
        )
        self.relay_stored = Counter(
            f"{PREFIX}_relay_events_stored",
            "Relayed events written to the outbox, by key name (an id the outbox "
            "held already is received, not stored)",
            ["key"],
            registry=r,
        )
        self._outbox_read_at: float | None = None
        # Each key's two counters, found once: labels() costs a lock and a
        # look-up on every relay request otherwise.
        self._relay_counters: dict[str, tuple[Counter, Counter]] = {}

    def relay_counters(self, key: str) -> tuple[Counter, Counter]:
        """The counters of events received and stored for relay key ``key``."""
        counters = self._relay_counters.get(key)
        if counters is None:
            counters = (self.relay_received.labels(key), self.relay_stored.labels(key))
            self._relay_counters[key] = counters
        return counters

    def outbox_due(self, now: float) -> bool:
        """Whether the outbox gauges are stale (and, if so, now taken as refreshed)."""
        if self._outbox_read_at is not None and now - self._outbox_read_at < OUTBOX_REFRESH_SECONDS:
            return False
        self._outbox_read_at = now
        return True

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.http.observe(route, method, status, seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _HttpRequests(Collector):
    """The per-request counter and latency histogram, kept in plain dicts.

    prometheus_client's labelled children take a lock and make a few objects
    on every request; this runs on the event loop's thread only (requests and
    /metrics alike), so plain integers do, turned into metric families only
    when /metrics is read.
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, int], int] = {}
        self._latency: dict[str, _Latency] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        if method not in METHODS:
            method = "other"  # a client chooses the method: labels must stay few
        key = (route, method, status)
        self._counts[key] = self._counts.get(key, 0) + 1
        latency = self._latency.get(route)
        if latency is None:
            latency = self._latency[route] = _Latency()
        latency.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        latency.total += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            f"{PREFIX}_http_requests",
            "HTTP requests answered, by route, method and status code",
            labels=["route", "method", "status"],
        )
        for (route, method, status), count in sorted(self._counts.items()):
            requests.add_metric([route, method, str(status)], count)
        yield requests
        seconds = HistogramMetricFamily(
            f"{PREFIX}_http_request_duration_seconds",
            "Time to answer an HTTP request, by route",
            labels=["route"],
        )
        for route, latency in sorted(self._latency.items()):
            cumulative, running = [], 0
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), latency.buckets, strict=True):
                running += count
                cumulative.append((_bound(bound), running))
            seconds.add_metric([route], cumulative, latency.total)
        yield seconds


class _Latency:
    """One route's histogram: a count per bucket (the last is +Inf), and the sum."""

    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(float(value))
