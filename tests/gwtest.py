"""Real parts for the tests (imported by conftest.py and the test modules): PKI, a token
issuer with a JWKS over HTTPS, a recording upstream, and the gateway itself on a real
mutual-TLS socket. Everything listens on 127.0.0.1 and is stopped by the fixture that
started it."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import signal
import socket
import ssl
import struct
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import yaml
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from mtls_gateway import pki as pki_mod
from mtls_gateway.app import GatewayServer
from mtls_gateway.config_load import load_config
from mtls_gateway.thumbprint import x5t_s256

ISSUER = "https://issuer.test"
AUDIENCE = "https://api.test"


@dataclass(frozen=True)
class Client:
    cert: Path
    key: Path
    thumbprint: str

    @property
    def der(self) -> bytes:
        return x509.load_pem_x509_certificate(self.cert.read_bytes()).public_bytes(
            serialization.Encoding.DER)


@dataclass
class Pki:
    dir: Path
    ca_file: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, Client]
    _contexts: dict[str | None, ssl.SSLContext] = field(default_factory=dict)

    def client_context(self, name: str | None) -> ssl.SSLContext:
        """A client TLS context trusting our CA and presenting client ``name`` (or none)."""
        if name not in self._contexts:
            ctx = ssl.create_default_context(cafile=str(self.ca_file))
            if name is not None:
                c = self.clients[name]
                ctx.load_cert_chain(c.cert, c.key)
            self._contexts[name] = ctx
        return self._contexts[name]


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = pki_mod.make_ca("test CA")
    ca_file, _ = ca.write(d, "ca")
    server_cert, server_key = pki_mod.issue_server(ca).write(d, "server")
    clients: dict[str, Client] = {}
    made = {
        "a": pki_mod.issue_client(ca, "client-a"),
        # same CA, same subject as "a", another key: must not be able to use a's tokens
        "a2": pki_mod.issue_client(ca, "client-a"),
        "b": pki_mod.issue_client(ca, "client-b"),
        # a front proxy (ingress) that states its clients' certificates in a header
        "proxy": pki_mod.issue_client(ca, "edge-proxy", sans=[
            x509.UniformResourceIdentifier("spiffe://cluster.local/ns/edge/sa/ingress")]),
    }
    for name, ck in made.items():
        crt, key = ck.write(d, f"client-{name}")
        clients[name] = Client(crt, key, x5t_s256(ck.cert_der))
    stranger = pki_mod.issue_client(pki_mod.make_ca("other CA"), "stranger")
    crt, key = stranger.write(d, "client-stranger")
    clients["stranger"] = Client(crt, key, x5t_s256(stranger.cert_der))
    return Pki(d, ca_file, server_cert, server_key, clients)


def big_certificate_chain(count: int = 4, sans: int = 80) -> list[x509.Certificate]:
    """Self-signed 4096-bit RSA certificates with many SANs: a worst case for header sizes."""
    now = dt.datetime.now(dt.UTC)
    chain = []
    for i in range(count):
        key = rsa.generate_private_key(public_exponent=65537, key_size=4096)
        name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, f"chain-{i}")])
        chain.append(
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(f"service-{n}.example.com") for n in range(sans)]), False)
            .sign(key, hashes.SHA256()))
    return chain


# --- servers on loopback ----------------------------------------------------------------------

class LoopbackServer:
    """An aiohttp app on 127.0.0.1 (port chosen by the kernel), stopped with :meth:`stop`."""

    runner: web.AppRunner | None = None

    async def serve(self, app: web.Application, ssl_context: ssl.SSLContext | None = None) -> str:
        """Start ``app``; the base URL (https when ``ssl_context`` is given)."""
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
        scheme = "https" if ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


async def write_in_pieces(request: web.Request, body: bytes, *, content_type: str,
                          status: int = 200, pieces: int = 3) -> web.StreamResponse:
    """Answer with ``body`` in ``pieces`` separate writes (chunked), pausing between them, so
    that the reader sees it arrive piece by piece, as from a slow network."""
    response = web.StreamResponse(status=status, headers={"Content-Type": content_type})
    await response.prepare(request)
    for i in range(pieces):
        await response.write(body[i * len(body) // pieces:(i + 1) * len(body) // pieces])
        await asyncio.sleep(0.05)
    await response.write_eof()
    return response


def count_certificate_reads(monkeypatch: pytest.MonkeyPatch, module: str) -> list[bytes]:
    """Record the DER of every certificate ``module`` (``mtls_gateway.tls`` or ``.tls_any``)
    hands to ``describe_certificate``; the real function still runs."""
    from mtls_gateway import tls

    calls: list[bytes] = []
    real = tls.describe_certificate

    def counting(der: bytes) -> tls.PeerCertificate:
        calls.append(der)
        return real(der)

    monkeypatch.setattr(f"{module}.describe_certificate", counting)
    return calls


# --- token issuer -----------------------------------------------------------------------------

@dataclass
class SigningKey:
    kid: str
    alg: str
    private: Any

    def public_jwk(self) -> dict[str, Any]:
        algo = RSAAlgorithm if self.alg.startswith(("RS", "PS")) else ECAlgorithm
        jwk = json.loads(algo.to_jwk(self.private.public_key()))
        jwk.update(kid=self.kid, use="sig", alg=self.alg)
        return jwk


@pytest.fixture(scope="session")
def rsa_keys() -> list[rsa.RSAPrivateKey]:
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3)]


class Issuer(LoopbackServer):
    """Mints tokens and serves its JWKS over HTTPS; can fail, stop and rotate."""

    def __init__(self, pki: Pki, rsa_keys: list[rsa.RSAPrivateKey]) -> None:
        self.pki = pki
        self._spare = list(rsa_keys[1:])
        self.keys = [SigningKey("rsa-1", "RS256", rsa_keys[0]),
                     SigningKey("ec-1", "ES256", ec.generate_private_key(ec.SECP256R1()))]
        self.fetches = 0
        self.fail_with: int | None = None
        self.delay = 0.0
        self.url = ""

    @property
    def jwks_uri(self) -> str:
        return f"{self.url}/jwks.json"

    def key(self, kid: str) -> SigningKey:
        return next(k for k in self.keys if k.kid == kid)

    def rotate(self) -> SigningKey:
        """Publish a new RSA key and drop the old one."""
        new = SigningKey(f"rsa-{uuid.uuid4().hex[:6]}", "RS256", self._spare.pop(0))
        self.keys = [new] + [k for k in self.keys if not k.kid.startswith("rsa")]
        return new

    def claims(self, thumbprint: str | None, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "client_id": "client-a",
            "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex, "scope": "accounts:read",
        }
        if thumbprint is not None:
            claims["cnf"] = {"x5t#S256": thumbprint}
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def mint(self, thumbprint: str | None = None, *, kid: str = "rsa-1",
             headers: dict[str, Any] | None = None, **claims: Any) -> str:
        key = self.key(kid)
        hdr = {"kid": kid, "typ": "at+jwt", **(headers or {})}
        return jwt.encode(self.claims(thumbprint, **claims), key.private, algorithm=key.alg,
                          headers={k: v for k, v in hdr.items() if v is not None})

    async def start(self) -> None:
        app = web.Application()

        async def jwks(_: web.Request) -> web.Response:
            self.fetches += 1
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.fail_with:
                return web.Response(status=self.fail_with, text="down")
            return web.json_response({"keys": [k.public_jwk() for k in self.keys]})

        app.router.add_get("/jwks.json", jwks)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.pki.server_cert, self.pki.server_key)
        self.url = await self.serve(app, ctx)


@pytest.fixture
async def issuer(pki: Pki, rsa_keys: list[rsa.RSAPrivateKey]) -> AsyncIterator[Issuer]:
    iss = Issuer(pki, rsa_keys)
    await iss.start()
    yield iss
    await iss.stop()


# --- upstream ---------------------------------------------------------------------------------

@dataclass
class Seen:
    method: str
    path_qs: str
    headers: dict[str, list[str]]
    body_len: int
    body_sha256: str


class Upstream(LoopbackServer):
    """A plain-HTTP upstream on loopback that records every request it receives."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(65536):
            digest.update(chunk)
            size += len(chunk)
        headers: dict[str, list[str]] = {}
        for k, v in request.headers.items():
            headers.setdefault(k.lower(), []).append(v)
        self.seen.append(Seen(request.method, request.path_qs, headers, size, digest.hexdigest()))
        if request.path.startswith("/slow"):
            await asyncio.sleep(float(request.query.get("s", "5")))
        if request.path.startswith("/big"):
            n = int(request.query.get("n", "0"))
            resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream",
                                               "Connection": "close, X-Secret-Hop",
                                               "X-Secret-Hop": "1", "Keep-Alive": "5"})
            await resp.prepare(request)
            block = b"x" * 65536
            while n > 0:
                await resp.write(block[: min(n, len(block))])
                n -= len(block)
            await resp.write_eof()
            return resp
        return web.json_response({"ok": True, "body_len": size,
                                  "body_sha256": digest.hexdigest()},
                                 headers={"X-Upstream": "yes"})

    async def start(self) -> None:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{p:.*}", self.handle)
        self.url = await self.serve(app)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    await up.start()
    yield up
    await up.stop()


# --- the gateway ------------------------------------------------------------------------------

@dataclass
class Reply:
    status: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class RunningGateway:
    server: GatewayServer
    pki: Pki
    config_path: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.port}"

    async def request(self, path: str, *, cert: str | None = "a", token: str | None = None,
                      method: str = "GET", headers: Any = None, data: Any = None) -> Reply:
        """One request over a new mutual-TLS connection presenting client ``cert``."""
        hdrs: list[tuple[str, str]] = list(headers.items() if isinstance(headers, dict)
                                           else headers or [])
        if token is not None:
            hdrs.append(("Authorization", f"Bearer {token}"))
        connector = aiohttp.TCPConnector(ssl=self.pki.client_context(cert), force_close=True)
        async with aiohttp.ClientSession(connector=connector,
                                         timeout=aiohttp.ClientTimeout(total=30)) as s, \
                s.request(method, self.url + path, headers=hdrs, data=data) as resp:
            return Reply(resp.status, resp.headers, await resp.read())


    async def raw(self, request_line: str, *, cert: str | None = "a",
                  headers: tuple[str, ...] = ()) -> int:
        """Send a request line verbatim (no client-side normalisation); return the status."""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.server.port, ssl=self.pki.client_context(cert),
            server_hostname="localhost")
        try:
            lines = [request_line, "Host: localhost", "Connection: close", *headers, "", ""]
            writer.write("\r\n".join(lines).encode())
            status_line = await reader.readline()
            return int(status_line.split()[1])
        finally:
            writer.close()


def base_config(pki: Pki, issuer: Issuer | None, upstream: Upstream) -> dict[str, Any]:
    providers: dict[str, Any] = {}
    if issuer is not None:
        providers["corp"] = {
            "type": "jwt", "issuer": ISSUER, "audiences": [AUDIENCE],
            "algorithms": ["RS256", "ES256"], "jwks_uri": issuer.jwks_uri,
            "jwks_ca_file": str(pki.ca_file), "jwks_refetch_cooldown": "30s",
        }
    return {
        "listen": {"host": "127.0.0.1", "port": 0, "cert_file": str(pki.server_cert),
                   "key_file": str(pki.server_key), "client_ca_file": str(pki.ca_file),
                   "client_cert": "optional"},
        "admin": {"enabled": False},
        "providers": providers,
        "upstream": {"url": upstream.url, "connect_timeout": "2s", "read_timeout": "5s"},
        "routes": [
            {"name": "public", "path_prefix": "/public", "auth": "none"},
            {"name": "api", "path_prefix": "/", "auth": {"provider": "corp"}},
        ],
    }


GatewayFactory = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
def fast_lane() -> bool | None:
    """The gateways' ``fast_lane`` setting unless a config names it; None: the default.
    A test module overrides this fixture, parametrised, to run every one of its gateways
    with the lane on and off (tests/test_gateway.py): the two paths must not diverge."""
    return None


@pytest.fixture
async def make_gateway(pki: Pki, tmp_path: Path,
                       fast_lane: bool | None) -> AsyncIterator[GatewayFactory]:
    """``await make_gateway(config_dict)`` starts a gateway; all are stopped afterwards."""
    started: list[GatewayServer] = []

    async def make(config: dict[str, Any]) -> RunningGateway:
        if fast_lane is not None:
            config.setdefault("fast_lane", fast_lane)
        path = tmp_path / f"gateway-{len(started)}.yaml"
        path.write_text(yaml.safe_dump(config))
        server = GatewayServer(load_config(path))
        await server.start()
        started.append(server)
        return RunningGateway(server, pki, path)

    yield make
    for server in started:
        await server.stop()


@pytest.fixture
async def gateway(make_gateway: GatewayFactory, pki: Pki, issuer: Issuer,
                  upstream: Upstream) -> RunningGateway:
    """The standard set-up: provider ``corp``, binding required on everything but /public."""
    return await make_gateway(base_config(pki, issuer, upstream))


# --- raw sockets: bytes exactly as written, no client or server library in between ----------

_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


def statuses(raw: bytes) -> list[int]:
    """Status codes of the responses in a raw byte stream, in order."""
    return [int(m.group(1)) for m in _STATUS.finditer(raw)]


async def raw_exchange(gw: RunningGateway, data: bytes, *,
                       cert: str | None = "a") -> bytes:
    """Write ``data`` verbatim over a new mutual-TLS connection; everything read until EOF."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.server.port, ssl=gw.pki.client_context(cert),
        server_hostname="localhost")
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 30)   # a hang is a failure, not a wait
    except (ConnectionError, ssl.SSLError):
        return b""
    finally:
        writer.close()


class RawServer:
    """A raw asyncio server (no HTTP library) on 127.0.0.1 for upstream tests: subclasses
    write ``serve`` (one client connection); starting, stopping and resetting live here."""

    def __init__(self) -> None:
        self.url = ""
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self.serve(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            return              # the gateway went away: nothing to answer
        finally:
            self._writers.discard(writer)
            writer.close()

    @staticmethod
    def reset(writer: asyncio.StreamWriter) -> None:
        """Close with a TCP RST instead of a FIN."""
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()


class RawUpstream(RawServer):
    """An upstream on a plain socket that records raw requests and can misbehave.

    ``mode``: ``ok`` (200 with a small body), ``refuse_after_head`` (close without
    answering), ``reset_mid_response`` (promise 1 MiB, send 1 KiB, reset),
    ``malformed_head`` (garbage status line), ``hang`` (never answer).
    """

    def __init__(self, mode: str = "ok") -> None:
        super().__init__()
        self.mode = mode
        self.requests: list[bytes] = []    # each complete request head + body, raw
        self.connections = 0
        self._release = asyncio.Event()

    async def _read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        head = await reader.readuntil(b"\r\n\r\n")
        lower = head.lower()
        body = b""
        if b"transfer-encoding: chunked" in lower:
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                chunk = await reader.readexactly(size + 2)
                body += size_line + chunk
                if size == 0:
                    break
        elif (m := re.search(rb"content-length: *(\d+)", lower)) is not None:
            body = await reader.readexactly(int(m.group(1)))
        return head + body

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        while True:
            try:
                request = await self._read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError, ValueError):
                return
            if request is None:
                return
            self.requests.append(request)
            if self.mode == "refuse_after_head":
                return
            if self.mode == "hang":
                await self._release.wait()
                return
            if self.mode == "malformed_head":
                writer.write(b"HTTP/1.1 2OO NOT OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
                return
            if self.mode == "reset_mid_response":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n"
                             + b"x" * 1024)
                await writer.drain()
                self.reset(writer)
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                         b"Content-Length: 2\r\n\r\nok")
            await writer.drain()

    async def stop(self) -> None:
        self._release.set()
        await super().stop()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    up = RawUpstream()
    await up.start()
    yield up
    await up.stop()


# --- a gateway in its own process ------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback port nobody listens on right now (for a process that binds it itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GatewayProcess:
    """``python -m mtls_gateway run`` on ``config``: what only a real process shows (signals,
    ``--workers``, the event loop it picks). Listener and admin ports are chosen here; the
    output is drained all along (a full pipe would stall the gateway) and kept as JSON lines.

    ``async with`` starts it and waits until ``/readyz`` says 200; leaving kills it if a test
    did not :meth:`stop` it.
    """

    def __init__(self, config: dict[str, Any], tmp_path: Path, *args: str,
                 env: dict[str, str] | None = None) -> None:
        self.config = config
        config["listen"]["port"] = free_port()
        config["admin"] = {"enabled": True, "host": "127.0.0.1", "port": free_port()}
        config.setdefault("reload_interval", "0s")
        self.path = tmp_path / "gateway.yaml"
        self.args, self.env = args, env
        scheme = "http" if config["listen"].get("tls") is False else "https"
        self.url = f"{scheme}://127.0.0.1:{config['listen']['port']}"
        self.admin_url = f"http://127.0.0.1:{config['admin']['port']}"
        self.output: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None

    @property
    def proc(self) -> asyncio.subprocess.Process:
        assert self._proc is not None, "not started"
        return self._proc

    def write_config(self) -> None:
        self.path.write_text(yaml.safe_dump(self.config))

    async def __aenter__(self) -> GatewayProcess:
        self.write_config()
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mtls_gateway", "run", "--config", str(self.path), *self.args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=REPO,
            env={**os.environ, **(self.env or {})},
            start_new_session=True)     # its own process group: workers too are cleaned up
        self._drain = asyncio.create_task(self._read_output())
        if not await self.wait_ready(200):
            raise AssertionError("gateway never became ready:\n" + "\n".join(self.output))
        return self

    async def _read_output(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.output.append(line.decode(errors="replace").rstrip("\n"))

    async def wait_ready(self, status: int, *, seconds: float = 15.0) -> bool:
        """Poll ``/readyz`` until it answers ``status`` (False if it never does in time)."""
        async with aiohttp.ClientSession() as plain:
            for _ in range(int(seconds * 10)):
                with contextlib.suppress(aiohttp.ClientError):     # not listening yet
                    async with plain.get(self.admin_url + "/readyz") as resp:
                        if resp.status == status:
                            return True
                if self.proc.returncode is not None:
                    return False
                await asyncio.sleep(0.1)
        return False

    def log(self, logger: str | None = None) -> list[dict[str, Any]]:
        """The JSON log records so far, of ``logger`` when given."""
        records = [json.loads(line) for line in self.output if line.startswith("{")]
        return [r for r in records if logger is None or r.get("logger") == logger]

    async def stop(self, *, seconds: float = 30.0, terminate: bool = True) -> int:
        """SIGTERM (unless the test sent it already), then the exit status once the process
        (and its output) has ended."""
        if terminate:
            self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), seconds)
        if self._drain is not None:
            await asyncio.wait_for(self._drain, seconds)
        return code

    async def __aexit__(self, *exc: object) -> None:
        if self._proc is not None:
            # The whole group: workers a test left behind would hold the output pipe open,
            # and asyncio's wait() waits for the pipe too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._proc.wait(), 10)
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain
