"""The admin surface: probes and metrics on a separate plain-HTTP port."""

from __future__ import annotations

__all__ = ["LIVENESS_PATH", "METRICS_PATH", "READINESS_PATH"]

LIVENESS_PATH = "/healthz"
READINESS_PATH = "/readyz"
METRICS_PATH = "/metrics"
