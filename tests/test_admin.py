"""The admin port: probes and metrics, moved by real requests."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
from cryptography import x509

from gwtest import Issuer, Pki, RunningGateway, Upstream, base_config
from mtls_gateway.admin import LIVENESS_PATH, METRICS_PATH, READINESS_PATH


async def _admin_get(gw: RunningGateway, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://127.0.0.1:{gw.server.admin_port}{path}") as resp:
        return resp.status, await resp.text()


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _with_admin(make_gateway: Any, config: dict[str, Any]) -> RunningGateway:
    config["admin"] = {"enabled": True, "host": "127.0.0.1", "port": 0}
    gw: RunningGateway = await make_gateway(config)
    return gw


async def test_probes(make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream) -> None:
    gw = await _with_admin(make_gateway, base_config(pki, issuer, upstream))
    assert await _admin_get(gw, LIVENESS_PATH) == (200, '{"status": "ok"}')
    status, body = await _admin_get(gw, READINESS_PATH)
    assert status == 200 and '"ready": true' in body
    # the admin surface is never on the mTLS port
    reply = await gw.request(METRICS_PATH, cert="a")
    assert reply.status == 401 and upstream.seen == []


async def test_not_ready_until_every_jwks_loaded(make_gateway: Any, pki: Pki, issuer: Issuer,
                                                 upstream: Upstream) -> None:
    issuer.fail_with = 503
    config = base_config(pki, issuer, upstream)
    config["providers"]["corp"]["jwks_refresh_interval"] = "5m"
    gw = await _with_admin(make_gateway, config)
    status, body = await _admin_get(gw, READINESS_PATH)
    assert status == 503 and '"keys_loaded": false' in body
    issuer.fail_with = None
    assert (await gw.request("/x", token=issuer.mint(pki.clients["a"].thumbprint))).status == 200
    assert (await _admin_get(gw, READINESS_PATH))[0] == 200


async def test_metrics_move_with_real_requests(make_gateway: Any, pki: Pki, issuer: Issuer,
                                               upstream: Upstream) -> None:
    gw = await _with_admin(make_gateway, base_config(pki, issuer, upstream))
    token = issuer.mint(pki.clients["a"].thumbprint)
    for cert in ("a", "a", "b"):
        await gw.request("/x", cert=cert, token=token)
    await gw.request("/public/p", cert=None)
    status, text = await _admin_get(gw, METRICS_PATH)
    assert status == 200
    requests = "mtls_gateway_requests_total"
    assert _sample(text, requests, route="api", decision="allow", reason="allowed",
                   status="200") == 2
    assert _sample(text, requests, route="api", decision="deny", reason="binding_mismatch",
                   status="401") == 1
    assert _sample(text, requests, route="public", reason="public_route") == 1
    assert _sample(text, "mtls_gateway_request_duration_seconds_count", route="api") == 3
    assert _sample(text, "mtls_gateway_upstream_duration_seconds_count", route="api") == 2
    assert _sample(text, "mtls_gateway_jwks_fetches_total", provider="corp",
                   result="success") >= 1
    expiry = x509.load_pem_x509_certificate(pki.server_cert.read_bytes()).not_valid_after_utc
    assert _sample(text, "mtls_gateway_server_certificate_expiry_timestamp_seconds") == \
        expiry.timestamp()


async def test_upstream_errors_are_counted(make_gateway: Any, pki: Pki, issuer: Issuer,
                                           upstream: Upstream) -> None:
    config = base_config(pki, issuer, upstream)
    await upstream.stop()
    gw = await _with_admin(make_gateway, config)
    await gw.request("/public/x", cert=None)
    _, text = await _admin_get(gw, METRICS_PATH)
    assert _sample(text, "mtls_gateway_upstream_errors_total", route="public",
                   reason="upstream_unavailable") == 1
