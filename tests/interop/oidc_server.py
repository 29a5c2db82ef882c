"""Harness for the interop authorization server (node-oidc-provider, see ``server.mjs``).

It makes the X.509 material with the project's own ``mtls_gateway.pki``, writes the JSON
configuration ``server.mjs`` reads, runs ``node server.mjs`` on 127.0.0.1 and talks to it over
real mutual TLS with ``aiohttp``: client_credentials token requests, introspection and
revocation, and key rotation. Nothing is mocked.

Plain module (``tests/`` is not a package): the conftest beside it puts this folder on
``sys.path``, so tests say ``from oidc_server import ...``.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import hashlib
import json
import queue
import secrets
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self
from urllib.parse import quote

import aiohttp
import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from mtls_gateway.pki import CertKey, issue_client, issue_server, make_ca, self_signed_client
from mtls_gateway.thumbprint import x5t_s256

__all__ = [
    "DEFAULT_RESOURCES",
    "GATEWAY_CLIENT_ID",
    "INTEROP_DIR",
    "RESERVED_SECRET_CHARACTERS",
    "RESOURCE_JWT_ES256",
    "RESOURCE_JWT_RS256",
    "RESOURCE_OPAQUE",
    "RESOURCE_OTHER_JWT",
    "RESOURCE_OTHER_OPAQUE",
    "SCOPE",
    "SERVER_SCRIPT",
    "ClientIdentity",
    "InteropPKI",
    "NodeNotFoundError",
    "OidcProvider",
    "OidcProviderError",
    "ReadyInfo",
    "TokenRequestError",
    "TokenResponse",
    "client_identity",
    "client_metadata",
    "client_ssl_context",
    "ensure_node_modules",
    "fetch_discovery",
    "fetch_jwks",
    "fetch_token",
    "introspect",
    "make_interop_pki",
    "revoke",
    "rotate_keys",
    "verify_jwt",
]

INTEROP_DIR = Path(__file__).resolve().parent
SERVER_SCRIPT = INTEROP_DIR / "server.mjs"

RESOURCE_JWT_RS256 = "https://api.example.test/jwt-rs256"
RESOURCE_JWT_ES256 = "https://api.example.test/jwt-es256"
RESOURCE_OPAQUE = "https://api.example.test/opaque"
# Another API at the same AS: its tokens are valid, just not for the three above.
RESOURCE_OTHER_JWT = "https://other-api.example.test/jwt-rs256"
RESOURCE_OTHER_OPAQUE = "https://other-api.example.test/opaque"
SCOPE = "accounts:read"
GATEWAY_CLIENT_ID = "mtls-gateway"
#: Characters reserved in URLs and forms (and a space), for gateway client secrets that
#: client_secret_basic must form-urlencode (RFC 6749 section 2.3.1).
RESERVED_SECRET_CHARACTERS = ":/+=%& ?#"

#: resource URI -> how the AS issues tokens for it (the ``resources`` key of the JSON config).
DEFAULT_RESOURCES: dict[str, dict[str, Any]] = {
    RESOURCE_JWT_RS256: {"format": "jwt", "alg": "RS256", "scope": "accounts:read accounts:write"},
    RESOURCE_JWT_ES256: {"format": "jwt", "alg": "ES256", "scope": "accounts:read accounts:write"},
    RESOURCE_OPAQUE: {"format": "opaque", "scope": "accounts:read accounts:write"},
    RESOURCE_OTHER_JWT: {"format": "jwt", "alg": "RS256", "scope": "accounts:read"},
    RESOURCE_OTHER_OPAQUE: {"format": "opaque", "scope": "accounts:read"},
}


class NodeNotFoundError(RuntimeError):
    """``node`` or ``npm`` is not on PATH."""


class OidcProviderError(RuntimeError):
    """The authorization server could not be installed or started."""


# ---- PKI ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientIdentity:
    """A registered OAuth client and the TLS client certificate it authenticates with."""

    client_id: str
    cert: Path  # PEM certificate
    key: Path  # PEM private key
    cert_der: bytes
    thumbprint: str  # x5t#S256 of the certificate
    subject_dn: str  # RFC 4514, as registered in tls_client_auth_subject_dn
    self_signed: bool = False


@dataclass(frozen=True)
class InteropPKI:
    """CA, server certificate and the client identities the AS knows about."""

    directory: Path
    ca: CertKey  # issue more certificates with mtls_gateway.pki.issue_*(pki.ca, ...)
    ca_file: Path
    server_cert: Path  # for 127.0.0.1, localhost and ::1; also usable by the gateway
    server_key: Path
    client_a: ClientIdentity  # tls_client_auth, bound tokens
    client_b: ClientIdentity  # tls_client_auth, bound tokens, another subject
    self_signed: ClientIdentity  # self_signed_tls_client_auth, bound tokens
    unbound: ClientIdentity  # tls_client_auth, tls_client_certificate_bound_access_tokens false

    @property
    def clients(self) -> tuple[ClientIdentity, ...]:
        return (self.client_a, self.client_b, self.self_signed, self.unbound)


def client_identity(client_id: str, pair: CertKey, directory: Path, *,
                    self_signed: bool = False) -> ClientIdentity:
    """Write ``pair`` as ``<client_id>.crt/.key`` and describe it (thumbprint, RFC 4514 DN)."""
    cert, key = pair.write(directory, client_id)
    return ClientIdentity(
        client_id=client_id,
        cert=cert,
        key=key,
        cert_der=pair.cert_der,
        thumbprint=x5t_s256(pair.cert_der),
        subject_dn=pair.cert.subject.rfc4514_string(),
        self_signed=self_signed,
    )


def make_interop_pki(directory: Path) -> InteropPKI:
    """Write a fresh CA, server certificate and four client identities under ``directory``."""
    ca = make_ca("mtls-gateway interop CA")
    ca_file, _ = ca.write(directory, "ca")
    server_cert, server_key = issue_server(ca).write(directory, "server")
    return InteropPKI(
        directory=directory,
        ca=ca,
        ca_file=ca_file,
        server_cert=server_cert,
        server_key=server_key,
        client_a=client_identity("client-a", issue_client(ca, "client-a"), directory),
        client_b=client_identity("client-b", issue_client(ca, "client-b"), directory),
        self_signed=client_identity("client-self-signed", self_signed_client("client-self-signed"),
                              directory, self_signed=True),
        unbound=client_identity("client-unbound", issue_client(ca, "client-unbound"), directory),
    )


@functools.lru_cache(maxsize=64)
def client_ssl_context(ca_file: Path, client: ClientIdentity | None = None) -> ssl.SSLContext:
    """TLS client context trusting ``ca_file``, presenting ``client``'s certificate if given."""
    context = ssl.create_default_context(cafile=str(ca_file))
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    return context


# ---- node_modules ------------------------------------------------------------------------


def ensure_node_modules(directory: Path = INTEROP_DIR, *, timeout: float = 600.0) -> None:
    """Run ``npm ci`` in ``directory`` unless node_modules already matches package-lock.json.

    A stamp file inside node_modules records the SHA-256 of the lockfile ``npm ci`` installed;
    a missing or different stamp means missing or stale. An flock serialises concurrent runs.
    """
    lockfile = directory / "package-lock.json"
    stamp = directory / "node_modules" / ".mtls-gateway-lock.sha256"
    digest = hashlib.sha256(lockfile.read_bytes()).hexdigest()

    def fresh() -> bool:
        return stamp.is_file() and stamp.read_text().strip() == digest

    if fresh():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise NodeNotFoundError("npm not found on PATH; it is needed to install oidc-provider")
    lock_name = hashlib.sha256(str(directory).encode()).hexdigest()[:16]
    lock_path = Path(tempfile.gettempdir()) / f"mtls-gateway-npm-{lock_name}.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if fresh():  # another process installed it while we waited
            return
        result = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=directory, capture_output=True, text=True, timeout=timeout, check=False,
        )
        if result.returncode != 0:
            raise OidcProviderError(
                f"npm ci failed in {directory} (exit {result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )
        stamp.write_text(digest + "\n")


# ---- the server process ------------------------------------------------------------------


def client_metadata(client: ClientIdentity, *, bound: bool) -> dict[str, Any]:
    """oidc-provider registration of ``client`` (for ``OidcProvider(extra_clients=...)``)."""
    common: dict[str, Any] = {
        "client_id": client.client_id,
        "grant_types": ["client_credentials"],
        "response_types": [],
        "redirect_uris": [],
        "tls_client_certificate_bound_access_tokens": bound,
    }
    if client.self_signed:
        # RFC 8705 section 2.2: the certificate is registered as x5c of a JWK in jwks.
        public_key = x509.load_der_x509_certificate(client.cert_der).public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)  # mtls_gateway.pki uses P-256
        jwk = ECAlgorithm.to_jwk(public_key, as_dict=True)
        jwk["x5c"] = [base64.b64encode(client.cert_der).decode("ascii")]
        return {**common, "token_endpoint_auth_method": "self_signed_tls_client_auth",
                "jwks": {"keys": [jwk]}}
    return {**common, "token_endpoint_auth_method": "tls_client_auth",
            "tls_client_auth_subject_dn": client.subject_dn}


@dataclass(frozen=True)
class ReadyInfo:
    """What ``server.mjs`` announced on its READY line."""

    port: int
    issuer: str
    token_endpoint: str
    introspection_endpoint: str
    revocation_endpoint: str
    jwks_uri: str
    rotate_url: str
    kids: dict[str, str]  # alg -> kid of the signing keys at start
    # client_cert_header_listener: plain-HTTP URL where Client-Cert (RFC 9440) is trusted
    header_listener_url: str | None = None


class OidcProvider:
    """Runs ``node server.mjs`` for the lifetime of a ``with`` block (or start()/stop())."""

    def __init__(
        self,
        pki: InteropPKI,
        workdir: Path,
        *,
        resources: Mapping[str, Mapping[str, Any]] | None = None,
        default_resource: str = RESOURCE_OPAQUE,
        gateway_client_id: str = GATEWAY_CLIENT_ID,
        gateway_client_secret: str | None = None,
        extra_clients: Sequence[Mapping[str, Any]] = (),
        port: int = 0,
        startup_timeout: float = 30.0,
        client_cert_header_listener: bool = False,
    ) -> None:
        self.pki = pki
        self.workdir = workdir
        self.resources = dict(resources if resources is not None else DEFAULT_RESOURCES)
        self.default_resource = default_resource
        self.gateway_client_id = gateway_client_id
        self.gateway_client_secret = gateway_client_secret or secrets.token_urlsafe(32)
        self.extra_clients = list(extra_clients)
        self.port_requested = port
        self.startup_timeout = startup_timeout
        self.client_cert_header_listener = client_cert_header_listener
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._info: ReadyInfo | None = None

    # -- configuration

    def config(self) -> dict[str, Any]:
        """The JSON document ``server.mjs`` reads."""
        pki = self.pki
        clients = [
            client_metadata(pki.client_a, bound=True),
            client_metadata(pki.client_b, bound=True),
            client_metadata(pki.self_signed, bound=True),
            client_metadata(pki.unbound, bound=False),
            {
                "client_id": self.gateway_client_id,
                "client_secret": self.gateway_client_secret,
                "token_endpoint_auth_method": "client_secret_basic",
                "grant_types": ["client_credentials"],
                "response_types": [],
                "redirect_uris": [],
            },
            *self.extra_clients,
        ]
        return {
            "port": self.port_requested,
            "server_cert": str(pki.server_cert),
            "server_key": str(pki.server_key),
            "ca_bundle": str(pki.ca_file),
            "issuer": None,
            "clients": clients,
            "introspection_client_id": self.gateway_client_id,
            "resources": self.resources,
            "default_resource": self.default_resource,
            "exit_on_stdin_close": True,
            "client_cert_header_listener": self.client_cert_header_listener,
        }

    # -- lifecycle

    @property
    def info(self) -> ReadyInfo:
        if self._info is None:
            raise OidcProviderError("the authorization server is not running")
        return self._info

    @property
    def issuer(self) -> str:
        return self.info.issuer

    @property
    def stderr_path(self) -> Path:
        return self.workdir / "oidc-server.stderr.log"

    def stderr_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.stderr_path.read_text(errors="replace")
        return ""

    def start(self) -> Self:
        node = shutil.which("node")
        if node is None:
            raise NodeNotFoundError("node not found on PATH")
        ensure_node_modules()
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "oidc-config.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        config_path.chmod(0o600)  # holds the gateway client secret
        self._stderr = self.stderr_path.open("wb")
        self._proc = subprocess.Popen(
            [node, str(SERVER_SCRIPT), str(config_path)],
            cwd=INTEROP_DIR,
            stdin=subprocess.PIPE,  # server.mjs exits when it closes (exit_on_stdin_close)
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        try:
            self._info = self._wait_ready(self._proc)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> ReadyInfo:
        lines: queue.Queue[str | None] = queue.Queue()

        def pump(stream: IO[bytes]) -> None:
            # Drains stdout for the whole life of the process, so that it never blocks on a
            # full pipe; None marks EOF.
            for raw in stream:
                lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
            lines.put(None)

        assert proc.stdout is not None
        threading.Thread(target=pump, args=(proc.stdout,), daemon=True,
                         name="oidc-server-stdout").start()
        deadline = time.monotonic() + self.startup_timeout
        seen: list[str] = []
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = lines.get(timeout=max(remaining, 0.01))
            except queue.Empty:
                raise OidcProviderError(
                    f"server.mjs printed no READY line within {self.startup_timeout}s; "
                    f"stdout: {seen!r}\nstderr:\n{self.stderr_text()}"
                ) from None
            if line is None:
                rc = proc.wait(timeout=5)
                raise OidcProviderError(
                    f"server.mjs exited with code {rc} before READY; stdout: {seen!r}\n"
                    f"stderr:\n{self.stderr_text()}"
                )
            if line.startswith("READY "):
                data = json.loads(line.removeprefix("READY "))
                return ReadyInfo(**{k: data[k] for k in ReadyInfo.__dataclass_fields__
                                    if k in data})
            seen.append(line)

    def stop(self) -> None:
        proc, self._proc, self._info = self._proc, None, None
        if proc is not None:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            if proc.stdout is not None:
                proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- TLS contexts for talking to it

    def ssl_context(self, client: ClientIdentity | None = None) -> ssl.SSLContext:
        """Trusts the interop CA; presents ``client``'s certificate when given."""
        return client_ssl_context(self.pki.ca_file, client)

    def gateway_auth_headers(self) -> dict[str, str]:
        """HTTP Basic client authentication of the gateway client (RFC 6749 section 2.3.1)."""
        # RFC 6749 form-urlencodes id and secret before Basic encoding; oidc-provider decodes.
        login, password = (quote(v, safe="") for v in
                           (self.gateway_client_id, self.gateway_client_secret))
        return {"Authorization": aiohttp.encode_basic_auth(login, password)}


# ---- async helpers -----------------------------------------------------------------------


@dataclass(frozen=True)
class TokenResponse:
    access_token: str
    token_type: str
    expires_in: int
    scope: str | None
    raw: dict[str, Any] = field(repr=False)


class TokenRequestError(Exception):
    """The token endpoint answered with an error (``status`` and the JSON ``body``)."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"token request failed with HTTP {status}: {body}")
        self.status = status
        self.body = body

    @property
    def error(self) -> str | None:
        return self.body.get("error")


@contextlib.asynccontextmanager
async def _session(provider: OidcProvider, client: ClientIdentity | None,
                   ) -> AsyncIterator[aiohttp.ClientSession]:
    # One short-lived session per call: the client certificate is per connection, so a shared
    # connection pool would blur which identity a request was made with.
    connector = aiohttp.TCPConnector(ssl=provider.ssl_context(client))
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        yield session


async def _json(response: aiohttp.ClientResponse) -> dict[str, Any]:
    text = await response.text()
    try:
        body = json.loads(text) if text else {}
    except ValueError:
        body = {"error": "non_json_response", "text": text}
    if not isinstance(body, dict):
        body = {"value": body}
    return body


async def fetch_token(
    provider: OidcProvider,
    client: ClientIdentity | None,
    *,
    resource: str | None,
    scope: str | None = SCOPE,
    client_id: str | None = None,
) -> TokenResponse:
    """client_credentials grant over mutual TLS, presenting ``client``'s certificate.

    ``resource`` None leaves it out (the AS then uses its default resource). ``client_id``
    overrides the client's id (to present one client's certificate under another's id);
    ``client`` None sends no certificate at all. Raises TokenRequestError on an error answer.
    """
    form = {"grant_type": "client_credentials"}
    cid = client_id if client_id is not None else (client.client_id if client else None)
    if cid is None:
        raise ValueError("client_id is needed when no client identity is given")
    form["client_id"] = cid
    if scope is not None:
        form["scope"] = scope
    if resource is not None:
        form["resource"] = resource
    async with _session(provider, client) as session, session.post(
        provider.info.token_endpoint, data=form
    ) as response:
        body = await _json(response)
        if response.status != 200:
            raise TokenRequestError(response.status, body)
    return TokenResponse(
        access_token=body["access_token"],
        token_type=body["token_type"],
        expires_in=int(body["expires_in"]),
        scope=body.get("scope"),
        raw=body,
    )


def _auth(provider: OidcProvider, client: ClientIdentity | None, form: dict[str, str],
          ) -> dict[str, str]:
    # No client identity: the gateway client with its secret (HTTP Basic). Otherwise the
    # client authenticates with its certificate and names itself in the form.
    if client is None:
        return provider.gateway_auth_headers()
    form["client_id"] = client.client_id
    return {}


async def introspect(
    provider: OidcProvider,
    token: str,
    *,
    client: ClientIdentity | None = None,
    token_type_hint: str | None = None,
) -> dict[str, Any]:
    """RFC 7662 introspection, as the gateway (default) or as ``client`` over mTLS.

    Only opaque tokens: oidc-provider refuses to introspect JWTs (HTTP 400
    unsupported_token_type), which this returns as the error body.
    """
    form = {"token": token}
    if token_type_hint:
        form["token_type_hint"] = token_type_hint
    headers = _auth(provider, client, form)
    async with _session(provider, client) as session, session.post(
        provider.info.introspection_endpoint, data=form, headers=headers
    ) as response:
        body = await _json(response)
        if response.status != 200:
            body.setdefault("http_status", response.status)
        return body


async def revoke(provider: OidcProvider, token: str, *,
                 client: ClientIdentity | None = None) -> int:
    """RFC 7009 revocation as the gateway (default) or as ``client``; returns the HTTP status.

    200 also when the policy refuses (RFC 7009 says not to tell); JWTs cannot be revoked (400).
    """
    form = {"token": token}
    headers = _auth(provider, client, form)
    async with _session(provider, client) as session, session.post(
        provider.info.revocation_endpoint, data=form, headers=headers
    ) as response:
        await response.read()
        return int(response.status)


async def fetch_jwks(provider: OidcProvider) -> dict[str, Any]:
    async with _session(provider, None) as session, session.get(provider.info.jwks_uri) as r:
        r.raise_for_status()
        return await _json(r)


async def fetch_discovery(provider: OidcProvider) -> dict[str, Any]:
    url = provider.issuer + "/.well-known/openid-configuration"
    async with _session(provider, None) as session, session.get(url) as r:
        r.raise_for_status()
        return await _json(r)


async def rotate_keys(provider: OidcProvider, *, retain_previous: bool = False,
                      ) -> dict[str, Any]:
    """Replace the AS signing keys (new kids); new tokens are signed with the new keys.

    ``retain_previous`` keeps the old public keys in the JWKS (graceful rollover); otherwise
    they vanish and JWTs signed before the rotation no longer verify against the JWKS.
    Returns ``{"kids": {alg: kid}, "jwks_kids": [...]}``.
    """
    url = provider.info.rotate_url + ("?retain=1" if retain_previous else "")
    async with _session(provider, None) as session, session.post(url) as r:
        r.raise_for_status()
        return await _json(r)


def verify_jwt(token: str, jwks: Mapping[str, Any], *, audience: str, issuer: str,
               ) -> dict[str, Any]:
    """Verify a JWT access token with the key its ``kid`` names in ``jwks``; return claims."""
    kid = jwt.get_unverified_header(token).get("kid")
    matches = [k for k in jwks["keys"] if k.get("kid") == kid]
    if not matches:
        raise jwt.InvalidTokenError(f"kid {kid!r} is not in the JWKS")
    key = jwt.PyJWK(matches[0])
    claims: dict[str, Any] = jwt.decode(token, key, algorithms=[key.algorithm_name],
                                        audience=audience, issuer=issuer)
    return claims

