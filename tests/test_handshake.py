"""Failed handshakes (mtls_gateway/handshake.py): the client reads the TLS alert, the operator
gets a counted, rate-limited log line with the reason. Real gateways, real TLS clients, on
asyncio's loop and on uvloop (the TLS layer differs), TLS 1.3 and 1.2."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
from pathlib import Path
from typing import Any

import pytest
import uvloop
import yaml

from gwtest import Pki, Upstream, base_config
from mtls_gateway import pki as pki_mod
from mtls_gateway.app import GatewayServer
from mtls_gateway.config_load import load_config
from mtls_gateway.handshake import HandshakeFailures, reason_from_ssl_error
from mtls_gateway.metrics import Metrics

#: listen.tls_stack: pyOpenSSL (the default) and CPython's ssl, each with its own TLS layer.
STACKS = ["openssl", "python"]

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def hs_pki(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Client certificates the listener refuses: expired (by the gateway's CA), unknown CA."""
    d = tmp_path_factory.mktemp("hs")
    ca_file = pki.ca_file
    # Our own CA for the expired certificate (the session CA's key is not kept): the
    # gateway trusts both CAs.
    ca = pki_mod.make_ca("handshake test CA")
    ca_crt, _ = ca.write(d, "ca")
    now = dt.datetime.now(dt.UTC)
    exp_crt, exp_key = pki_mod.issue_client(ca, "old", days=1,
                                            not_before=now - dt.timedelta(days=3)).write(d, "exp")
    good_crt, good_key = pki_mod.issue_client(ca, "good").write(d, "good")
    bundle = d / "bundle.pem"
    bundle.write_bytes(ca_file.read_bytes() + ca_crt.read_bytes())
    return {"bundle": bundle, "expired_cert": exp_crt, "expired_key": exp_key,
            "good_cert": good_crt, "good_key": good_key}


def client_context(pki: Pki, hs: dict[str, Path], kind: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    if kind == "expired":
        ctx.load_cert_chain(hs["expired_cert"], hs["expired_key"])
    elif kind == "good":
        ctx.load_cert_chain(hs["good_cert"], hs["good_key"])
    elif kind == "unknown_ca":
        ctx.load_cert_chain(pki.clients["stranger"].cert, pki.clients["stranger"].key)
    return ctx


def client_alert(port: int, ctx: ssl.SSLContext) -> str:
    """A blocking TLS client (run in a thread): the alert it read, or the HTTP status line."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET /public/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return tls.recv(64).split(b"\r\n")[0].decode()
        except ssl.SSLError as exc:
            return str(exc.reason)
        except OSError as exc:          # what the old gateway gave: a reset, or EOF
            return type(exc).__name__


def failure_counts(metrics: Metrics) -> dict[str, float]:
    """mtls_gateway_tls_handshake_failures_total by reason, as the server counted them."""
    return {s.labels["reason"]: s.value for m in metrics.registry.collect()
            if m.name == "mtls_gateway_tls_handshake_failures"
            for s in m.samples if s.name.endswith("_total")}


async def run_case(config: dict[str, Any], tmp_path: Path, ctx: ssl.SSLContext
                   ) -> tuple[str, dict[str, float]]:
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config))
    server = GatewayServer(load_config(path))
    await server.start()
    try:
        seen = await asyncio.to_thread(client_alert, server.port, ctx)
        await asyncio.sleep(0.05)
        return seen, failure_counts(server.metrics)
    finally:
        await server.stop()


def pki_config(pki: Pki, hs: dict[str, Path], upstream_url: str, **listen: Any
               ) -> dict[str, Any]:
    up = Upstream()
    up.url = upstream_url
    config = base_config(pki, None, up)
    config["routes"] = [{"name": "public", "path_prefix": "/", "auth": "none"}]
    config["listen"].update({"client_ca_file": str(hs["bundle"]), "client_cert": "required",
                             **listen})
    return config


TLS13 = {"none": "TLSV13_ALERT_CERTIFICATE_REQUIRED", "unknown_ca": "TLSV1_ALERT_UNKNOWN_CA",
         "expired": "SSLV3_ALERT_CERTIFICATE_EXPIRED"}
TLS12 = {"none": "SSLV3_ALERT_HANDSHAKE_FAILURE", "unknown_ca": "TLSV1_ALERT_UNKNOWN_CA",
         "expired": "SSLV3_ALERT_CERTIFICATE_EXPIRED"}
REASONS = {"none": "no_certificate", "unknown_ca": "unknown_ca", "expired": "expired"}


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("version", ["1.3", "1.2"])
@pytest.mark.parametrize("kind", ["none", "unknown_ca", "expired"])
async def test_pki_listener_sends_the_alert_and_counts(
        pki: Pki, hs_pki: dict[str, Path], upstream: Upstream, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, kind: str, version: str, stack: str) -> None:
    config = pki_config(pki, hs_pki, upstream.url, max_tls_version=version, tls_stack=stack)
    with caplog.at_level(logging.WARNING, logger="mtls_gateway.tls"):
        seen, counts = await run_case(config, tmp_path, client_context(pki, hs_pki, kind))
    assert seen == (TLS13 if version == "1.3" else TLS12)[kind]
    assert counts == {REASONS[kind]: 1.0}
    lines = [r.getMessage() for r in caplog.records if r.name == "mtls_gateway.tls"]
    assert len(lines) == 1 and f"TLS handshake failed ({REASONS[kind]})" in lines[0]
    # pyOpenSSL's transport sees the socket; CPython's SSLObject does not (handshake.py)
    assert ("from 127.0.0.1" if stack == "openssl" else "from unknown") in lines[0]
    assert upstream.seen == []


async def test_good_client_still_served(pki: Pki, hs_pki: dict[str, Path], upstream: Upstream,
                                        tmp_path: Path) -> None:
    seen, counts = await run_case(pki_config(pki, hs_pki, upstream.url), tmp_path,
                                  client_context(pki, hs_pki, "good"))
    assert seen == "HTTP/1.1 200 OK" and counts == {}
    assert len(upstream.seen) == 1


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("kind", ["none", "unknown_ca", "expired"])
def test_pki_listener_on_uvloop(pki: Pki, hs_pki: dict[str, Path], tmp_path: Path,
                                kind: str, stack: str) -> None:
    """uvloop's SSLProtocol (Cython) drops the alert the same way; the same fix applies
    (and the pyOpenSSL listener, on uvloop's TCP transport, sends it too)."""
    config = pki_config(pki, hs_pki, "http://127.0.0.1:9", tls_stack=stack)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert "uvloop" in type(runner.get_loop()).__module__
        seen, counts = runner.run(run_case(config, tmp_path,
                                           client_context(pki, hs_pki, kind)))
    assert seen == TLS13[kind]
    assert counts == {REASONS[kind]: 1.0}


@pytest.mark.parametrize(("kind", "reason"), [("none", "no_certificate"),
                                              ("expired", "expired")])
async def test_any_listener_counts_with_the_peer_address(
        pki: Pki, hs_pki: dict[str, Path], upstream: Upstream, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, kind: str, reason: str) -> None:
    config = pki_config(pki, hs_pki, upstream.url)
    del config["listen"]["client_ca_file"]
    config["listen"]["client_ca"] = "any"
    config["routes"] = [{"name": "public", "path_prefix": "/", "auth": "none"}]
    with caplog.at_level(logging.WARNING, logger="mtls_gateway.tls"):
        seen, counts = await run_case(config, tmp_path, client_context(pki, hs_pki, kind))
    assert seen == TLS13[kind]
    assert counts == {reason: 1.0}
    lines = [r.getMessage() for r in caplog.records if r.name == "mtls_gateway.tls"]
    assert len(lines) == 1 and f"({reason}) from 127.0.0.1" in lines[0]


def test_log_is_rate_limited_per_reason(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    counted: list[str] = []
    failures = HandshakeFailures(counted.append, interval=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="mtls_gateway.tls"):
        for _ in range(5):
            failures.failed("unknown_ca", ("192.0.2.7", 4000), "x")
        failures.failed("expired", ("192.0.2.8", 4000), "y")
        now[0] = 61.0
        failures.failed("unknown_ca", ("192.0.2.9", 4000), "z")
    lines = [r.getMessage() for r in caplog.records]
    assert counted == ["unknown_ca"] * 5 + ["expired", "unknown_ca"]
    assert lines == [
        "TLS handshake failed (unknown_ca) from 192.0.2.7: x",
        "TLS handshake failed (expired) from 192.0.2.8: y",
        "TLS handshake failed (unknown_ca) from 192.0.2.9: z (4 more like it in the last 60s)",
    ]


@pytest.mark.parametrize(("reason_text", "code", "expected"), [
    ("PEER_DID_NOT_RETURN_A_CERTIFICATE", None, "no_certificate"),
    ("CERTIFICATE_VERIFY_FAILED", 20, "unknown_ca"),
    ("CERTIFICATE_VERIFY_FAILED", 10, "expired"),
    ("CERTIFICATE_VERIFY_FAILED", 9, "not_yet_valid"),
    ("CERTIFICATE_VERIFY_FAILED", 26, "bad_certificate"),
    ("WRONG_VERSION_NUMBER", None, "protocol"),
    ("HTTP_REQUEST", None, "protocol"),
    ("TLSV1_ALERT_UNKNOWN_CA", None, "client_alert"),
    ("SOMETHING_NEW", None, "other"),
])
def test_reason_labels(reason_text: str, code: int | None, expected: str) -> None:
    exc = ssl.SSLError(1, reason_text)
    exc.reason = reason_text
    exc.verify_code = code  # type: ignore[attr-defined]
    assert reason_from_ssl_error(exc) == expected


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_plain_http_to_the_tls_port_is_closed_at_once(pki: Pki, hs_pki: dict[str, Path],
                                                      tmp_path: Path, loop: str,
                                                      stack: str) -> None:
    """No alert to send: the connection is not kept waiting for the handshake timeout."""
    import socket
    import time

    def plain_http(port: int) -> tuple[bytes, float]:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                data = raw.recv(100)
            except ConnectionResetError:
                data = b"reset"
        return data, time.monotonic() - started

    async def case() -> tuple[tuple[bytes, float], dict[str, float]]:
        path = tmp_path / "gw.yaml"
        path.write_text(yaml.safe_dump(pki_config(pki, hs_pki, "http://127.0.0.1:9",
                                                  tls_stack=stack)))
        server = GatewayServer(load_config(path))
        await server.start()
        try:
            got = await asyncio.to_thread(plain_http, server.port)
            await asyncio.sleep(0.05)
            return got, failure_counts(server.metrics)
        finally:
            await server.stop()

    factory = uvloop.new_event_loop if loop == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        (data, seconds), counts = runner.run(case())
    assert data in (b"", b"reset") and seconds < 10      # the handshake timeout is 60 s
    assert counts == {"protocol": 1.0}
