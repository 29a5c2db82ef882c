"""Metrics added up between flushes read exactly as if each had been recorded at once."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from mtls_gateway.metrics import _LATENCY_BUCKETS, Metrics


def _series(text: bytes, name: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        rf"^{name}(\{{[^}}]*\}}) (\S+)$", text.decode(), re.M)}


@pytest.mark.parametrize("seconds", [
    [],
    [0.0001],
    [0.0005, 0.001, 0.0025],              # exactly on bucket bounds
    [0.0004, 0.7, 31.0, 12.0, 0.003],     # one past the last bound (+Inf)
    [0.002] * 50,
])
def test_added_up_requests_equal_direct_recording(seconds: list[float]) -> None:
    metrics = Metrics()
    registry = CollectorRegistry()
    reference = Histogram("mtls_gateway_request_duration_seconds", "x", ["route"],
                          buckets=_LATENCY_BUCKETS, registry=registry)
    reference.labels("api")          # the series exists before any observation, as ours
    for value in seconds:
        metrics.request("api", "allow", "allowed", 200, value)
        reference.labels("api").observe(value)
    rendered = metrics.render()                 # flushes first
    expected = generate_latest(registry)
    for suffix in ("_bucket", "_count", "_sum"):
        name = "mtls_gateway_request_duration_seconds" + suffix
        mine = _series(rendered, name)
        assert mine == _series(expected, name) if seconds else mine == {}
    total = _series(rendered, "mtls_gateway_requests_total")
    assert sum(total.values()) == len(seconds)


def test_flush_hands_over_once() -> None:
    metrics = Metrics()
    for _ in range(3):
        metrics.request("api", "deny", "binding_mismatch", 401, 0.001)
    metrics.flush()
    metrics.flush()                             # nothing new: nothing added twice
    child = metrics.requests.labels("api", "deny", "binding_mismatch", "401")
    assert child._value.get() == 3
    assert _series(metrics.render(), "mtls_gateway_request_duration_seconds_count") == {
        '{route="api"}': 3.0}


def test_every_metric_is_documented() -> None:
    """docs/metrics.md lists every series the gateway exports (a new one cannot be forgotten)."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    names = set(re.findall(r'"(mtls_gateway_[a-z_]+)"',
                           (repo / "mtls_gateway" / "metrics.py").read_text()))
    documented = (repo / "docs" / "metrics.md").read_text()
    assert len(names) >= 12
    assert {n for n in names if f"`{n}" not in documented} == set()


@pytest.mark.parametrize("hits", [0, 1, 7])
def test_added_counter_increments_reach_the_counter_at_flush(hits: int) -> None:
    """Per-request counter increments (verified-JWT cache hits) are added up and handed to
    prometheus-client at the flush, whole."""
    metrics = Metrics()
    child = metrics.jwt_cache.labels("jwt", "hit")
    for _ in range(hits):
        metrics.add(child)
    assert child._value.get() == 0
    out = metrics.render().decode()
    assert f'mtls_gateway_jwt_cache_total{{outcome="hit",provider="jwt"}} {float(hits)}' in out
    metrics.flush()
    assert child._value.get() == hits
