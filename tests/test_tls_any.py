"""``listen.client_ca: any`` (mtls_gateway/tls_any.py): any issuer at the TLS layer, the
token's binding decides. Real sockets, real certificates, real handshakes throughout."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import datetime as dt
import hashlib
import socket
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import NameOID

from gwtest import (
    Client,
    GatewayProcess,
    Issuer,
    Pki,
    RunningGateway,
    Upstream,
    base_config,
    count_certificate_reads,
)
from mtls_gateway import pki as pki_mod
from mtls_gateway import tls_any
from mtls_gateway.app import GatewayServer
from mtls_gateway.config_load import load_config
from mtls_gateway.thumbprint import x5t_s256
from mtls_gateway.tls_any import TlsAnyConnection


@pytest.fixture(scope="module")
def any_pki(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The test PKI plus self-signed clients: two valid, one expired, one not yet valid."""
    d = tmp_path_factory.mktemp("self-signed")
    now = dt.datetime.now(dt.UTC)
    made = {
        "ss1": pki_mod.self_signed_client("ss-client"),
        "ss2": pki_mod.self_signed_client("ss-client"),     # same subject, another key
        "expired": pki_mod.self_signed_client("old", days=1,
                                              not_before=now - dt.timedelta(days=3)),
        "future": pki_mod.self_signed_client("young", not_before=now + dt.timedelta(days=2)),
    }
    clients = dict(pki.clients)
    for name, pair in made.items():
        crt, key = pair.write(d, name)
        clients[name] = Client(crt, key, x5t_s256(pair.cert_der))
    clients["rsa1024"] = _weak_rsa_client(d)
    result = Pki(pki.dir, pki.ca_file, pki.server_cert, pki.server_key, clients)
    weak = ssl.create_default_context(cafile=str(pki.ca_file))
    weak.set_ciphers("DEFAULT:@SECLEVEL=0")   # else the client itself refuses the weak key
    weak.load_cert_chain(clients["rsa1024"].cert, clients["rsa1024"].key)
    result._contexts["rsa1024"] = weak
    return result


def _weak_rsa_client(d: Path) -> Client:
    """A self-signed client with a 1024-bit RSA key: below OpenSSL security level 2."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weak")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    (d / "weak.crt").write_bytes(cert.public_bytes(Encoding.PEM))
    (d / "weak.key").write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8,
                                                   NoEncryption()))
    return Client(d / "weak.crt", d / "weak.key", x5t_s256(cert.public_bytes(Encoding.DER)))


def any_config(pki: Pki, issuer: Issuer | None, upstream: Upstream,
               **listen: Any) -> dict[str, Any]:
    config = base_config(pki, issuer, upstream)
    del config["listen"]["client_ca_file"]
    config["listen"].update({"client_ca": "any", "client_cert": "optional", **listen})
    return config


async def handshake_alert(gw: RunningGateway, cert: str | None) -> str | None:
    """None if a request over a new connection presenting ``cert`` got an HTTP answer; else
    the TLS alert the gateway sent (``ssl.SSLError.reason``, e.g. ...CERTIFICATE_EXPIRED)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.server.port, ssl=gw.pki.client_context(cert),
        server_hostname="localhost")
    try:
        writer.write(b"GET /public/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        line = await reader.readline()
        return None if line.startswith(b"HTTP/1.1 ") else f"no answer: {line!r}"
    except ssl.SSLError as exc:
        return str(exc.reason)
    finally:
        writer.close()


async def start(make_gateway: Any, any_pki: Pki, config: dict[str, Any]) -> RunningGateway:
    gw = await make_gateway(config)
    return RunningGateway(gw.server, any_pki, gw.config_path)


# --- the binding decides ----------------------------------------------------------------------

@pytest.mark.parametrize(("cert", "bound_to", "path", "status", "reason"), [
    ("ss1", "ss1", "/api", 200, None),                       # self-signed, its own token
    ("ss2", "ss1", "/api", 401, "binding_mismatch"),         # same subject, other key
    (None, "ss1", "/api", 401, "no_client_cert"),
    ("ss1", None, "/api", 401, "binding_missing"),           # token without cnf
    ("a", "a", "/api", 200, None),                           # CA-issued certificates still work
    ("stranger", "stranger", "/api", 200, None),             # so do unknown CAs
    ("stranger", "a", "/api", 401, "binding_mismatch"),
    (None, None, "/public/x", 200, None),                    # auth: none needs no certificate
])
async def test_binding_decides(make_gateway: Any, any_pki: Pki, issuer: Issuer,
                               upstream: Upstream, cert: str | None, bound_to: str | None,
                               path: str, status: int, reason: str | None) -> None:
    gw = await start(make_gateway, any_pki, any_config(any_pki, issuer, upstream))
    token = issuer.mint(any_pki.clients[bound_to].thumbprint if bound_to else None)
    reply = await gw.request(path, cert=cert, token=None if path.startswith("/public") else token)
    assert reply.status == status, reply.body
    if reason is None:
        assert len(upstream.seen) == 1
        seen = upstream.seen[0].headers
        assert seen["x-forwarded-proto"] == ["https"]
        if cert is not None:
            assert seen["x-client-cert-thumbprint"] == [any_pki.clients[cert].thumbprint]
    else:
        assert reply.json()["reason"] == reason
        assert upstream.seen == []


async def test_keep_alive_reads_the_certificate_once(
        make_gateway: Any, any_pki: Pki, issuer: Issuer, upstream: Upstream,
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_certificate_reads(monkeypatch, "mtls_gateway.tls_any")
    gw = await start(make_gateway, any_pki, any_config(any_pki, issuer, upstream))
    token = issuer.mint(any_pki.clients["ss1"].thumbprint)
    connector = aiohttp.TCPConnector(ssl=any_pki.client_context("ss1"), limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        for i in range(5):
            async with session.get(f"{gw.url}/k{i}",
                                   headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 200
    assert len(calls) == 1
    assert x5t_s256(calls[0]) == any_pki.clients["ss1"].thumbprint
    assert [s.path_qs for s in upstream.seen] == [f"/k{i}" for i in range(5)]


def count_calls(monkeypatch: pytest.MonkeyPatch, *names: str) -> list[str]:
    """Record every call of TlsAnyConnection's ``names`` (the calls still happen)."""
    calls: list[str] = []
    for name in names:
        real = getattr(TlsAnyConnection, name)

        def counted(self: TlsAnyConnection, *args: Any, _real: Any = real,
                    _name: str = name) -> None:
            calls.append(_name)
            _real(self, *args)

        monkeypatch.setattr(TlsAnyConnection, name, counted)
    return calls


def data_path(monkeypatch: pytest.MonkeyPatch, path: str) -> list[object]:
    """Make established connections use ``path`` ("fast": tls_any._FastIO, "public":
    pyOpenSSL's public API only, as with a pyOpenSSL lacking what _FastIO needs); returns
    what fast_io gave each connection."""
    given: list[object] = []
    real = tls_any.fast_io

    def chosen(tls: Any) -> Any:
        io = real(tls) if path == "fast" else None
        given.append(io)
        return io

    monkeypatch.setattr(tls_any, "fast_io", chosen)
    return given


@pytest.mark.parametrize("path", ["fast", "public"])
@pytest.mark.parametrize(("upload", "download"), [(8 << 20, 0), (0, 24 << 20)])
async def test_large_bodies_stream_both_ways(make_gateway: Any, any_pki: Pki, issuer: Issuer,
                                             upstream: Upstream, upload: int, download: int,
                                             monkeypatch: pytest.MonkeyPatch,
                                             path: str) -> None:
    """More data than any buffer holds passes intact; a fast upload makes the gateway pause
    reading from the client while it sends on to the upstream. Both data paths."""
    given = data_path(monkeypatch, path)
    calls = count_calls(monkeypatch, "pause_reading", "resume_reading")
    gw = await start(make_gateway, any_pki, any_config(any_pki, issuer, upstream))
    body = hashlib.sha256(b"seed").digest() * (upload // 32)
    reply = await gw.request(f"/big?n={download}" if download else "/upload", cert="ss1",
                             token=issuer.mint(any_pki.clients["ss1"].thumbprint),
                             method="POST", data=body)
    assert reply.status == 200
    if upload:
        assert reply.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
        assert upstream.seen[0].body_len == upload
        assert {"pause_reading", "resume_reading"} <= set(calls), calls
    else:
        assert len(reply.body) == download
    assert len(given) == 1
    assert isinstance(given[0], tls_any._FastIO) if path == "fast" else given[0] is None


@pytest.mark.parametrize("path", ["fast", "public"])
@pytest.mark.parametrize("close", ["client close_notify", "server Connection: close"])
async def test_keep_alive_requests_and_both_ways_of_closing(
        make_gateway: Any, any_pki: Pki, issuer: Issuer, upstream: Upstream,
        monkeypatch: pytest.MonkeyPatch, path: str, close: str) -> None:
    """Pipelined and sequential requests on one connection, then its end: the client's
    close_notify (read on the data path, handed to the public API) or the gateway's own
    close after "Connection: close" (the first answer and the tickets leave together)."""
    data_path(monkeypatch, path)
    calls = count_calls(monkeypatch, "connection_lost")
    gw = await start(make_gateway, any_pki, any_config(any_pki, issuer, upstream))
    token = issuer.mint(any_pki.clients["ss1"].thumbprint)

    def exchange() -> bytes:
        with socket.create_connection(("127.0.0.1", gw.server.port), timeout=20) as raw, \
                any_pki.client_context("ss1").wrap_socket(raw,
                                                         server_hostname="localhost") as tls:
            head = f"Host: x\r\nAuthorization: Bearer {token}\r\n"
            tls.sendall(f"GET /p1 HTTP/1.1\r\n{head}\r\nGET /p2 HTTP/1.1\r\n{head}\r\n"
                        .encode())                                 # two at once
            data = b""
            while data.count(b"HTTP/1.1 200") < 2:
                data += tls.recv(65536)
            last = "Connection: close\r\n" if close.startswith("server") else ""
            tls.sendall(f"GET /p3 HTTP/1.1\r\n{head}{last}\r\n".encode())
            while data.count(b"HTTP/1.1 200") < 3:
                data += tls.recv(65536)
            if last:
                while chunk := tls.recv(65536):    # b"": the gateway's close_notify
                    data += chunk
            else:
                tls.unwrap()                       # our close_notify; the gateway answers
            return data

    data = await asyncio.to_thread(exchange)
    assert data.count(b"HTTP/1.1 200") == 3
    assert [s.path_qs for s in upstream.seen] == ["/p1", "/p2", "/p3"]
    for _ in range(3000):               # bounded wait (up to 30 s) for the server side
        if calls:
            break
        await asyncio.sleep(0.01)
    assert calls == ["connection_lost"]


async def test_session_tickets_reach_a_client_that_sends_nothing(
        make_gateway: Any, any_pki: Pki, issuer: Issuer, upstream: Upstream,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """TLS 1.3 tickets wait for the first answer, but not for ever (TICKET_HOLD): a client
    that only handshakes gets a ticket it can resume with."""
    monkeypatch.setattr(tls_any, "TICKET_HOLD", 0.05)
    gw = await start(make_gateway, any_pki, any_config(any_pki, issuer, upstream))
    ctx = any_pki.client_context("ss1")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3

    def handshake_only() -> ssl.SSLSession | None:
        with socket.create_connection(("127.0.0.1", gw.server.port), timeout=20) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.settimeout(0.05)
            for _ in range(400):          # bounded (up to ~20 s): no request is ever sent
                with contextlib.suppress(TimeoutError, ssl.SSLWantReadError):
                    tls.recv(1)           # processes the ticket; no data comes
                if tls.session is not None and tls.session.has_ticket:
                    return tls.session
            return None

    def resumed(session: ssl.SSLSession) -> bool:
        with socket.create_connection(("127.0.0.1", gw.server.port), timeout=20) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
            tls.sendall(b"GET /public/r HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert tls.recv(65536).startswith(b"HTTP/1.1 200")
            return tls.session_reused

    session = await asyncio.to_thread(handshake_only)
    assert session is not None
    assert await asyncio.to_thread(resumed, session) is True
    assert [s.path_qs for s in upstream.seen] == ["/public/r"]


async def test_slow_reader_pauses_the_gateway_writes(
        make_gateway: Any, any_pki: Pki, issuer: Issuer, upstream: Upstream,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that does not read: the gateway's writes pause (nothing piles up in memory)
    and resume once it reads; the whole body then arrives."""
    calls = count_calls(monkeypatch, "pause_writing", "resume_writing")
    gw = await start(make_gateway, any_pki, any_config(any_pki, issuer, upstream))
    size = 32 << 20
    token = issuer.mint(any_pki.clients["ss1"].thumbprint)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.server.port, ssl=any_pki.client_context("ss1"),
        server_hostname="localhost")
    try:
        writer.write(f"GET /big?n={size} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     f"Authorization: Bearer {token}\r\n\r\n".encode())
        for _ in range(3000):           # bounded wait (up to 30 s) for the buffers to fill
            if calls:
                break
            await asyncio.sleep(0.01)
        assert calls == ["pause_writing"]
        data = await asyncio.wait_for(reader.read(), 60)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower()
    assert body.endswith(b"\r\n0\r\n\r\n") and body.count(b"x") == size   # all chunks
    assert "resume_writing" in calls

async def test_closing_on_a_client_that_never_reads_ends_in_an_abort(
        make_gateway: Any, any_pki: Pki, issuer: Issuer, upstream: Upstream,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopping the gateway under a client that never reads: close() cannot flush, so the
    socket is aborted after shutdown_timeout instead of staying open for ever."""
    calls = count_calls(monkeypatch, "pause_writing", "connection_lost")
    config = any_config(any_pki, issuer, upstream)
    config["shutdown_grace"] = "0.2s"
    gw = await start(make_gateway, any_pki, config)
    gw.server._tls.shutdown_timeout = 0.2   # type: ignore[union-attr]
    token = issuer.mint(any_pki.clients["ss1"].thumbprint)
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.server.port, ssl=any_pki.client_context("ss1"),
        server_hostname="localhost")
    try:
        writer.write(f"GET /big?n={64 << 20} HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {token}\r\n\r\n".encode())
        for _ in range(3000):           # bounded waits (up to 30 s each), no timing asserted
            if calls:
                break
            await asyncio.sleep(0.01)
        assert calls == ["pause_writing"]
        await gw.server.stop()
        for _ in range(3000):
            if "connection_lost" in calls:
                break
            await asyncio.sleep(0.01)
        # (more pauses may come first: the kernel's send buffer grows while the answer streams)
        assert calls[-1] == "connection_lost"             # while the client still waits
        assert set(calls[:-1]) == {"pause_writing"}
    finally:
        writer.close()


# --- the TLS layer ----------------------------------------------------------------------------

EXPIRED = "SSLV3_ALERT_CERTIFICATE_EXPIRED"
BAD_CERTIFICATE = "SSLV3_ALERT_BAD_CERTIFICATE"
CERTIFICATE_REQUIRED = "TLSV13_ALERT_CERTIFICATE_REQUIRED"
# The pki listener sends its alert too (mtls_gateway/handshake.py; before, the client only saw
# EOF): a self-signed or foreign certificate is an unknown CA to it.
UNKNOWN_CA = "TLSV1_ALERT_UNKNOWN_CA"


@pytest.mark.parametrize(("cert", "listen", "alert"), [
    ("expired", {}, EXPIRED),
    ("future", {}, BAD_CERTIFICATE),   # OpenSSL's alert for "not yet valid"
    ("expired", {"client_cert_validity": "ignore"}, None),
    ("future", {"client_cert_validity": "ignore"}, None),
    ("ss1", {}, None),
    ("rsa1024", {}, BAD_CERTIFICATE),  # too weak to prove possession (security level 2)
    ("rsa1024", {"client_cert_validity": "ignore"}, BAD_CERTIFICATE),
    (None, {"client_cert": "required"}, CERTIFICATE_REQUIRED),
    ("ss1", {"client_cert": "required"}, None),
])
async def test_handshake(make_gateway: Any, any_pki: Pki, issuer: Issuer, upstream: Upstream,
                         cert: str | None, listen: dict[str, str], alert: str | None) -> None:
    gw = await start(make_gateway, any_pki, any_config(any_pki, issuer, upstream, **listen))
    assert await handshake_alert(gw, cert) == alert
    if alert is None:
        token = issuer.mint(any_pki.clients[cert].thumbprint if cert else None)
        assert (await gw.request("/api", cert=cert, token=token)).status == 200
        assert [s.path_qs for s in upstream.seen] == ["/public/x", "/api"]
    else:
        assert upstream.seen == []


@pytest.mark.parametrize(("versions", "client_max", "expected"), [
    (("1.2", "1.3"), ssl.TLSVersion.TLSv1_3, "TLSv1.3"),
    (("1.2", "1.3"), ssl.TLSVersion.TLSv1_2, "TLSv1.2"),
    (("1.2", "1.2"), ssl.TLSVersion.TLSv1_3, "TLSv1.2"),   # negotiates down
    (("1.3", "1.3"), ssl.TLSVersion.TLSv1_2, None),        # refused
])
async def test_tls_versions(make_gateway: Any, any_pki: Pki, issuer: Issuer, upstream: Upstream,
                            versions: tuple[str, str], client_max: ssl.TLSVersion,
                            expected: str | None) -> None:
    config = any_config(any_pki, issuer, upstream, min_tls_version=versions[0],
                        max_tls_version=versions[1])
    gw = await start(make_gateway, any_pki, config)
    ctx = ssl.create_default_context(cafile=str(any_pki.ca_file))
    ctx.load_cert_chain(any_pki.clients["ss1"].cert, any_pki.clients["ss1"].key)
    ctx.maximum_version = client_max
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port, ssl=ctx,
                                                       server_hostname="localhost")
    except (ssl.SSLError, ConnectionError):
        assert expected is None
        assert upstream.seen == []
        return
    try:
        assert writer.get_extra_info("ssl_object").version() == expected
        writer.write(b"GET /public/v HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    assert [s.path_qs for s in upstream.seen] == ["/public/v"]


@pytest.mark.parametrize(("cert", "alert"), [
    ("ss1", UNKNOWN_CA), ("stranger", UNKNOWN_CA), ("expired", UNKNOWN_CA), ("a", None)])
async def test_default_pki_mode_still_refuses_unknown_issuers(
        make_gateway: Any, any_pki: Pki, issuer: Issuer, upstream: Upstream, cert: str,
        alert: str | None) -> None:
    gw = await start(make_gateway, any_pki, base_config(any_pki, issuer, upstream))
    assert await handshake_alert(gw, cert) == alert
    assert [s.path_qs for s in upstream.seen] == ([] if alert else ["/public/x"])


DECRYPT_ERROR = 51   # RFC 8446 section 6.2: a signature could not be verified


@dataclass(frozen=True)
class RawResult:
    answer: bytes
    alert: int | None     # the TLS alert the gateway sent, if any
    error: str | None


def _tlslite_request(port: int, cert: Path, key: Path) -> RawResult:
    """A TLS 1.2 client (tlslite-ng, pure Python) that presents ``cert`` but signs its
    CertificateVerify with ``key``: OpenSSL-based clients refuse such a pair before sending."""
    from tlslite import X509, HandshakeSettings, TLSConnection, X509CertChain, parsePEMKey
    from tlslite.errors import TLSError, TLSRemoteAlert

    settings = HandshakeSettings()
    settings.maxVersion = (3, 3)   # tlslite-ng sends TLS 1.3 client certificates only after
    #                                the handshake (post-handshake auth), which we do not ask for
    chain = X509CertChain([X509().parse(cert.read_text())])
    private = parsePEMKey(key.read_text(), private=True)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn = TLSConnection(sock)
    try:
        conn.handshakeClientCert(chain, private, settings=settings)
        conn.write(b"GET /public/possession HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := conn.read():
            data += chunk
        return RawResult(data, None, None)
    except TLSRemoteAlert as exc:
        return RawResult(b"", exc.description, repr(exc))
    except (TLSError, OSError) as exc:
        return RawResult(b"", None, repr(exc))
    finally:
        sock.close()


def _scapy_tls13_request(port: int, cert: Path, key: Path) -> RawResult:
    """A TLS 1.3 client (scapy's TLS automaton) that presents ``cert`` and signs its
    CertificateVerify with ``key``, whatever they are."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from scapy.layers.tls.automaton_cli import TLSClientAutomaton
    from scapy.layers.tls.record import TLSAlert

    class Client(TLSClientAutomaton):   # type: ignore[misc]
        """Records what it would print."""

        lines: list[str]

        def vprint(self, s: object = "") -> None:
            self.lines.append(str(s))

    # scapy reads traditional ("EC PRIVATE KEY") PEM, not PKCS#8
    traditional = key.with_suffix(".traditional.key")
    traditional.write_bytes(load_pem_private_key(key.read_bytes(), None).private_bytes(
        Encoding.PEM, PrivateFormat.TraditionalOpenSSL, NoEncryption()))
    Client.lines = []
    request = b"GET /public/possession HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    client = Client(server="127.0.0.1", dport=port, mycert=str(cert), mykey=str(traditional),
                    version="tls13", supported_signature_algorithms=["sha256+ecdsa"],
                    # "wait": read for up to 0.3 s; the gateway's close_notify after the
                    # answer (Connection: close) or its alert ends the run early
                    data=[request] + [b"wait"] * 100, verbose=1)
    client.run(wait=True)
    answer = b"".join(ast.literal_eval(line.removeprefix("Received: "))   # repr of bytes
                      for line in Client.lines if line.startswith("Received: b"))
    alerts = [line for line in Client.lines if line.startswith("Received: <TLSAlert")]
    fatal = [a for a in alerts if "level=fatal" in a]
    alert = None
    if fatal:
        descr = fatal[0].split("descr=")[1].split()[0]
        alert = next(k for k, v in TLSAlert().get_field("descr").i2s.items() if v == descr)
    return RawResult(answer, alert, "; ".join(alerts) or None)


@pytest.mark.filterwarnings("ignore:The asyncore module:DeprecationWarning")  # tlslite-ng
@pytest.mark.parametrize("version", ["1.2", "1.3"])
@pytest.mark.parametrize(("cert", "key", "ok"), [
    ("ss1", "ss1", True),     # the control: this client can pass
    ("ss1", "ss2", False),    # ss1's certificate, ss2's key: no proof of possession
    ("a", "ss1", False),      # a CA-issued certificate without its key
])
async def test_handshake_proves_possession_of_the_key(
        make_gateway: Any, any_pki: Pki, issuer: Issuer, upstream: Upstream, cert: str,
        key: str, ok: bool, version: str) -> None:
    """Clients built on OpenSSL refuse a certificate with another key before sending, so the
    forgeries come from two pure-Python TLS stacks: tlslite-ng (TLS 1.2; it sends TLS 1.3
    client certificates only after the handshake, which the gateway does not ask for) and
    scapy's TLS automaton (TLS 1.3)."""
    gw = await start(make_gateway, any_pki, any_config(any_pki, issuer, upstream))
    client = _tlslite_request if version == "1.2" else _scapy_tls13_request
    result = await asyncio.to_thread(client, gw.server.port,
                                     any_pki.clients[cert].cert, any_pki.clients[key].key)
    if ok:
        assert result.answer.startswith(b"HTTP/1.1 200"), result
        assert [s.path_qs for s in upstream.seen] == ["/public/possession"]
    else:
        assert result.alert == DECRYPT_ERROR, result
        assert upstream.seen == []


async def test_stalled_handshake_is_dropped(make_gateway: Any, any_pki: Pki, issuer: Issuer,
                                            upstream: Upstream) -> None:
    """A client that connects and never finishes its handshake is disconnected."""
    gw = await start(make_gateway, any_pki, any_config(any_pki, issuer, upstream))
    site = gw.server._tls
    site.handshake_timeout = 0.2   # type: ignore[union-attr]
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
    try:
        assert await asyncio.wait_for(reader.read(), 30) == b""   # closed by the gateway
    finally:
        writer.close()
    assert site.handshaking == set()   # type: ignore[union-attr]


async def test_reload_keeps_any_mode_and_swaps_the_server_certificate(
        make_gateway: Any, any_pki: Pki, issuer: Issuer, upstream: Upstream,
        tmp_path: Path) -> None:
    first, key = pki_mod.issue_server(pki_mod.make_ca("reload CA")).write(tmp_path, "srv")
    config = any_config(any_pki, issuer, upstream, cert_file=str(first), key_file=str(key))
    gw = await start(make_gateway, any_pki, config)

    async def served_certificate() -> bytes:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        _, writer = await asyncio.open_connection("127.0.0.1", gw.server.port, ssl=ctx)
        der: bytes = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        return der

    assert await served_certificate() == x509.load_pem_x509_certificate(
        first.read_bytes()).public_bytes(Encoding.DER)
    first.write_bytes(any_pki.server_cert.read_bytes())    # rotate to the test CA's server
    key.write_bytes(any_pki.server_key.read_bytes())
    assert await gw.server.reload("test") is True
    assert await served_certificate() == x509.load_pem_x509_certificate(
        any_pki.server_cert.read_bytes()).public_bytes(Encoding.DER)
    token = issuer.mint(any_pki.clients["ss1"].thumbprint)
    assert (await gw.request("/api", cert="ss1", token=token)).status == 200


async def test_reload_applies_client_cert_and_validity_to_new_handshakes(
        make_gateway: Any, any_pki: Pki, issuer: Issuer, upstream: Upstream,
        caplog: pytest.LogCaptureFixture) -> None:
    """Unlike the pki listener, the any listener rebuilds its whole context on reload."""
    gw = await start(make_gateway, any_pki, any_config(any_pki, issuer, upstream))
    assert await handshake_alert(gw, None) is None
    assert await handshake_alert(gw, "expired") == EXPIRED
    config = any_config(any_pki, issuer, upstream, client_cert="required",
                        client_cert_validity="ignore")
    gw.config_path.write_text(yaml.safe_dump(config))
    assert await gw.server.reload("test") is True
    assert await handshake_alert(gw, None) == CERTIFICATE_REQUIRED
    assert await handshake_alert(gw, "expired") is None
    assert "takes effect after a restart" not in caplog.text


async def test_reload_refuses_to_change_client_ca(
        make_gateway: Any, any_pki: Pki, issuer: Issuer, upstream: Upstream) -> None:
    """A pki config may hold binding: off routes: it must never run on an any listener."""
    gw = await start(make_gateway, any_pki, any_config(any_pki, issuer, upstream))
    config = base_config(any_pki, issuer, upstream)
    config["routes"][1]["auth"]["binding"] = "off"
    gw.config_path.write_text(yaml.safe_dump(config))
    assert await gw.server.reload("test") is False
    assert gw.server.config.listen.client_ca == "any"
    reply = await gw.request("/api", cert="ss2", token=issuer.mint(None))
    assert (reply.status, reply.json()["reason"]) == (401, "binding_missing")
    assert upstream.seen == []


@pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT load spreading is Linux's")
async def test_workers_share_the_any_listener(any_pki: Pki, issuer: Issuer, upstream: Upstream,
                                              tmp_path: Path) -> None:
    """``--workers 2`` in client_ca: any mode: both processes bind the port (reuse_port)."""
    config = any_config(any_pki, issuer, upstream)
    token = issuer.mint(any_pki.clients["ss1"].thumbprint)
    requests = 40
    async with GatewayProcess(config, tmp_path, "--workers", "2") as gw:
        for i in range(requests):   # a new connection each time: the kernel picks a worker
            connector = aiohttp.TCPConnector(ssl=any_pki.client_context("ss1"), force_close=True)
            async with aiohttp.ClientSession(connector=connector,
                                             timeout=aiohttp.ClientTimeout(total=15)) as s, \
                    s.get(f"{gw.url}/w{i}", headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 200
        assert await gw.stop() == 0
        pids = {line["pid"] for line in gw.log("mtls_gateway.access")}
        assert len(pids) == 2                         # both workers served requests
        assert len(upstream.seen) == requests


async def _accepted_socket_options(config: dict[str, Any], tmp_path: Path,
                                   ctx: ssl.SSLContext) -> tuple[int, int, object]:
    """(SO_KEEPALIVE, TCP_NODELAY) of the gateway's side of a live connection, and what the
    connection tells the application protocol its socket is."""
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config))
    server = GatewayServer(load_config(path))
    await server.start()
    try:
        _reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=ctx, server_hostname="localhost")
        try:
            runner = server._runner
            assert runner is not None and runner.server is not None
            for _ in range(500):        # the gateway reads the client's last flight
                if runner.server.connections:
                    break
                await asyncio.sleep(0.01)
            (handler,) = runner.server.connections
            transport = handler.transport
            assert isinstance(transport, tls_any.TlsAnyTransport)
            raw = transport._connection.raw
            assert raw is not None
            sock = raw.get_extra_info("socket")
            return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                    transport.get_extra_info("socket"))
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
    finally:
        await server.stop()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_accepted_sockets_keep_alive_without_aiohttp_setting_them(
        pki: Pki, tmp_path: Path, loop: str) -> None:
    """The TLS connection keeps its TCP socket to itself (aiohttp would make a socket object
    and two system calls per connection to set options): TCP keepalive comes from the
    listening socket, TCP_NODELAY from the event loop, on both loops."""
    up = Upstream()
    up.url = "http://127.0.0.1:9"           # (never asked: no request is sent)
    config = base_config(pki, None, up)
    config["routes"] = [{"name": "public", "path_prefix": "/", "auth": "none"}]
    factory = uvloop.new_event_loop if loop == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        keepalive, nodelay, exposed = runner.run(
            _accepted_socket_options(config, tmp_path, pki.client_context("a")))
    assert keepalive != 0 and nodelay != 0
    assert exposed is None
