"""TLS session resumption keeps the binding right.

A resumed session carries no new client certificate: the server takes the one verified in
the session's original full handshake (RFC 8446 section 2.2, RFC 5077 section 4). The
gateway's thumbprint on a resumed connection must therefore be that certificate's, so a
token bound to another certificate is still refused, and never reaches the upstream.
Both TLS 1.3 (tickets, ``num_tickets = 1``) and TLS 1.2 (session tickets) are exercised
with real sockets; ``session_reused`` proves the second connection really resumed.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from pathlib import Path

import pytest

from gwtest import GatewayFactory, Issuer, Pki, Upstream, base_config
from mtls_gateway import pki as pki_mod

#: listen.tls_stack: pyOpenSSL (the default) and CPython's ssl keep sessions differently.
STACKS = ["openssl", "python"]
VERSIONS = {"1.3": ssl.TLSVersion.TLSv1_3, "1.2": ssl.TLSVersion.TLSv1_2}


def _client_context(pki: Pki, cert: str, version: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    c = pki.clients[cert]
    ctx.load_cert_chain(c.cert, c.key)
    ctx.minimum_version = ctx.maximum_version = VERSIONS[version]
    return ctx


def _get(ctx: ssl.SSLContext, port: int, path: str, token: str,
         session: ssl.SSLSession | None) -> tuple[int, dict[str, str], bytes, ssl.SSLSession,
                                                   bool]:
    """One request on a new connection (resuming ``session`` if given): status, headers,
    body, the session to resume next time, and whether this connection was resumed."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
        tls.sendall((f"GET {path} HTTP/1.1\r\nHost: localhost\r\n"
                     f"Authorization: Bearer {token}\r\nConnection: close\r\n\r\n").encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        assert tls.session is not None
        return int(lines[0].split()[1]), headers, body, tls.session, tls.session_reused


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("version", ["1.3", "1.2"])
async def test_resumed_session_keeps_the_original_certificate(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream,
        version: str, stack: str) -> None:
    config = base_config(pki, issuer, upstream)
    config["listen"].update(min_tls_version="1.2", tls_stack=stack)
    gw = await make_gateway(config)
    port = gw.server.port
    a, b = pki.clients["a"], pki.clients["b"]
    token_a, token_b = issuer.mint(a.thumbprint), issuer.mint(b.thumbprint)
    ctx = _client_context(pki, "a", version)

    status, _, _, session, reused = await asyncio.to_thread(_get, ctx, port, "/first",
                                                            token_a, None)
    assert (status, reused) == (200, False)

    # Resumed with a's session: a's token passes, and the thumbprint the upstream is told
    # is a's (computed on the resumed connection, from the session's certificate).
    status, _, _, session, reused = await asyncio.to_thread(_get, ctx, port, "/resumed-a",
                                                            token_a, session)
    assert (status, reused) == (200, True)
    assert upstream.seen[-1].path_qs == "/resumed-a"
    assert upstream.seen[-1].headers["x-client-cert-thumbprint"] == [a.thumbprint]

    # Resumed with a's session, b's token: refused, and the upstream saw nothing of it.
    seen_before = len(upstream.seen)
    status, headers, body, _, reused = await asyncio.to_thread(_get, ctx, port, "/resumed-b",
                                                               token_b, session)
    assert reused is True
    assert (status, json.loads(body)["reason"]) == (401, "binding_mismatch")
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    assert len(upstream.seen) == seen_before
    assert [s.path_qs for s in upstream.seen] == ["/first", "/resumed-a"]


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("version", ["1.3", "1.2"])
async def test_b_cannot_resume_into_a_session_of_its_own_with_a_s_token(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream,
        version: str, stack: str) -> None:
    """b's own resumed session is b's: a's token stays refused on it, resumed or not."""
    config = base_config(pki, issuer, upstream)
    config["listen"].update(min_tls_version="1.2", tls_stack=stack)
    gw = await make_gateway(config)
    token_a = issuer.mint(pki.clients["a"].thumbprint)
    ctx = _client_context(pki, "b", version)
    session = None
    results = []
    for _ in range(3):
        status, _, body, session, reused = await asyncio.to_thread(
            _get, ctx, gw.server.port, "/x", token_a, session)
        results.append((status, json.loads(body)["reason"], reused))
    assert results == [(401, "binding_mismatch", False), (401, "binding_mismatch", True),
                       (401, "binding_mismatch", True)]
    assert upstream.seen == []


@pytest.mark.parametrize("version", ["1.3", "1.2"])
async def test_a_reload_ends_the_sessions_of_the_openssl_listener(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream,
        version: str) -> None:
    """Sessions live in the listener's context, which a reload replaces: a session never
    outlives the CA bundle it was verified against (the client gets a full handshake)."""
    config = base_config(pki, issuer, upstream)
    config["listen"].update(min_tls_version="1.2", tls_stack="openssl")
    gw = await make_gateway(config)
    token = issuer.mint(pki.clients["a"].thumbprint)
    ctx = _client_context(pki, "a", version)
    _, _, _, session, _ = await asyncio.to_thread(_get, ctx, gw.server.port, "/1", token, None)
    status, _, _, session, reused = await asyncio.to_thread(_get, ctx, gw.server.port, "/2",
                                                            token, session)
    assert (status, reused) == (200, True)
    assert await gw.server.reload("test") is True
    status, _, _, _, reused = await asyncio.to_thread(_get, ctx, gw.server.port, "/3", token,
                                                      session)
    assert (status, reused) == (200, False)
    assert [s.path_qs for s in upstream.seen] == ["/1", "/2", "/3"]


def _drop_the_clients_ca(ca_file: Path, tmp_path: Path) -> None:
    """Replace the client CA bundle by one that trusts another CA only."""
    other, _ = pki_mod.make_ca("another CA").write(tmp_path, "other-ca")
    ca_file.write_bytes(other.read_bytes())


@pytest.mark.parametrize("version", ["1.3", "1.2"])
async def test_a_reload_that_drops_a_ca_ends_its_sessions_on_the_openssl_listener(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream,
        version: str, tmp_path: Path) -> None:
    """Removing a CA from client_ca_file is how an operator cuts off what it issued: a
    session verified under the old bundle is not resumed, and the full handshake fails."""
    ca_file = tmp_path / "clients.pem"
    ca_file.write_bytes(pki.ca_file.read_bytes())
    config = base_config(pki, issuer, upstream)
    config["listen"].update(min_tls_version="1.2", tls_stack="openssl",
                            client_ca_file=str(ca_file))
    gw = await make_gateway(config)
    token = issuer.mint(pki.clients["a"].thumbprint)
    ctx = _client_context(pki, "a", version)
    status, _, _, session, _ = await asyncio.to_thread(_get, ctx, gw.server.port, "/1", token,
                                                       None)
    assert status == 200
    _drop_the_clients_ca(ca_file, tmp_path)
    assert await gw.server.reload("test") is True
    with pytest.raises(ssl.SSLError, match="UNKNOWN_CA"):
        await asyncio.to_thread(_get, ctx, gw.server.port, "/2", token, session)
    assert [s.path_qs for s in upstream.seen] == ["/1"]


@pytest.mark.parametrize("change", [True, False])
async def test_the_python_stack_warns_that_a_ca_change_leaves_old_sessions_resumable(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream,
        change: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Python's ssl cannot end sessions at a reload (its ticket keys are the bound context's):
    a reload that changes client_ca_file says so, and what to do, in a warning; new
    handshakes use the new bundle. A reload that leaves the bundle alone says nothing."""
    ca_file = tmp_path / "clients.pem"
    ca_file.write_bytes(pki.ca_file.read_bytes())
    config = base_config(pki, issuer, upstream)
    config["listen"].update(tls_stack="python", client_ca_file=str(ca_file))
    gw = await make_gateway(config)
    token = issuer.mint(pki.clients["a"].thumbprint)
    ctx = _client_context(pki, "a", "1.3")
    if change:
        _drop_the_clients_ca(ca_file, tmp_path)
    caplog.clear()
    assert await gw.server.reload("test") is True
    warnings = [r.getMessage() for r in caplog.records
                if r.levelname == "WARNING" and "client_ca_file changed" in r.getMessage()]
    if not change:
        assert warnings == []
        status, *_ = await asyncio.to_thread(_get, ctx, gw.server.port, "/1", token, None)
        assert status == 200
        return
    assert len(warnings) == 1
    assert "restart the gateway" in warnings[0] and "7200 s" in warnings[0]
    with pytest.raises(ssl.SSLError, match="UNKNOWN_CA"):   # a full handshake: the new bundle
        await asyncio.to_thread(_get, ctx, gw.server.port, "/1", token, None)
    assert upstream.seen == []
