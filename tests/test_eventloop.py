"""The event loop: uvloop when installed and not turned off, asyncio's own otherwise; the
gateway enforces the same binding on both, with each kind of listener (a real
``mtls-gateway run`` process each)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gwtest import GatewayProcess, Issuer, Pki, Upstream, base_config
from mtls_gateway import eventloop
from mtls_gateway.cert_headers import encode_client_cert

uvloop = pytest.importorskip("uvloop", reason="uvloop comes with the test extras; "
                                              "pip install -e '.[test]'")


@pytest.mark.parametrize(("env", "expected"), [
    (None, "uvloop"), ("1", "uvloop"), ("yes", "uvloop"),
    ("0", "asyncio"), ("off", "asyncio"), ("false", "asyncio"), (" No ", "asyncio"),
])
def test_loop_choice(monkeypatch: pytest.MonkeyPatch, env: str | None, expected: str) -> None:
    if env is None:
        monkeypatch.delenv(eventloop.UVLOOP_ENV, raising=False)
    else:
        monkeypatch.setenv(eventloop.UVLOOP_ENV, env)

    async def which() -> str:
        return eventloop.loop_name(asyncio.get_running_loop())

    assert eventloop.run(which()) == expected


def test_without_uvloop_installed_the_standard_loop_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(eventloop.UVLOOP_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "uvloop", None)   # import uvloop -> ImportError
    assert eventloop.loop_factory() is None


def _listener(config: dict[str, Any], mode: str) -> None:
    """pki: CPython ssl; any: the pyOpenSSL transport (tls_any.py); header: plain HTTP behind
    a trusted front proxy (RFC 9440 Client-Cert)."""
    if mode == "any":
        del config["listen"]["client_ca_file"]
        config["listen"]["client_ca"] = "any"
    elif mode == "header":
        config["listen"] = {"tls": False, "client_certificate": {
            "source": "header", "format": "rfc9440",
            "trusted_proxies": {"cidrs": ["127.0.0.1/32"]}}}


@pytest.mark.parametrize("mode", ["pki", "any", "header"])
@pytest.mark.parametrize("env", ["1", "0"])
async def test_gateway_process_on_each_loop_enforces_the_binding(
        pki: Pki, issuer: Issuer, upstream: Upstream, tmp_path: Path, env: str,
        mode: str) -> None:
    config = base_config(pki, issuer, upstream)
    _listener(config, mode)
    token = issuer.mint(pki.clients["a"].thumbprint)
    async with GatewayProcess(config, tmp_path, env={eventloop.UVLOOP_ENV: env}) as gw:
        statuses: dict[str, list[int]] = {}
        for cert in ("a", "b"):     # keep-alive: both requests on one connection per cert
            headers = {"Authorization": f"Bearer {token}"}
            if mode == "header":
                headers["Client-Cert"] = encode_client_cert(pki.clients[cert].der)
            connector = aiohttp.TCPConnector(
                ssl=False if mode == "header" else pki.client_context(cert))
            async with aiohttp.ClientSession(connector=connector,
                                             timeout=aiohttp.ClientTimeout(total=15)) as s:
                for _ in range(2):
                    async with s.get(gw.url + "/api", headers=headers) as r:
                        statuses.setdefault(cert, []).append(r.status)
        assert statuses == {"a": [200, 200], "b": [401, 401]}
        assert [seen.path_qs for seen in upstream.seen] == ["/api", "/api"]
        assert await gw.stop() == 0
        loops = [line["message"] for line in gw.log("mtls_gateway.eventloop")]
        assert loops == [f"event loop: {'uvloop' if env == '1' else 'asyncio'}"]
        reasons = [line["reason"] for line in gw.log("mtls_gateway.access")]
        assert reasons == ["allowed", "allowed", "binding_mismatch", "binding_mismatch"]
