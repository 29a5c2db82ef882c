"""Broken neighbours give a clear error, never an open door.

The upstream (on a raw socket, so it can misbehave at the byte level): refused, silent,
reset mid-response, malformed head, closing after reading a request; non-idempotent
requests are never sent twice. The introspection endpoint: down, slow, HTML, huge,
wrong content type, ambiguous JSON. (Broken JWKS endpoints: tests/test_jwks_hardening.py.)
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from introspection_server import AuthServer, introspection_config

from gwtest import (
    Issuer,
    Pki,
    RawUpstream,
    RunningGateway,
    Upstream,
    base_config,
    raw_exchange,
    statuses,
)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _gw(make_gateway: Any, pki: Pki, issuer: Issuer, url: str,
              **upstream: Any) -> RunningGateway:
    config = base_config(pki, issuer, Upstream())
    config["upstream"].update(url=url, **upstream)
    gw: RunningGateway = await make_gateway(config)
    return gw


@pytest.mark.parametrize(("mode", "status", "reason"), [
    ("malformed_head", 502, "upstream_unavailable"),
    ("refuse_after_head", 502, "upstream_unavailable"),
    ("hang", 504, "upstream_timeout"),
])
@pytest.mark.parametrize("method", ["GET", "POST", "PATCH"])
async def test_broken_upstream_answers(make_gateway: Any, pki: Pki, issuer: Issuer,
                                       raw_upstream: RawUpstream, mode: str, status: int,
                                       reason: str, method: str) -> None:
    raw_upstream.mode = mode
    gw = await _gw(make_gateway, pki, issuer, raw_upstream.url, read_timeout="300ms")
    token = issuer.mint(pki.clients["a"].thumbprint)
    reply = await gw.request("/x", token=token, method=method,
                             data=b"payload" if method != "GET" else None)
    assert reply.status == status
    assert reply.json()["reason"] == reason
    assert token not in reply.body.decode()
    # Non-idempotent requests are sent once. aiohttp retries an idempotent request once when
    # the connection closes before any answer (RFC 9112 section 9.3.1): documented.
    retried = method == "GET" and mode == "refuse_after_head"
    assert len(raw_upstream.requests) == (2 if retried else 1)


async def test_upstream_refusing_connections_is_502(make_gateway: Any, pki: Pki,
                                                    issuer: Issuer) -> None:
    gw = await _gw(make_gateway, pki, issuer, f"http://127.0.0.1:{_closed_port()}")
    reply = await gw.request("/x", token=issuer.mint(pki.clients["a"].thumbprint))
    assert reply.status == 502 and reply.json()["reason"] == "upstream_unavailable"


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_non_idempotent_request_on_a_reused_connection_is_never_retried(
        make_gateway: Any, pki: Pki, issuer: Issuer, raw_upstream: RawUpstream,
        method: str) -> None:
    gw = await _gw(make_gateway, pki, issuer, raw_upstream.url)
    token = issuer.mint(pki.clients["a"].thumbprint)
    assert (await gw.request("/first", token=token, method=method, data=b"1")).status == 200
    raw_upstream.mode = "refuse_after_head"       # the pooled connection dies on next use
    reply = await gw.request("/second", token=token, method=method, data=b"2")
    assert reply.status == 502
    assert len(raw_upstream.requests) == 2        # /first once, /second once: no retry
    assert raw_upstream.connections == 1


async def test_reset_mid_response_aborts_the_client_connection(
        make_gateway: Any, pki: Pki, issuer: Issuer, raw_upstream: RawUpstream) -> None:
    """The client must see a broken response (fewer bytes than promised, no clean end),
    never a complete-looking one."""
    raw_upstream.mode = "reset_mid_response"
    gw = await _gw(make_gateway, pki, issuer, raw_upstream.url)
    token = issuer.mint(pki.clients["a"].thumbprint).encode()
    out = await raw_exchange(gw, b"GET /x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
                             + token + b"\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert statuses(out) == [200]
    assert b"Content-Length: 1048576" in head
    assert len(body) < 1048576


# --- the introspection endpoint ---------------------------------------------------------------

class HostileAuthServer(AuthServer):
    """An introspection endpoint whose body and content type the test sets."""

    content_type = "application/json"

    async def introspect(self, request: web.Request) -> web.Response:
        if self.body is None:
            return await super().introspect(request)
        self.calls += 1
        await request.post()
        return web.Response(body=self.body, status=self.status, content_type=self.content_type)


@pytest.fixture
async def hostile_as(pki: Pki) -> AsyncIterator[HostileAuthServer]:
    server = HostileAuthServer(pki)
    await server.start()
    yield server
    await server.stop()


@pytest.mark.parametrize(("body", "content_type"), [
    pytest.param(b'{"active": true}', "text/html", id="json_as_html"),
    pytest.param(b'{"active": true}', "text/plain", id="json_as_text"),
    pytest.param(b"<html>Sign in</html>", "text/html", id="html_login_page"),
    pytest.param(b'{"active": false, "active": true}', "application/json",
                 id="duplicate_active_last_true"),
    pytest.param(b'{"active": true, "exp": "9999999999"}', "application/json",
                 id="exp_string"),
    pytest.param(b'{"active": true, "exp": NaN}', "application/json", id="exp_nan"),
    pytest.param(b'{"active": true, "exp": Infinity}', "application/json", id="exp_infinity"),
    pytest.param(b'{"active": true, "nbf": true}', "application/json", id="nbf_bool"),
    pytest.param(b'{"active": true, "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
                 "application/json", id="deeply_nested"),
    pytest.param(b'{"active": true, "pad": "' + b"x" * 200_000 + b'"}', "application/json",
                 id="huge"),
    pytest.param(b'{"active": 1}', "application/json", id="active_number"),
    pytest.param(b"", "application/json", id="empty"),
    pytest.param(b"\xff\xfe", "application/json", id="not_utf8"),
])
async def test_hostile_introspection_answers_refuse_the_token_and_nothing_forwarded(
        make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream,
        hostile_as: HostileAuthServer, tmp_path: Path, body: bytes, content_type: str) -> None:
    gw = await make_gateway(introspection_config(pki, issuer, upstream, hostile_as, tmp_path))
    token = hostile_as.issue(pki.clients["a"].thumbprint)
    hostile_as.body, hostile_as.content_type = body, content_type
    reply = await gw.request("/x", token=token)
    # not RFC 7662: that token is refused (a bad answer for every token is an outage, 503:
    # test_introspection.py)
    assert reply.status == 401, reply.body
    assert reply.json()["reason"] == "token_inactive"
    assert upstream.seen == []


@pytest.mark.parametrize("content_type", ["application/json", "application/token-info+json"])
async def test_json_content_types_are_accepted(make_gateway: Any, pki: Pki, issuer: Issuer,
                                               upstream: Upstream,
                                               hostile_as: HostileAuthServer, tmp_path: Path,
                                               content_type: str) -> None:
    gw = await make_gateway(introspection_config(pki, issuer, upstream, hostile_as, tmp_path))
    token = hostile_as.issue(pki.clients["a"].thumbprint)
    hostile_as.body = json.dumps(hostile_as.tokens[token]).encode()
    hostile_as.content_type = content_type
    assert (await gw.request("/x", token=token)).status == 200
    assert len(upstream.seen) == 1


async def test_introspection_endpoint_down_is_503(make_gateway: Any, pki: Pki, issuer: Issuer,
                                                  upstream: Upstream,
                                                  hostile_as: HostileAuthServer,
                                                  tmp_path: Path) -> None:
    config = introspection_config(pki, issuer, upstream, hostile_as, tmp_path)
    config["providers"]["opaque"]["endpoint"] = f"https://127.0.0.1:{_closed_port()}/i"
    gw = await make_gateway(config)
    reply = await gw.request("/x", token="opaque-token-value")
    assert reply.status == 503 and reply.json()["reason"] == "introspection_unavailable"
    assert upstream.seen == []


async def test_slow_introspection_never_blocks_cached_tokens(
        make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream,
        hostile_as: HostileAuthServer, tmp_path: Path) -> None:
    gw = await make_gateway(introspection_config(pki, issuer, upstream, hostile_as, tmp_path,
                                                 timeout="30s"))
    tp = pki.clients["a"].thumbprint
    cached = hostile_as.issue(tp)
    assert (await gw.request("/x", token=cached)).status == 200
    hostile_as.hold = asyncio.Event()
    pending = asyncio.create_task(gw.request("/x", token=hostile_as.issue(tp)))
    while hostile_as.calls < 2:  # noqa: ASYNC110 - AuthServer (shared) only counts calls
        await asyncio.sleep(0.01)
    assert (await gw.request("/x", token=cached)).status == 200
    assert not pending.done()
    hostile_as.hold.set()
    assert (await pending).status == 200
    assert len(upstream.seen) == 3
