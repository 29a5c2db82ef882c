"""Prometheus metrics, recorded when things happen.

One :class:`Metrics` per process, shared by every :class:`Gateway` built across
reloads so counters never reset on a config change. With ``--workers N`` the
parent sets ``PROMETHEUS_MULTIPROC_DIR`` before starting the workers; their
values then live in shared memory-mapped files and the parent's admin port
serves the sum (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["Metrics", "multiprocess_registry"]

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
        self.config_reloads = Counter(
            "mtls_gateway_config_reloads", "Reloads of config and TLS material by result.",
            ["result"], registry=r)
        self.server_cert_expiry = Gauge(
            "mtls_gateway_server_certificate_expiry_timestamp_seconds",
            "notAfter of the server certificate in use.", registry=r,
            multiprocess_mode="min")

        # Children by label values: labels() costs more than the increment itself, and the
        # same few label sets come back on every request.
        self._children: dict[tuple[Any, ...], Any] = {}

    def request(self, route: str, decision: str, reason: str, status: int,
                seconds: float) -> None:
        """One request's outcome: the requests counter and the duration histogram."""
        children = self._children
        key = ("r", route, decision, reason, status)
        counter = children.get(key)
        if counter is None:
            counter = children[key] = self.requests.labels(route, decision, reason, str(status))
        counter.inc()
        self.route_histogram(self.request_seconds, route).observe(seconds)

    def route_histogram(self, histogram: Histogram, route: str) -> Any:
        key = (id(histogram), route)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = histogram.labels(route)
        return child

    def render(self) -> bytes:
        return generate_latest(self.registry)


def multiprocess_registry() -> CollectorRegistry | None:
    """A registry summing all workers' values, when multiprocess mode is on."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry
