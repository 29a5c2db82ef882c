"""The admin surface: probes and metrics on a separate plain-HTTP port.

Never served on the mutual-TLS port. ``/healthz`` says the process serves;
``/readyz`` says the config is loaded, the listener is up, every JWKS has been
loaded at least once and the gateway is not draining; ``/metrics`` is the
Prometheus text format.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

__all__ = ["LIVENESS_PATH", "METRICS_PATH", "READINESS_PATH", "build_admin_app"]

LIVENESS_PATH = "/healthz"
READINESS_PATH = "/readyz"
METRICS_PATH = "/metrics"


def build_admin_app(*, readiness: Callable[[], dict[str, bool]],
                    render_metrics: Callable[[], bytes]) -> web.Application:
    """``readiness`` returns named checks; ready when all are true."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        checks = readiness()
        ready = all(checks.values())
        return web.json_response({"ready": ready, "checks": checks},
                                 status=200 if ready else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=render_metrics(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get(LIVENESS_PATH, healthz)
    app.router.add_get(READINESS_PATH, readyz)
    app.router.add_get(METRICS_PATH, metrics)
    return app
