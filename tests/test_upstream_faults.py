"""Upstream faults are answered the same way with the fast lane on and off.

For each fault the client sees the same thing (status, or a cut after a head it really got),
the decision log says the same (reason, status, decision), the metrics count the same, and
the upstream saw the same number of requests. Real TLS clients, a real gateway, and a real
upstream socket that writes scripted bytes with real pauses between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gwtest import (
    Issuer,
    Pki,
    RawServer,
    RunningGateway,
    Upstream,
    base_config,
    free_port,
)
from mtls_gateway.fastlane import UpstreamPool

#: A step of an answer: bytes to write, seconds to wait, or "close" / "reset".
Step = bytes | float | str

_CHUNKED = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"


class FaultyUpstream(RawServer):
    """Reads a request head, then plays ``script`` on the connection (for every request)."""

    def __init__(self, script: list[Step]) -> None:
        super().__init__()
        self.script = script
        self.requests = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            for step in self.script:
                if isinstance(step, bytes):
                    writer.write(step)
                    await writer.drain()
                elif isinstance(step, float):
                    await asyncio.sleep(step)
                elif step == "reset":
                    self.reset(writer)
                    return
                else:
                    return


@pytest.fixture
async def faulty() -> AsyncIterator[FaultyUpstream]:
    up = FaultyUpstream([])
    await up.start()
    yield up
    await up.stop()


async def _gateway(make_gateway: Any, pki: Pki, issuer: Issuer, url: str, fast: bool,
                   **upstream: Any) -> RunningGateway:
    config = base_config(pki, issuer, Upstream())
    config["upstream"].update(url=url, **upstream)
    config["fast_lane"] = fast
    gw: RunningGateway = await make_gateway(config)
    return gw


async def _get(gw: RunningGateway, token: str, path: str = "/x") -> tuple[bytes, bytes]:
    """One keep-alive GET on a new connection: (head, body); the body is what arrived
    before the gateway closed or the Content-Length was read."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.server.port, ssl=gw.pki.client_context("a"),
        server_hostname="localhost")
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {token}\r\n"
                     "Connection: close\r\n\r\n".encode())
        raw = b""
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            raw = await asyncio.wait_for(reader.read(), 30)
        head, _, body = raw.partition(b"\r\n\r\n")
        return head, body
    finally:
        writer.close()


def _decision(caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    records = [r for r in caplog.records if r.name == "mtls_gateway.access"]
    assert len(records) == 1, [getattr(r, "decision", None) for r in records]
    decision: dict[str, Any] = records[0].decision  # type: ignore[attr-defined]
    return decision


def _upstream_errors(gw: RunningGateway) -> dict[str, float]:
    out = {}
    for line in gw.server.metrics.render().decode().splitlines():
        if line.startswith("mtls_gateway_upstream_errors_total{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('reason="')[1].split('"')[0]] = float(value)
    return out


# (script, read_timeout, status the client sees, reason logged, status logged,
#  cut after the head)
FAULTS: dict[str, tuple[list[Step], str, int, str, int, bool]] = {
    # (retried once on a new connection, by both: a plain request is idempotent)
    "reset before the head": (["reset"], "5s", 502, "upstream_unavailable", 502, False),
    "closed before the head": (["close"], "5s", 502, "upstream_unavailable", 502, False),
    "reset during the head": ([b"HTTP/1.1 200 OK\r\nContent-Le", 0.05, "reset"], "5s",
                              502, "upstream_unavailable", 502, False),
    "broken chunk in the head's read": ([_CHUNKED + b"2\r\nok\r\nzz\r\n", 0.3, "close"],
                                        "5s", 502, "upstream_unavailable", 502, False),
    # (a second's pause: the gateway must have read and relayed the head, even when slow)
    "broken chunk in a later read": ([_CHUNKED + b"2\r\nok\r\n", 1.0, b"zz\r\n", 0.3, "close"],
                                     "5s", 200, "upstream_aborted", 200, True),
    "reset mid-body": ([b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc", 1.0, "reset"],
                       "5s", 200, "upstream_aborted", 200, True),
    "slow upstream": ([2.0, "close"], "300ms", 504, "upstream_timeout", 504, False),
    "oversized head": ([b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 9000
                        + b"\r\nContent-Length: 2\r\n\r\nok", 0.3, "close"], "5s",
                       502, "upstream_unavailable", 502, False),
}


@pytest.mark.parametrize("fast", [True, False], ids=["lane", "aiohttp"])
@pytest.mark.parametrize("fault", list(FAULTS))
async def test_upstream_fault_answered_the_same_on_both_paths(
        make_gateway: Any, pki: Pki, issuer: Issuer, faulty: FaultyUpstream, fast: bool,
        fault: str, caplog: pytest.LogCaptureFixture) -> None:
    script, read_timeout, status, reason, logged, cut = FAULTS[fault]
    faulty.script = script
    gw = await _gateway(make_gateway, pki, issuer, faulty.url, fast, read_timeout=read_timeout)
    caplog.set_level(logging.INFO, "mtls_gateway.access")
    head, body = await _get(gw, issuer.mint(pki.clients["a"].thumbprint))
    assert head.split(b" ")[1] == str(status).encode(), head
    if cut:
        assert b"\r\nContent-Length: 100" not in head or len(body) < 100
    else:
        assert json.loads(body)["reason"] == reason
    decision = _decision(caplog)
    assert (decision["decision"], decision["reason"], decision["status"]) == (
        "allow", reason, logged)
    assert _upstream_errors(gw) == {reason: 1.0}
    # a connection lost before a whole head is retried once (RFC 9112 section 9.3.1)
    assert faulty.requests == (2 if "before the head" in fault or "during" in fault else 1)
    lane = gw.server.gateway.lane
    assert (lane is not None and lane.pool.opened >= 1) is fast


@pytest.mark.parametrize("fast", [True, False], ids=["lane", "aiohttp"])
async def test_refused_upstream_connection_is_502_on_both_paths(
        make_gateway: Any, pki: Pki, issuer: Issuer, fast: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    gw = await _gateway(make_gateway, pki, issuer, f"http://127.0.0.1:{free_port()}", fast)
    caplog.set_level(logging.INFO, "mtls_gateway.access")
    head, body = await _get(gw, issuer.mint(pki.clients["a"].thumbprint))
    assert head.split(b" ")[1] == b"502" and json.loads(body)["reason"] == "upstream_unavailable"
    decision = _decision(caplog)
    assert (decision["reason"], decision["status"]) == ("upstream_unavailable", 502)
    assert _upstream_errors(gw) == {"upstream_unavailable": 1.0}


@pytest.mark.parametrize("fast", [True, False], ids=["lane", "aiohttp"])
async def test_a_client_that_stops_reading_is_not_cut_nor_blamed_on_the_upstream(
        make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream, fast: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    """The client reads nothing for three read timeouts, then everything: the whole
    download arrives and the log says allowed, 200 (the upstream was never slow)."""
    gw = await _gateway(make_gateway, pki, issuer, upstream.url, fast, read_timeout="300ms")
    caplog.set_level(logging.INFO, "mtls_gateway.access")
    size = 16 << 20
    token = issuer.mint(pki.clients["a"].thumbprint)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.server.port, ssl=pki.client_context("a"), server_hostname="localhost",
        limit=1 << 16)
    try:
        writer.write(f"GET /big?n={size} HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {token}"
                     "\r\nConnection: close\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.split(b" ")[1] == b"200"
        writer.transport.pause_reading()
        await asyncio.sleep(1.0)                    # > read_timeout: the client's stall
        writer.transport.resume_reading()
        body = await asyncio.wait_for(reader.read(), 60)
    finally:
        writer.close()
    assert len(body) >= size                        # (chunked framing adds a little)
    decision = _decision(caplog)
    assert (decision["reason"], decision["status"]) == ("allowed", 200)
    assert _upstream_errors(gw) == {}


async def test_a_paused_upstream_connection_is_pooled_reading() -> None:
    """Pool hygiene: a connection given back while its reading was paused (the client's
    back-pressure on the answer's last bytes) is resumed, or the next request drawing it
    would never hear its answer."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    key = ("127.0.0.1", server.sockets[0].getsockname()[1])
    pool = UpstreamPool(4, 2.0)
    try:
        conn = await pool.connect(key)
        assert conn.transport is not None
        conn.transport.pause_reading()
        pool.give_back(conn)
        again = pool.take(key)
        assert again is conn and conn.transport.is_reading()
    finally:
        pool.close()
        server.close()
        await server.wait_closed()
