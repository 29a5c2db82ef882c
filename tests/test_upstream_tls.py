"""TLS to https upstreams (mtls_gateway/upstream_tls.py, proxy.py): a private CA, mutual TLS
to the upstream, the server name, per-route settings, and the cause of every failure in the
decision line. Real HTTPS upstreams on 127.0.0.1 with certificates from trustme."""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from gwtest import GatewayFactory, LoopbackServer, Pki, Upstream, base_config
from mtls_gateway.config_load import load_config_text
from mtls_gateway.errors import ConfigError


class TlsUpstream(LoopbackServer):
    """An HTTPS upstream that records the requests it answers and the client certificate."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []

    async def handle(self, request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        subject = None
        if peer:
            subject = dict(x[0] for x in peer["subject"]).get("commonName")
        self.seen.append((request.path, subject))
        return web.json_response({"ok": True, "client": subject})

    async def start(self, ctx: ssl.SSLContext) -> str:
        app = web.Application()
        app.router.add_route("*", "/{p:.*}", self.handle)
        return await self.serve(app, ctx)


@pytest.fixture(scope="module")
def cas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("upstream-tls")
    server_ca, client_ca = trustme.CA(), trustme.CA()
    server_ca.cert_pem.write_to_path(str(d / "server-ca.pem"))
    # The upstream's certificate names upstream.internal only (not 127.0.0.1).
    server = server_ca.issue_cert("upstream.internal")
    gateway_client = client_ca.issue_cert("gateway@example.org",
                                          common_name="mtls-gateway")
    gateway_client.cert_chain_pems[0].write_to_path(str(d / "gw.crt"))
    gateway_client.private_key_pem.write_to_path(str(d / "gw.key"))
    return {"dir": d, "server_ca": server_ca, "client_ca": client_ca, "server": server,
            "ca_file": str(d / "server-ca.pem"), "gw_cert": str(d / "gw.crt"),
            "gw_key": str(d / "gw.key")}


def upstream_context(cas: dict[str, Any], *, mutual: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cas["server"].configure_cert(ctx)
    if mutual:
        cas["client_ca"].configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@pytest.fixture
async def tls_upstream(cas: dict[str, Any]) -> AsyncIterator[tuple[TlsUpstream, str]]:
    up = TlsUpstream()
    url = await up.start(upstream_context(cas, mutual=False))
    yield up, url
    await up.stop()


@pytest.fixture
async def mtls_upstream(cas: dict[str, Any]) -> AsyncIterator[tuple[TlsUpstream, str]]:
    up = TlsUpstream()
    url = await up.start(upstream_context(cas, mutual=True))
    yield up, url
    await up.stop()


def config_for(pki: Pki, upstream: Upstream, url: str, **tls: Any) -> dict[str, Any]:
    config = base_config(pki, None, upstream)
    config["upstream"].update({"url": url, **tls})
    config["routes"] = [{"name": "open", "path_prefix": "/", "auth": "none"}]
    return config


def decisions(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.decision for r in caplog.records  # type: ignore[attr-defined]
            if r.name == "mtls_gateway.access" and isinstance(getattr(r, "decision", None),
                                                              dict)]


async def call(make_gateway: GatewayFactory, config: dict[str, Any],
               caplog: pytest.LogCaptureFixture, path: str = "/x"
               ) -> tuple[int, dict[str, Any]]:
    gw = await make_gateway(config)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        reply = await gw.request(path)
    lines = decisions(caplog)
    assert len(lines) == 1
    return reply.status, lines[0]


async def test_private_ca_with_ca_file(make_gateway: GatewayFactory, pki: Pki,
                                       upstream: Upstream, cas: dict[str, Any],
                                       tls_upstream: tuple[TlsUpstream, str],
                                       caplog: pytest.LogCaptureFixture) -> None:
    up, url = tls_upstream
    status, line = await call(make_gateway, config_for(
        pki, upstream, url, ca_file=cas["ca_file"], server_name="upstream.internal"), caplog)
    assert status == 200 and line["reason"] == "public_route"
    assert "upstream_error" not in line
    assert up.seen == [("/x", None)]


async def test_without_ca_file_502_with_the_cause(make_gateway: GatewayFactory, pki: Pki,
                                                  upstream: Upstream,
                                                  tls_upstream: tuple[TlsUpstream, str],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    up, url = tls_upstream
    status, line = await call(make_gateway, config_for(
        pki, upstream, url, server_name="upstream.internal"), caplog)
    assert status == 502 and line["reason"] == "upstream_unavailable"
    assert line["upstream_error"].startswith("tls_verify_failed: ")
    assert "unable to get local issuer certificate" in line["upstream_error"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "mtls_gateway.proxy"]
    assert len(warnings) == 1 and "tls_verify_failed" in warnings[0]
    assert up.seen == []


@pytest.mark.parametrize(("server_name", "status"), [
    ("upstream.internal", 200), ("other.internal", 502), (None, 502)])
async def test_server_name(make_gateway: GatewayFactory, pki: Pki, upstream: Upstream,
                           cas: dict[str, Any], tls_upstream: tuple[TlsUpstream, str],
                           caplog: pytest.LogCaptureFixture, server_name: str | None,
                           status: int) -> None:
    """The certificate names upstream.internal; the URL says 127.0.0.1."""
    up, url = tls_upstream
    tls: dict[str, Any] = {"ca_file": cas["ca_file"]}
    if server_name:
        tls["server_name"] = server_name
    got, line = await call(make_gateway, config_for(pki, upstream, url, **tls), caplog)
    assert got == status
    if status == 502:
        assert line["upstream_error"].startswith("tls_verify_failed: ")
        assert "mismatch" in line["upstream_error"].lower()
        assert up.seen == []
    else:
        assert len(up.seen) == 1


@pytest.mark.parametrize("with_cert", [True, False])
async def test_mutual_tls_to_the_upstream(make_gateway: GatewayFactory, pki: Pki,
                                          upstream: Upstream, cas: dict[str, Any],
                                          mtls_upstream: tuple[TlsUpstream, str],
                                          caplog: pytest.LogCaptureFixture,
                                          with_cert: bool) -> None:
    up, url = mtls_upstream
    tls: dict[str, Any] = {"ca_file": cas["ca_file"], "server_name": "upstream.internal"}
    if with_cert:
        tls.update(client_cert_file=cas["gw_cert"], client_key_file=cas["gw_key"])
    status, line = await call(make_gateway, config_for(pki, upstream, url, **tls), caplog)
    if with_cert:
        assert status == 200 and up.seen == [("/x", "mtls-gateway")]
    else:
        # TLS 1.3: the upstream refuses the missing certificate after the client's side of
        # the handshake: seen as its alert, or as a reset/close before any answer
        assert status == 502 and up.seen == [], line
        assert line["upstream_error"].split(":")[0] in (
            "tls_error", "connection_reset", "disconnected")


async def test_route_with_its_own_https_upstream(make_gateway: GatewayFactory, pki: Pki,
                                                 upstream: Upstream, cas: dict[str, Any],
                                                 mtls_upstream: tuple[TlsUpstream, str],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The token endpoint on a private-CA, mutual-TLS upstream; the rest on plain http."""
    up, url = mtls_upstream
    config = config_for(pki, upstream, upstream.url)
    config["routes"] = [
        {"name": "as", "path_prefix": "/as", "auth": "none",
         "upstream": {"url": url, "ca_file": cas["ca_file"], "server_name": "upstream.internal",
                      "client_cert_file": cas["gw_cert"], "client_key_file": cas["gw_key"]}},
        {"name": "open", "path_prefix": "/", "auth": "none"},
    ]
    status, _ = await call(make_gateway, config, caplog, "/as/token")
    assert status == 200 and up.seen == [("/as/token", "mtls-gateway")]
    gw = await make_gateway(config)
    assert (await gw.request("/other")).status == 200
    assert [s.path_qs for s in upstream.seen] == ["/other"]


async def test_route_url_inherits_upstream_tls_but_not_server_name(
        make_gateway: GatewayFactory, pki: Pki, upstream: Upstream, cas: dict[str, Any],
        tls_upstream: tuple[TlsUpstream, str], caplog: pytest.LogCaptureFixture) -> None:
    up, url = tls_upstream
    config = config_for(pki, upstream, url, ca_file=cas["ca_file"],
                        server_name="upstream.internal")
    config["routes"] = [{"name": "alias", "path_prefix": "/", "auth": "none",
                         "upstream": url}]
    status, line = await call(make_gateway, config, caplog)
    # ca_file inherited (no "local issuer" error), server_name not: 127.0.0.1 is checked
    assert status == 502 and "mismatch" in line["upstream_error"].lower()
    assert up.seen == []


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_connection_refused_is_named(make_gateway: GatewayFactory, pki: Pki,
                                           upstream: Upstream, cas: dict[str, Any],
                                           caplog: pytest.LogCaptureFixture,
                                           scheme: str) -> None:
    config = config_for(pki, upstream, f"{scheme}://127.0.0.1:{closed_port()}")
    config["fast_lane"] = False
    status, line = await call(make_gateway, config, caplog)
    assert status == 502 and line["decision"] == "allow"
    assert line["upstream_error"] == "connection_refused"


async def test_fast_lane_failure_has_a_cause(make_gateway: GatewayFactory, pki: Pki,
                                             upstream: Upstream,
                                             caplog: pytest.LogCaptureFixture) -> None:
    port = closed_port()
    status, line = await call(make_gateway, config_for(
        pki, upstream, f"http://127.0.0.1:{port}"), caplog)
    assert status == 502 and line["upstream_error"] == "connection_refused"
    warnings = [r.getMessage() for r in caplog.records if r.name == "mtls_gateway.proxy"]
    assert warnings == [f"upstream http://127.0.0.1:{port} failed: connection_refused"]


async def test_read_timeout_is_named(make_gateway: GatewayFactory, pki: Pki,
                                     upstream: Upstream, cas: dict[str, Any],
                                     caplog: pytest.LogCaptureFixture) -> None:
    config = config_for(pki, upstream, upstream.url, read_timeout="0.3s")
    config["fast_lane"] = False
    status, line = await call(make_gateway, config, caplog, "/slow?s=3")
    assert status == 504 and line["upstream_error"] == "read_timeout"


# --- configuration ------------------------------------------------------------------------

def load(pki: Pki, tmp_path: Path, upstream: dict[str, Any],
         routes: list[dict[str, Any]] | None = None) -> Any:
    import yaml

    config = base_config(pki, None, Upstream())
    config["upstream"] = upstream
    config["routes"] = routes or [{"name": "open", "path_prefix": "/", "auth": "none"}]
    return load_config_text(yaml.safe_dump(config), base_dir=tmp_path)


def test_config_defaults(pki: Pki, tmp_path: Path) -> None:
    cfg = load(pki, tmp_path, {"url": "https://api.internal"})
    assert cfg.upstream.tls.ca_file is None and cfg.upstream.tls.server_name is None
    assert cfg.upstream.tls.client_cert_file is None


@pytest.mark.parametrize(("upstream", "routes", "problem"), [
    ({"url": "http://a.internal", "ca_file": "server-ca.pem"}, None,
     "upstream.ca_file: only applies to an https:// upstream"),
    ({"url": "https://a.internal", "client_cert_file": "gw.crt"}, None,
     "upstream.client_key_file: mutual TLS to the upstream needs both"),
    ({"url": "https://a.internal", "client_cert_file": "gw.crt",
      "client_key_file": "nope.key"}, None, "upstream.client_key_file: cannot read"),
    ({"url": "https://a.internal", "server_name": "https://a.internal:443"}, None,
     "upstream.server_name: 'https://a.internal:443' is not a DNS name"),
    ({"url": "https://a.internal"},
     [{"name": "r", "path_prefix": "/", "auth": "none",
       "upstream": {"url": "https://b.internal", "ca_fil": "x"}}],
     "routes[0].upstream.ca_fil: unknown field"),
    ({"url": "https://a.internal"},
     [{"name": "r", "path_prefix": "/", "auth": "none", "upstream": {"ca_file": "x.pem"}}],
     "routes[0].upstream.url: is required"),
])
def test_config_problems(pki: Pki, cas: dict[str, Any], upstream: dict[str, Any],
                         routes: list[dict[str, Any]] | None, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(pki, cas["dir"], upstream, routes)
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems


def test_route_tls_resolution(pki: Pki, cas: dict[str, Any]) -> None:
    cfg = load(pki, cas["dir"], {"url": "https://a.internal", "ca_file": "server-ca.pem",
                                 "server_name": "a.internal"}, [
        {"name": "plain", "path_prefix": "/p", "auth": "none"},
        {"name": "url", "path_prefix": "/u", "auth": "none", "upstream": "https://b.internal"},
        {"name": "own", "path_prefix": "/", "auth": "none",
         "upstream": {"url": "https://c.internal", "server_name": "c.example",
                      "client_cert_file": "gw.crt", "client_key_file": "gw.key"}},
    ])
    plain, url, own = cfg.routes
    assert plain.upstream_tls is None
    assert url.upstream_tls.ca_file == cas["dir"] / "server-ca.pem"
    assert url.upstream_tls.server_name is None
    assert own.upstream_tls.ca_file == cas["dir"] / "server-ca.pem"
    assert own.upstream_tls.server_name == "c.example"
    assert own.upstream_tls.client_key_file == cas["dir"] / "gw.key"
    assert cas["dir"] / "gw.key" in cfg.watched_files()


async def test_reload_picks_up_a_rotated_ca_file(make_gateway: GatewayFactory, pki: Pki,
                                                 upstream: Upstream, cas: dict[str, Any],
                                                 tls_upstream: tuple[TlsUpstream, str],
                                                 tmp_path: Path) -> None:
    """Only the CA file's content changes (the config is equal): new connections use it."""
    up, url = tls_upstream
    ca_file = tmp_path / "rotating-ca.pem"
    ca_file.write_bytes(trustme.CA().cert_pem.bytes())          # not the upstream's CA
    gw = await make_gateway(config_for(pki, upstream, url, ca_file=str(ca_file),
                                       server_name="upstream.internal"))
    assert (await gw.request("/x")).status == 502
    ca_file.write_bytes(cas["server_ca"].cert_pem.bytes())
    assert await gw.server.reload("test")
    assert (await gw.request("/y")).status == 200
    assert up.seen == [("/y", None)]


def test_contexts_are_built_once_per_distinct_setting(pki: Pki, cas: dict[str, Any]) -> None:
    from mtls_gateway.upstream_tls import UpstreamTargets

    cfg = load(pki, cas["dir"], {"url": "https://a.internal", "ca_file": "server-ca.pem"}, [
        {"name": "a", "path_prefix": "/a", "auth": "none", "upstream": "https://b.internal"},
        {"name": "b", "path_prefix": "/b", "auth": "none",
         "upstream": {"url": "https://c.internal", "server_name": "c.example"}},
        {"name": "c", "path_prefix": "/c", "auth": "none",
         "upstream": {"url": "https://d.internal", "client_cert_file": "gw.crt",
                      "client_key_file": "gw.key"}},
        {"name": "plain", "path_prefix": "/", "auth": "none", "upstream": "http://e.internal"},
    ])
    targets = UpstreamTargets(cfg)
    a, b, c, plain = (targets.of(r) for r in cfg.routes)
    # same CA, no client certificate: one context (server_name is per request, not per context)
    assert a.context is b.context is targets.default.context is not None
    assert c.context is not None and c.context is not a.context
    assert (b.server_name, a.server_name) == ("c.example", None)
    assert plain.context is None and len(targets.contexts) == 2
    assert all(ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
               for ctx in targets.contexts)


async def test_no_context_is_built_per_request(make_gateway: GatewayFactory, pki: Pki,
                                               upstream: Upstream, cas: dict[str, Any],
                                               tls_upstream: tuple[TlsUpstream, str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import mtls_gateway.upstream_tls as upstream_tls

    built: list[object] = []
    real = upstream_tls.client_context

    def counting(tls: Any) -> ssl.SSLContext:
        built.append(tls)
        return real(tls)

    monkeypatch.setattr(upstream_tls, "client_context", counting)
    up, url = tls_upstream
    gw = await make_gateway(config_for(pki, upstream, url, ca_file=cas["ca_file"],
                                       server_name="upstream.internal"))
    for i in range(3):
        assert (await gw.request(f"/r{i}")).status == 200
    assert len(built) == 1 and len(up.seen) == 3
