"""Forwarding answers unchanged, whatever their framing: headers sent with the first body
bytes for small Content-Length answers (one write), streamed as before otherwise."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from gwtest import GatewayFactory, LoopbackServer, Pki, Upstream, base_config


class Shapes(LoopbackServer):
    """An upstream answering /<shape> in several framings."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        shape = request.match_info["shape"]
        if shape == "small":
            return web.Response(body=b"x" * 100, headers={"X-Shape": "small"})
        if shape == "empty":
            return web.Response(body=b"", headers={"X-Shape": "empty"})
        if shape == "nocontent":
            return web.Response(status=204, headers={"X-Shape": "nocontent"})
        if shape == "notmodified":
            return web.Response(status=304, headers={"ETag": '"v1"'})
        if shape == "exact-chunk":
            return web.Response(body=b"y" * 65536)
        if shape == "over-chunk":
            return web.Response(body=b"z" * 65537)
        resp = web.StreamResponse(headers={"X-Shape": "chunked"})   # no Content-Length
        await resp.prepare(request)
        for _ in range(3):
            await resp.write(b"c" * 1000)
        await resp.write_eof()
        return resp

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/public/{shape}", self.handle)
        return await self.serve(app)


@pytest.fixture
async def shapes() -> AsyncIterator[Shapes]:
    server = Shapes()
    yield server
    await server.stop()


@pytest.mark.parametrize(("shape", "status", "body", "length"), [
    ("small", 200, b"x" * 100, "100"),
    ("empty", 200, b"", "0"),
    ("nocontent", 204, b"", None),
    ("notmodified", 304, b"", None),
    ("exact-chunk", 200, b"y" * 65536, "65536"),
    ("over-chunk", 200, b"z" * 65537, "65537"),
    ("chunked", 200, b"c" * 3000, None),
])
async def test_every_framing_arrives_unchanged(
        make_gateway: GatewayFactory, pki: Pki, upstream: Upstream, shapes: Shapes,
        shape: str, status: int, body: bytes, length: str | None) -> None:
    config = base_config(pki, None, upstream)
    config["upstream"]["url"] = await shapes.start()
    config["routes"] = [{"name": "public", "path_prefix": "/public", "auth": "none"}]
    gw = await make_gateway(config)
    for _ in range(2):     # the second on a reused upstream connection
        reply = await gw.request(f"/public/{shape}")
        assert (reply.status, reply.body) == (status, body)
        assert reply.headers.get("Content-Length") == length
        if shape == "notmodified":
            assert reply.headers["ETag"] == '"v1"'
        elif shape != "over-chunk" and shape != "exact-chunk":
            assert reply.headers["X-Shape"] == shape


# --- forwarded identity is stripped (issue 17 item 3), on both request paths --------------

STRIPPED = [
    # the X-Forwarded- family, whatever follows the prefix
    "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Forwarded-Port",
    "X-Forwarded-User", "X-Forwarded-Email", "X-Forwarded-Groups",
    "X-Forwarded-Preferred-Username", "X-Forwarded-Access-Token", "X-Forwarded-Prefix",
    "X-Forwarded-Uri", "X-Forwarded-Tls-Client-Cert", "X-Forwarded-Tls-Client-Cert-Info",
    "X-Forwarded-Client-Cert", "Forwarded", "X-Real-IP", "True-Client-IP", "X-Client-IP",
    # user identity of auth proxies and web servers
    "Remote-User", "Remote-Groups", "Remote-Email", "X-Remote-User", "X-Remote-Group",
    "X-Remote-Extra-Scopes", "X-Auth-Request-User", "X-Auth-Request-Email",
    "X-Auth-Request-Access-Token", "X-User", "X-Email", "X-Authentik-Username",
    "X-Pomerium-Jwt-Assertion", "X-Goog-Authenticated-User-Email", "X-Goog-Iap-Jwt-Assertion",
    "Cf-Access-Authenticated-User-Email", "X-Ms-Client-Principal-Name", "X-Ms-Token-Aad-Id-Token",
    "X-Amzn-Oidc-Identity", "X-Amzn-Oidc-Data", "Tailscale-User-Login", "X-Consumer-Username",
    "X-Credential-Identifier", "X-Authenticated-Userid", "X-Envoy-Internal",
    # client certificates of other proxies and load balancers
    "Client-Cert", "Client-Cert-Chain", "X-Client-Cert", "X-Client-Verify", "X-SSL-Client-Cert",
    "X-SSL-Client-Verify", "X-SSL-Client-S-DN", "Ssl-Client-Cert", "Ssl-Client-Verify",
    "X-Amzn-Mtls-Clientcert", "X-Amzn-Mtls-Clientcert-Leaf", "X-Amzn-Mtls-Clientcert-Subject",
    "Cloudfront-Viewer-Cert-Sha256", "X-ARR-ClientCert",
    # another path or method than the route was chosen for
    "X-Original-URL", "X-Rewrite-URL", "X-HTTP-Method-Override",
    # underscores read as dashes (CGI/WSGI: HTTP_REMOTE_USER)
    "Remote_User", "X_Forwarded_User", "Client_Cert",
    # the operator's own (upstream.strip_headers)
    "X-Tenant", "x_tenant",
]
KEPT = ["Accept", "X-Request-Id", "X-Client-Request-Id", "X-Auth-Token", "X-Forwarded",
        "X-Userinfo-Version", "Remoteuser", "X-Amzn-Trace-Id", "X-SSL"]


def _forwarder() -> Any:
    from mtls_gateway.config import IdentityHeaders, UpstreamConfig
    from mtls_gateway.proxy import Forwarder

    identity = IdentityHeaders("X-Auth-Subject", None, None, None, None)
    return Forwarder(UpstreamConfig("http://127.0.0.1:1", 1.0, 1.0, 1, True, identity,
                                    strip_headers=("x-tenant",)))


def _public(pki: Pki, upstream: Upstream) -> dict[str, Any]:
    config = base_config(pki, None, upstream)
    config["routes"] = config["routes"][:1]          # /public, auth: none
    return config


@pytest.mark.parametrize("name", STRIPPED)
def test_stripped_names(name: str) -> None:
    assert _forwarder().strips(name)


@pytest.mark.parametrize("name", KEPT)
def test_kept_names(name: str) -> None:
    assert not _forwarder().strips(name)


@pytest.mark.parametrize("lane", [True, False], ids=["fast_lane", "aiohttp"])
@pytest.mark.parametrize("name", STRIPPED)
async def test_no_inbound_identity_header_reaches_the_upstream(
        make_gateway: GatewayFactory, pki: Pki, upstream: Upstream, lane: bool,
        name: str) -> None:
    """One header per request, so that the fast lane serves every request it can: a name the
    lane cannot strip itself must make the request not plain, never pass through."""
    config = _public(pki, upstream)
    config["fast_lane"] = lane
    config["upstream"]["strip_headers"] = ["X-Tenant"]
    gw = await make_gateway(config)
    reply = await gw.request("/public/x", headers=[(name, "forged"), ("X-Request-Id", "r1")])
    assert reply.status == 200, reply.body
    [seen] = upstream.seen
    spelled = name.lower().replace("_", "-")
    if spelled not in ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"):  # ours
        assert not [k for k in seen.headers if k.replace("_", "-") == spelled], seen.headers
    assert "forged" not in [v for values in seen.headers.values() for v in values]
    assert seen.headers["x-request-id"] == ["r1"]
    assert seen.headers["x-forwarded-for"] == ["127.0.0.1"]       # the gateway's own


async def test_the_lane_serves_requests_with_exact_stripped_names(
        make_gateway: GatewayFactory, pki: Pki, upstream: Upstream) -> None:
    """The common forwarding headers keep a request plain: the lane strips them itself."""
    gw = await make_gateway(_public(pki, upstream))
    reply = await gw.request("/public/x", headers=[("X-Forwarded-For", "6.6.6.6"),
                                                   ("Remote-User", "admin")])
    assert reply.status == 200
    lane = gw.server.gateway.lane
    assert lane is not None and lane.pool.opened > 0
    [seen] = upstream.seen
    assert seen.headers["x-forwarded-for"] == ["127.0.0.1"] and "remote-user" not in seen.headers


def test_strip_headers_config(pki: Pki, upstream: Upstream, tmp_path: Any) -> None:
    import yaml

    from mtls_gateway.config_load import load_config_text
    from mtls_gateway.errors import ConfigError

    config = _public(pki, upstream)
    config["upstream"]["strip_headers"] = ["X-Tenant", "bad name", "Host", "Authorization"]
    with pytest.raises(ConfigError) as info:
        load_config_text(yaml.safe_dump(config), base_dir=tmp_path)
    assert [p.split(":")[0] for p in info.value.problems] == ["upstream.strip_headers"] * 3
    config["upstream"]["strip_headers"] = ["X-Tenant"]
    loaded = load_config_text(yaml.safe_dump(config), base_dir=tmp_path)
    assert loaded.upstream.strip_headers == ("x-tenant",)


def test_the_strip_list_is_documented() -> None:
    from pathlib import Path

    from mtls_gateway.proxy import STRIPPED_NAMES, STRIPPED_PREFIXES

    doc = (Path(__file__).parent.parent / "docs" / "self-signed-clients.md").read_text()
    section = doc.split("## Headers the upstream never receives from a client", 1)[1]
    assert all(f"`{p}*`" in section for p in STRIPPED_PREFIXES)
    assert all(f"`{n}`" in section for n in STRIPPED_NAMES)
