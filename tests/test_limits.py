"""What one client may cost (mtls_gateway/connection.py, limits: in gateway.yaml): body caps,
slow clients, requests per connection, concurrent connections, and their configuration.

The deadlines in these tests are short and the stalls open-ended: a test waits for the
gateway to act (or for a generous safety timeout), it never measures how long that took.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

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
from mtls_gateway.config import LimitsConfig
from mtls_gateway.config_load import load_config_text
from mtls_gateway.errors import ConfigError

CAP = 64 * 1024


def _limited(pki: Pki, issuer: Issuer, upstream: Any, **limits: Any) -> dict[str, Any]:
    config = base_config(pki, issuer, upstream)
    config["limits"] = {"max_body_size": CAP, **limits}
    return config


def _chunked(total: int, size: int = 8192) -> bytes:
    out, left = b"", total
    while left > 0:
        n = min(size, left)
        out += b"%x\r\n" % n + b"b" * n + b"\r\n"
        left -= n
    return out + b"0\r\n\r\n"


def _body_of(out: bytes) -> Any:
    return json.loads(out.split(b"\r\n\r\n", 1)[1])


@pytest.mark.parametrize(("path", "framing", "size", "status"), [
    ("/public/up", "length", CAP, 200),
    ("/public/up", "length", CAP + 1, 413),
    ("/x", "length", CAP + 1, 413),                  # refused before the token is looked at
    ("/public/up", "length", 10**12, 413),
    ("/public/up", "chunked", CAP, 200),
    ("/public/up", "chunked", CAP + 1, 413),
    ("/public/up", "chunked", 4 * CAP, 413),
])
async def test_body_cap(make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream,
                        path: str, framing: str, size: int, status: int) -> None:
    gw = await make_gateway(_limited(pki, issuer, upstream))
    head = f"POST {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n".encode()
    if framing == "length":
        body = b"b" * size if size <= 4 * CAP else b"b" * 100
        data = head + b"Content-Length: %d\r\n\r\n" % size + body
    else:
        data = head + b"Transfer-Encoding: chunked\r\n\r\n" + _chunked(size)
    out = await raw_exchange(gw, data)
    assert statuses(out) == [status], out[:300]
    if status == 413:
        assert _body_of(out)["reason"] == "body_too_large"
        assert b"connection: close" in out.lower()
        assert upstream.seen == []         # not even a truncated body
    else:
        assert [s.body_len for s in upstream.seen] == [size]


async def test_chunked_body_over_the_cap_is_aborted_upstream_never_completed(
        make_gateway: Any, pki: Pki, issuer: Issuer, raw_upstream: RawUpstream) -> None:
    """The upstream got the start of the body but never the last chunk: its parser sees an
    aborted request, never a complete one."""
    gw = await make_gateway(_limited(pki, issuer, raw_upstream))
    data = (b"POST /public/up HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + _chunked(2 * CAP))
    out = await raw_exchange(gw, data)
    assert statuses(out) == [413]
    assert raw_upstream.requests == []


async def test_slow_body_gets_408_and_the_upstream_request_is_aborted(
        make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream) -> None:
    gw = await make_gateway(_limited(pki, issuer, upstream, body_timeout="300ms"))
    # promises 1000 bytes, sends 10, then stalls (never closes its side)
    out = await raw_exchange(gw, b"POST /public/up HTTP/1.1\r\nHost: gw\r\n"
                                 b"Content-Length: 1000\r\n\r\n" + b"b" * 10)
    assert statuses(out) == [408]
    assert _body_of(out)["reason"] == "body_timeout"
    assert upstream.seen == []


async def test_incomplete_head_gets_408(make_gateway: Any, pki: Pki, issuer: Issuer,
                                        upstream: Upstream) -> None:
    gw = await make_gateway(_limited(pki, issuer, upstream, header_timeout="300ms"))
    out = await raw_exchange(gw, b"GET /public/x HTTP/1.1\r\nHost: gw\r\nX-Slow: a")
    assert statuses(out) == [408]
    assert _body_of(out)["reason"] == "header_timeout"
    assert upstream.seen == []


async def test_silent_connection_gets_408(make_gateway: Any, pki: Pki, issuer: Issuer,
                                          upstream: Upstream) -> None:
    gw = await make_gateway(_limited(pki, issuer, upstream, header_timeout="300ms"))
    out = await raw_exchange(gw, b"")
    assert statuses(out) == [408]


async def test_slowloris_dribbling_a_head_is_cut_off(make_gateway: Any, pki: Pki,
                                                     issuer: Issuer, upstream: Upstream) -> None:
    """One byte at a time keeps a connection busy but never makes a head arrive in time."""
    gw: RunningGateway = await make_gateway(
        _limited(pki, issuer, upstream, header_timeout="500ms"))
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.server.port, ssl=pki.client_context("a"), server_hostname="localhost")
    head = b"GET /public/x HTTP/1.1\r\nHost: gw\r\n" + b"X-Pad: " + b"p" * 500 + b"\r\n\r\n"
    sent = 0
    try:
        for byte in head:
            writer.write(bytes([byte]))
            await writer.drain()
            sent += 1
            await asyncio.sleep(0.02)
            if reader.at_eof() or writer.transport.is_closing():
                break
            if len(reader._buffer):  # type: ignore[attr-defined]
                break
    except ConnectionError:
        pass
    out = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    assert sent < len(head)            # cut off before the head was complete
    assert statuses(out) == [408]
    assert upstream.seen == []


async def test_keep_alive_head_deadline_applies_to_every_request(
        make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream) -> None:
    gw: RunningGateway = await make_gateway(
        _limited(pki, issuer, upstream, header_timeout="300ms"))
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.server.port, ssl=pki.client_context("a"), server_hostname="localhost")
    writer.write(b"GET /public/1 HTTP/1.1\r\nHost: gw\r\n\r\n")
    first = await reader.readuntil(b'"body_sha256"')
    writer.write(b"GET /public/2 HTTP/1.1\r\nHost: gw\r\nX-Half: ")
    rest = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    assert statuses(first + rest) == [200, 408]
    assert [s.path_qs for s in upstream.seen] == ["/public/1"]


async def test_stalled_pipelined_head_is_closed_when_idle(
        make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream) -> None:
    gw = await make_gateway(_limited(pki, issuer, upstream, idle_timeout="300ms"))
    out = await raw_exchange(gw, b"GET /public/1 HTTP/1.1\r\nHost: gw\r\n\r\n"
                                 b"GET /public/2 HTTP/1.1\r\nHost: gw\r\nX-Half: ")
    assert statuses(out) == [200]
    assert [s.path_qs for s in upstream.seen] == ["/public/1"]


async def test_idle_keep_alive_connection_is_closed(make_gateway: Any, pki: Pki,
                                                    issuer: Issuer, upstream: Upstream) -> None:
    gw = await make_gateway(_limited(pki, issuer, upstream, idle_timeout="300ms"))
    out = await raw_exchange(gw, b"GET /public/1 HTTP/1.1\r\nHost: gw\r\n\r\n")  # keep-alive
    assert statuses(out) == [200]      # and then the gateway closed the idle connection


async def test_requests_per_connection_are_capped(make_gateway: Any, pki: Pki, issuer: Issuer,
                                                  upstream: Upstream) -> None:
    gw = await make_gateway(_limited(pki, issuer, upstream, max_requests_per_connection=2))
    out = await raw_exchange(gw, b"".join(
        b"GET /public/%d HTTP/1.1\r\nHost: gw\r\n\r\n" % i for i in range(4)))
    assert statuses(out) == [200, 200]
    second = out.split(b"HTTP/1.1 200")[2]
    assert b"Connection: close" in second
    assert [s.path_qs for s in upstream.seen] == ["/public/0", "/public/1"]


async def test_connections_beyond_the_cap_get_503(make_gateway: Any, pki: Pki, issuer: Issuer,
                                                  upstream: Upstream) -> None:
    gw: RunningGateway = await make_gateway(_limited(pki, issuer, upstream, max_connections=2))
    held = []
    for _ in range(2):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", gw.server.port, ssl=pki.client_context("a"),
            server_hostname="localhost")
        writer.write(b"GET /public/held HTTP/1.1\r\nHost: gw\r\n\r\n")
        await reader.readuntil(b'"body_sha256"')      # served, and kept open
        held.append(writer)
    out = await raw_exchange(gw, b"GET /public/x HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert statuses(out) == [503]
    assert _body_of(out)["reason"] == "too_many_connections"
    assert b"Connection: close" in out
    assert [s.path_qs for s in upstream.seen] == ["/public/held"] * 2
    held.pop().close()
    await asyncio.sleep(0)
    for _ in range(50):   # the gateway notices the close; a new connection is then served
        out = await raw_exchange(gw, b"GET /public/y HTTP/1.1\r\nHost: gw\r\n"
                                     b"Connection: close\r\n\r\n")
        if statuses(out) == [200]:
            break
        await asyncio.sleep(0.05)
    assert statuses(out) == [200]
    for writer in held:
        writer.close()


# --- configuration ----------------------------------------------------------------------------

def _config(pki: Pki, limits: Any) -> dict[str, Any]:
    return {"listen": {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key),
                       "client_ca_file": str(pki.ca_file)},
            "upstream": {"url": "http://127.0.0.1:8080"},
            "routes": [{"path_prefix": "/", "auth": "none"}],
            **({"limits": limits} if limits is not None else {})}


def test_limits_defaults(pki: Pki, tmp_path: Path) -> None:
    config = load_config_text(yaml.safe_dump(_config(pki, None)), base_dir=tmp_path)
    assert config.limits == LimitsConfig()
    assert config.limits.max_body_size == 10 * 1024 * 1024
    assert config.limits.header_timeout == 10.0


def test_limits_are_read(pki: Pki, tmp_path: Path) -> None:
    limits = {"max_body_size": 1024, "max_header_size": 4096, "max_headers": 20,
              "header_timeout": "2s", "body_timeout": "500ms", "idle_timeout": "1m",
              "max_requests_per_connection": 5, "max_connections": 7}
    config = load_config_text(yaml.safe_dump(_config(pki, limits)), base_dir=tmp_path)
    assert config.limits == LimitsConfig(1024, 4096, 20, 2.0, 0.5, 60.0, 5, 7)


@pytest.mark.parametrize(("limits", "problem"), [
    ({"max_body_size": 0}, "limits.max_body_size: must be between"),
    ({"max_body_size": "10MB"}, "limits.max_body_size: expected a whole number"),
    ({"max_header_size": 100}, "limits.max_header_size: must be between"),
    ({"max_headers": 2}, "limits.max_headers: must be between"),
    ({"header_timeout": 0}, "limits.header_timeout: must be greater than zero"),
    ({"body_timeout": "soon"}, "limits.body_timeout: expected a duration"),
    ({"idle_timeout": -1}, "limits.idle_timeout: must not be negative"),
    ({"max_requests_per_connection": 0}, "limits.max_requests_per_connection: must be between"),
    ({"max_connections": True}, "limits.max_connections: expected a whole number"),
    ({"max_body": 1}, "limits.max_body: unknown field"),
    ("big", "limits: expected a mapping"),
])
def test_limits_problems_have_their_yaml_path(pki: Pki, tmp_path: Path, limits: Any,
                                              problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(yaml.safe_dump(_config(pki, limits)), base_dir=tmp_path)
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


async def test_connection_level_refusals_are_logged_and_counted(
        make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mtls_gateway.access")
    gw: RunningGateway = await make_gateway(
        _limited(pki, issuer, upstream, header_timeout="300ms"))
    assert statuses(await raw_exchange(gw, b"GET /public/x HTTP/1.1\r\nHost")) == [408]
    assert statuses(await raw_exchange(gw, b"GET /public/x HTTP/1.1\r\nHost: a\r\n"
                                           b"X-Big: " + b"v" * 20_000 + b"\r\n\r\n")) == [431]
    reasons = [r.decision["reason"] for r in caplog.records  # type: ignore[attr-defined]
               if hasattr(r, "decision")]
    assert reasons == ["header_timeout", "headers_too_large"]
    metrics = gw.server.metrics.render().decode()
    assert 'reason="header_timeout",route="-",status="408"' in metrics
    assert 'reason="headers_too_large",route="-",status="431"' in metrics
