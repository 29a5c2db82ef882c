"""A real RFC 7662 introspection endpoint on loopback (HTTPS, counts its calls, answers as a
test tells it), the config that points a gateway at it, and its fixture (``auth_server``,
re-exported by conftest.py): shared by every test module that needs an authorization server
to ask."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from aiohttp import web

from gwtest import Issuer, LoopbackServer, Pki, Upstream, base_config, write_in_pieces
from mtls_gateway.tls import peer_certificate

__all__ = ["CLIENT_ID", "SECRET", "AuthServer", "auth_server", "introspection_config"]

CLIENT_ID = "mtls-gateway"
SECRET = "s3cr3t-Value/with+chars"


class AuthServer(LoopbackServer):
    """Behaves like an authorization server's introspection endpoint."""

    def __init__(self, pki: Pki) -> None:
        self.pki = pki
        self.tokens: dict[str, dict[str, Any]] = {}
        self.calls = 0
        self.auth_seen: list[tuple[str, str]] = []   # (method, client_id)
        self.body: bytes | None = None               # canned body instead of the real answer
        self.status = 200
        self.hold: asyncio.Event | None = None
        self.delay = 0.0
        self.in_pieces = False                       # send the answer in three writes
        self.url = ""

    def issue(self, thumbprint: str | None, **claims: Any) -> str:
        token = uuid.uuid4().hex + uuid.uuid4().hex
        now = int(time.time())
        body: dict[str, Any] = {"active": True, "client_id": "client-a", "sub": "user-1",
                                "scope": "accounts:read", "exp": now + 300, "iat": now,
                                "iss": "https://as.test", "aud": "https://api.test"}
        if thumbprint:
            body["cnf"] = {"x5t#S256": thumbprint}
        body.update(claims)
        self.tokens[token] = {k: v for k, v in body.items() if v is not None}
        return token

    def _client(self, request: web.Request, form: Any) -> tuple[str, str | None]:
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            cid, _, secret = base64.b64decode(header[6:]).decode().partition(":")
            return "client_secret_basic", cid if unquote(secret) == SECRET and \
                unquote(cid) == CLIENT_ID else None
        if "client_secret" in form:
            ok = form.get("client_id") == CLIENT_ID and form["client_secret"] == SECRET
            return "client_secret_post", CLIENT_ID if ok else None
        peer = peer_certificate(request.transport)
        ok = peer is not None and "CN=gateway" in peer.subject.split(",") and \
            form.get("client_id") == CLIENT_ID
        return "tls_client_auth", CLIENT_ID if ok else None

    async def introspect(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        form = await request.post()
        method, client = self._client(request, form)
        self.auth_seen.append((method, client or "-"))
        if self.hold is not None:
            await self.hold.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if client is None:
            return web.json_response({"error": "invalid_client"}, status=401)
        if self.body is not None:
            return web.Response(body=self.body, status=self.status,
                                content_type="text/html" if self.body.startswith(b"<")
                                else "application/json")
        answer = self.tokens.get(str(form.get("token")), {"active": False})
        if self.in_pieces:
            return await write_in_pieces(request, json.dumps(answer).encode(),
                                         content_type="application/json", status=self.status)
        return web.json_response(answer, status=self.status)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/introspect", self.introspect)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.pki.server_cert, self.pki.server_key)
        ctx.load_verify_locations(self.pki.ca_file)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        self.url = await self.serve(app, ctx) + "/introspect"


def introspection_config(pki: Pki, issuer: Issuer | None, upstream: Upstream,
                         auth: AuthServer, tmp_path: Path, **provider: Any) -> dict[str, Any]:
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    config = base_config(pki, issuer, upstream)
    config["providers"]["opaque"] = {
        "type": "introspection", "endpoint": auth.url, "client_id": CLIENT_ID,
        "client_secret_file": str(secret), "ca_file": str(pki.ca_file), "timeout": "1s",
        "issuer": "https://as.test", "audiences": ["https://api.test"],
        "cache": {"ttl": "60s", "negative_ttl": "60s"}, **provider,
    }
    names = ["corp", "opaque"] if issuer is not None else ["opaque"]
    config["routes"][1]["auth"] = {"provider": names}
    return config


@pytest.fixture
async def auth_server(pki: Pki) -> AsyncIterator[AuthServer]:
    server = AuthServer(pki)
    await server.start()
    yield server
    await server.stop()
