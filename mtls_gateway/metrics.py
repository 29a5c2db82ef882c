"""Prometheus metrics, recorded when things happen.

One :class:`Metrics` per process, shared by every :class:`Gateway` built across
reloads so counters never reset on a config change. With ``--workers N`` the
parent sets ``PROMETHEUS_MULTIPROC_DIR`` before starting the workers; their
values then live in shared memory-mapped files and the parent's admin port
serves the sum (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import bisect
import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["FLUSH_SECONDS", "Metrics", "multiprocess_registry"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Every series the gateway exposes; ``render()`` gives the text format."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mtls_gateway_requests", "Requests by route, decision, reason code and status.",
            ["route", "decision", "reason", "status"], registry=r)
        self.request_seconds = Histogram(
            "mtls_gateway_request_duration_seconds", "Whole request time in the gateway.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_seconds = Histogram(
            "mtls_gateway_upstream_duration_seconds",
            "Time until the upstream's response headers arrived.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_errors = Counter(
            "mtls_gateway_upstream_errors", "Upstream failures by reason code.",
            ["route", "reason"], registry=r)
        self.jwks_fetches = Counter(
            "mtls_gateway_jwks_fetches", "JWKS fetches by provider and result.",
            ["provider", "result"], registry=r)
        self.jwt_cache = Counter(
            "mtls_gateway_jwt_cache", "Verified-JWT cache lookups by provider: hit or miss "
            "(a miss checks the signature).", ["provider", "outcome"], registry=r)
        self.introspection_calls = Counter(
            "mtls_gateway_introspection_calls", "Introspection calls by provider and result.",
            ["provider", "result"], registry=r)
        self.introspection_seconds = Histogram(
            "mtls_gateway_introspection_duration_seconds", "Introspection call latency.",
            ["provider"], buckets=_LATENCY_BUCKETS, registry=r)
        self.introspection_cache = Counter(
            "mtls_gateway_introspection_cache", "Introspection cache lookups: hit, miss, "
            "coalesced (waited for a call already under way), short_circuited (breaker open).",
            ["provider", "outcome"], registry=r)
        self.tls_handshake_failures = Counter(
            "mtls_gateway_tls_handshake_failures", "Failed TLS handshakes on the listener by "
            "reason (no_certificate, unknown_ca, expired, ...; see docs/upstream-tls.md).",
            ["reason"], registry=r)
        self.config_reloads = Counter(
            "mtls_gateway_config_reloads", "Reloads of config and TLS material by result.",
            ["result"], registry=r)
        self.server_cert_expiry = Gauge(
            "mtls_gateway_server_certificate_expiry_timestamp_seconds",
            "notAfter of the server certificate in use.", registry=r,
            multiprocess_mode="min")

        # Per-request series are added up here and handed to prometheus-client by flush()
        # (at least every FLUSH_SECONDS, and before every render): its locked, per-call
        # increments and bucket searches were a tenth of a fast-lane request's CPU.
        self._counts: dict[tuple[str, str, str, int], int] = {}
        self._observed: dict[tuple[int, str], _Observed] = {}
        self._added: dict[Any, int] = {}       # counter child -> increments since the flush

    def add(self, child: Any) -> None:
        """``child.inc()`` for a labelled counter child, added up until the next flush."""
        added = self._added
        added[child] = added.get(child, 0) + 1

    def request(self, route: str, decision: str, reason: str, status: int,
                seconds: float) -> None:
        """One request's outcome: the requests counter and the duration histogram."""
        key = (route, decision, reason, status)
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1
        self.observe(self.request_seconds, route, seconds)

    def observe(self, histogram: Histogram, route: str, seconds: float) -> None:
        """``histogram.labels(route).observe(seconds)``, added up until the next flush."""
        observed = self._observed.get((id(histogram), route))
        if observed is None:
            observed = self._observed[(id(histogram), route)] = _Observed(histogram, route)
        observed.add(seconds)

    def flush(self) -> None:
        """Hand what was added up to prometheus-client (on the event loop's thread)."""
        counts, self._counts = self._counts, {}
        for (route, decision, reason, status), n in counts.items():
            self.requests.labels(route, decision, reason, str(status)).inc(n)
        added, self._added = self._added, {}
        for child, n in added.items():
            child.inc(n)
        for observed in self._observed.values():
            observed.flush()

    def render(self) -> bytes:
        self.flush()
        return generate_latest(self.registry)


#: How often the server flushes added-up metrics (so /metrics and other workers' sums lag
#: by at most this much; a render in the same process flushes first).
FLUSH_SECONDS = 1.0


class _Observed:
    """One histogram child's observations since the last flush, as bucket counts and a sum."""

    __slots__ = ("bounds", "child", "counts", "sum", "values")

    def __init__(self, histogram: Histogram, route: str) -> None:
        self.child = histogram.labels(route)
        # prometheus-client keeps per-bucket values and a sum; add to them in one go where
        # they are there (else observe each value, which is always right)
        direct = isinstance(getattr(self.child, "_buckets", None), list) and hasattr(
            self.child, "_sum") and hasattr(self.child, "_upper_bounds")
        self.bounds: list[float] | None = list(self.child._upper_bounds) if direct else None
        self.counts = [0] * len(self.bounds) if self.bounds is not None else []
        self.values: list[float] = []
        self.sum = 0.0

    def add(self, seconds: float) -> None:
        if self.bounds is None:
            self.values.append(seconds)
            return
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def flush(self) -> None:
        if self.bounds is None:
            values, self.values = self.values, []
            for value in values:
                self.child.observe(value)
            return
        if not any(self.counts):
            return
        buckets = self.child._buckets
        for i, n in enumerate(self.counts):
            if n:
                buckets[i].inc(n)
                self.counts[i] = 0
        self.child._sum.inc(self.sum)
        self.sum = 0.0


def multiprocess_registry() -> CollectorRegistry | None:
    """A registry summing all workers' values, when multiprocess mode is on."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry
