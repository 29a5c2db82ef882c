"""``mtls-gateway demo``: the whole picture on one machine, on built-in defaults.

It makes a throwaway PKI (CA, server certificate, clients ``alice`` and ``bob``),
starts a demo token issuer on loopback (an ES256 key, its JWKS, and a ``/token``
endpoint that mints a token bound to the client certificate presented to it over
mutual TLS), an echo upstream that shows what it received, and the gateway in
front of it; then prints curl commands to try. The demo issuer exists only here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import shutil
import signal
import ssl
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from . import pki
from .app import GatewayServer
from .config_load import load_config
from .decision_log import configure_logging
from .thumbprint import x5t_s256
from .tls import peer_certificate

__all__ = ["DemoIssuer", "DemoSetup", "demo_environment", "run_demo"]

AUDIENCE = "https://api.demo.local"
SCOPE = "accounts:read"
READY_LINE = "Demo ready."


class DemoIssuer:
    """A minimal token issuer: JWKS plus certificate-bound client_credentials tokens."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.kid = uuid.uuid4().hex[:16]
        self.issuer = ""  # set once the port is known

    def jwks(self) -> dict[str, Any]:
        jwk = json.loads(ECAlgorithm.to_jwk(self.key.public_key()))
        jwk.update(kid=self.kid, use="sig", alg="ES256")
        return {"keys": [jwk]}

    def mint(self, *, thumbprint: str | None, subject: str, lifetime: int = 3600,
             scope: str = SCOPE) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer, "sub": subject, "client_id": subject, "aud": AUDIENCE,
            "iat": now, "nbf": now, "exp": now + lifetime, "jti": uuid.uuid4().hex,
            "scope": scope,
        }
        if thumbprint:
            claims["cnf"] = {"x5t#S256": thumbprint}
        return jwt.encode(claims, self.key, algorithm="ES256",
                          headers={"kid": self.kid, "typ": "at+jwt"})

    def app(self) -> web.Application:
        app = web.Application()

        async def jwks(_: web.Request) -> web.Response:
            return web.json_response(self.jwks())

        async def token(request: web.Request) -> web.Response:
            peer = peer_certificate(request.transport)
            if peer is None:
                return web.json_response({"error": "invalid_client"}, status=401)
            cn = peer.subject.split("CN=", 1)[-1].split(",", 1)[0]
            return web.json_response({
                "access_token": self.mint(thumbprint=peer.thumbprint, subject=cn),
                "token_type": "Bearer", "expires_in": 3600, "scope": SCOPE})

        app.router.add_get("/jwks.json", jwks)
        app.router.add_post("/token", token)
        return app


async def _echo(request: web.Request) -> web.Response:
    """The demo upstream: answers with what reached it, so the identity headers show."""
    body = await request.read()
    return web.json_response({
        "upstream": "echo", "method": request.method, "path": request.path_qs,
        "headers": {k: v for k, v in request.headers.items() if k.lower() != "authorization"},
        "authorization_forwarded": "Authorization" in request.headers,
        "body_bytes": len(body)})


def _config_yaml(upstream: str, issuer: str, port: int) -> str:
    return f"""# Written by `mtls-gateway demo`; see the repository's gateway.yaml for every field.
listen:
  host: 127.0.0.1
  port: {port}
  cert_file: server.crt
  key_file: server.key
  client_ca_file: ca.crt
  client_cert: optional        # so that /public works without a certificate
admin:
  enabled: false
providers:
  demo:
    type: jwt
    issuer: {issuer}
    audiences: [{AUDIENCE}]
    algorithms: [ES256]
    jwks_uri: {issuer}/jwks.json
    jwks_ca_file: ca.crt
    require_typ_at_jwt: true
upstream:
  url: {upstream}
routes:
  - name: public
    path_prefix: /public
    auth: none
  - name: accounts
    path_prefix: /accounts
    auth:
      provider: demo
      binding: required
      scopes: [{SCOPE}]
  - name: admin
    path_prefix: /admin
    auth:
      provider: demo
      scopes: [admin]
"""


@dataclass
class DemoSetup:
    directory: Path
    gateway_url: str
    issuer_url: str
    commands: list[tuple[str, str]]   # (what it shows, shell command)


@contextlib.asynccontextmanager
async def demo_environment(directory: Path, port: int) -> AsyncIterator[DemoSetup]:
    """Create the PKI and start issuer, upstream and gateway; stop them all on exit."""
    ca = pki.make_ca()
    ca_path, _ = ca.write(directory, "ca")
    pki.issue_server(ca).write(directory, "server")
    alice, bob = pki.issue_client(ca, "alice"), pki.issue_client(ca, "bob")
    alice.write(directory, "alice")
    bob.write(directory, "bob")
    ca_path.with_suffix(".key").unlink()  # nobody needs the CA key after this

    issuer = DemoIssuer()
    issuer_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    issuer_ctx.load_cert_chain(directory / "server.crt", directory / "server.key")
    issuer_ctx.load_verify_locations(ca_path)
    issuer_ctx.verify_mode = ssl.CERT_OPTIONAL
    runners: list[web.AppRunner] = []
    server: GatewayServer | None = None
    try:
        issuer_runner = web.AppRunner(issuer.app(), access_log=None)
        await issuer_runner.setup()
        runners.append(issuer_runner)
        await web.TCPSite(issuer_runner, "127.0.0.1", 0, ssl_context=issuer_ctx).start()
        issuer.issuer = f"https://localhost:{issuer_runner.addresses[0][1]}"

        echo = web.Application()
        echo.router.add_route("*", "/{path:.*}", _echo)
        echo_runner = web.AppRunner(echo, access_log=None)
        await echo_runner.setup()
        runners.append(echo_runner)
        await web.TCPSite(echo_runner, "127.0.0.1", 0).start()
        upstream = f"http://127.0.0.1:{echo_runner.addresses[0][1]}"

        token = issuer.mint(thumbprint=x5t_s256(alice.cert_der), subject="alice")
        (directory / "alice.token").write_text(token + "\n")
        config_path = directory / "gateway.yaml"
        config_path.write_text(_config_yaml(upstream, issuer.issuer, port))
        server = GatewayServer(load_config(config_path))
        await server.start()
        yield DemoSetup(directory, f"https://localhost:{server.port}", issuer.issuer,
                        _commands(directory, f"https://localhost:{server.port}", issuer.issuer))
    finally:
        if server is not None:
            await server.stop()
        for runner in reversed(runners):
            await runner.cleanup()


def _commands(d: Path, gateway: str, issuer: str) -> list[tuple[str, str]]:
    q = shlex.quote
    tls = f"--cacert {q(str(d / 'ca.crt'))}"
    alice = f"--cert {q(str(d / 'alice.crt'))} --key {q(str(d / 'alice.key'))}"
    bob = f"--cert {q(str(d / 'bob.crt'))} --key {q(str(d / 'bob.key'))}"
    auth = f'-H "Authorization: Bearer $(cat {q(str(d / "alice.token"))})"'
    return [
        ("200: alice's token with alice's certificate",
         f"curl -s {tls} {alice} {auth} {gateway}/accounts/42"),
        ("401 invalid_token: alice's token with bob's certificate (same CA)",
         f"curl -s -i {tls} {bob} {auth} {gateway}/accounts/42"),
        ("401: no token at all",
         f"curl -s -i {tls} {alice} {gateway}/accounts/42"),
        ("403 insufficient_scope: the token lacks the admin scope",
         f"curl -s -i {tls} {alice} {auth} {gateway}/admin"),
        ("200: a public route, no certificate and no token",
         f"curl -s {tls} {gateway}/public/status"),
        ("a new token for bob, bound to bob's certificate by the demo issuer",
         f"curl -s {tls} {bob} -X POST {issuer}/token"),
    ]


def _print_banner(setup: DemoSetup) -> None:
    print(f"""
mtls-gateway demo
  gateway (mutual TLS):  {setup.gateway_url}
  demo token issuer:     {setup.issuer_url}  (JWKS at /jwks.json, POST /token over mTLS)
  files:                 {setup.directory}  (CA, certificates, alice.token, gateway.yaml)

Try these (copy and paste):
""")
    for what, command in setup.commands:
        print(f"# {what}\n{command}\n")
    print(f"{READY_LINE} Press Ctrl-C to stop.", flush=True)


async def _run(directory: Path, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with demo_environment(directory, port) as setup:
        _print_banner(setup)
        await stop.wait()
    print("demo stopped", flush=True)


def run_demo(*, directory: Path | None, port: int) -> int:
    """Entry point of ``mtls-gateway demo``; removes a temporary folder on exit."""
    configure_logging("INFO")
    temporary = directory is None
    target = Path(tempfile.mkdtemp(prefix="mtls-gateway-demo-")) if directory is None \
        else directory.resolve()
    target.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(_run(target, port))
    except OSError as exc:
        print(f"mtls-gateway demo: {exc} (is port {port} in use? try --port)", file=sys.stderr)
        return 1
    finally:
        if temporary:
            shutil.rmtree(target, ignore_errors=True)
    return 0
