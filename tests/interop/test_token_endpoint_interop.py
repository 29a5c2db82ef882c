"""The gateway in front of a real token endpoint (node-oidc-provider), issue 10.

The authorization server (a dedicated instance with ``client_cert_header_listener``) gets
the token requests on a plain-HTTP loopback listener that only the gateway talks to, and
takes the client certificate from the RFC 9440 ``Client-Cert`` header the gateway sets
(``server.mjs``: ``getCertificate``). The gateway authenticates the client by its
certificate first (RFC 8705 section 2), so:

client --mTLS--> gateway /token --Client-Cert--> AS: bound token
client --mTLS--> gateway /rs256 (binding: required) --> recording upstream: 200

and a client presenting the wrong certificate is refused by the gateway with
``invalid_client`` before the AS sees anything.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import yaml

from gwtest import Reply, Upstream
from mtls_gateway.app import GatewayServer
from mtls_gateway.config_load import load_config
from oidc_server import (
    RESOURCE_JWT_RS256,
    SCOPE,
    ClientIdentity,
    InteropPKI,
    OidcProvider,
    client_ssl_context,
)


def registry_entry(client: ClientIdentity) -> dict[str, Any]:
    """The gateway's registration of ``client``: the same facts the AS has registered."""
    if client.self_signed:
        x5c = [base64.b64encode(client.cert_der).decode()]
        return {"client_id": client.client_id,
                "token_endpoint_auth_method": "self_signed_tls_client_auth",
                "jwks": {"keys": [{"kty": "EC", "x5c": x5c}]}}
    return {"client_id": client.client_id, "token_endpoint_auth_method": "tls_client_auth",
            "tls_client_auth_subject_dn": client.subject_dn}


@dataclass
class TokenGateway:
    server: GatewayServer
    provider: OidcProvider
    upstream: Upstream

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.port}"

    async def call(self, method: str, path: str, client: ClientIdentity, *,
                   data: dict[str, str] | None = None, token: str | None = None) -> Reply:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        connector = aiohttp.TCPConnector(
            ssl=client_ssl_context(self.provider.pki.ca_file, client), force_close=True)
        async with aiohttp.ClientSession(connector=connector,
                                         timeout=aiohttp.ClientTimeout(total=15)) as s, \
                s.request(method, self.url + path, data=data, headers=headers) as resp:
            return Reply(resp.status, resp.headers, await resp.read())

    async def token(self, client: ClientIdentity, client_id: str | None = None) -> Reply:
        return await self.call("POST", "/token", client, data={
            "grant_type": "client_credentials", "client_id": client_id or client.client_id,
            "scope": SCOPE, "resource": RESOURCE_JWT_RS256})

    async def as_seen(self) -> int:
        """Requests the AS's header listener has served so far."""
        url = f"{self.provider.info.header_listener_url}/__control/seen"
        async with aiohttp.ClientSession() as s, s.get(url) as resp:
            return int((await resp.json())["seen"])


@pytest.fixture
async def token_gateway(start_oidc_provider: Callable[..., OidcProvider],
                        interop_pki: InteropPKI, upstream: Upstream,
                        tmp_path: Path) -> AsyncIterator[TokenGateway]:
    provider = start_oidc_provider(client_cert_header_listener=True)
    info = provider.info
    assert info.header_listener_url is not None
    config = {
        "realm": "interop",
        "listen": {"host": "127.0.0.1", "port": 0, "cert_file": str(interop_pki.server_cert),
                   "key_file": str(interop_pki.server_key),
                   "client_ca_file": str(interop_pki.ca_file),
                   "client_cert": "required"},
        "admin": {"enabled": False},
        "providers": {"as-jwt": {
            "type": "jwt", "issuer": info.issuer, "audiences": [RESOURCE_JWT_RS256],
            "algorithms": ["RS256"], "jwks_uri": info.jwks_uri,
            "jwks_ca_file": str(interop_pki.ca_file), "require_typ_at_jwt": True}},
        "client_registries": {"as-clients": {"clients": [
            registry_entry(interop_pki.client_a), registry_entry(interop_pki.self_signed)],
            # the registered self-signed certificate is accepted as itself, not put in a bundle
            "ca_file": str(interop_pki.ca_file)}},
        "upstream": {"url": upstream.url, "connect_timeout": "2s", "read_timeout": "10s"},
        "routes": [
            {"name": "token", "path": "/token", "methods": ["POST"],
             "upstream": info.header_listener_url, "auth": "mtls_client"},
            {"name": "rs256", "path_prefix": "/rs256",
             "auth": {"provider": "as-jwt", "binding": "required", "scopes": [SCOPE]}},
        ],
        "metadata": {"resource": "https://api.example.test"},
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    server = GatewayServer(load_config(path))
    await server.start()
    try:
        yield TokenGateway(server, provider, upstream)
    finally:
        await server.stop()


@pytest.mark.parametrize("who", ["client_a", "self_signed"])
async def test_bound_token_through_the_gateway(token_gateway: TokenGateway,
                                               interop_pki: InteropPKI, who: str) -> None:
    client: ClientIdentity = getattr(interop_pki, who)
    reply = await token_gateway.token(client)
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["token_type"].lower() == "bearer"
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    # The AS bound the token to the certificate it got from the gateway's Client-Cert.
    assert claims["cnf"] == {"x5t#S256": client.thumbprint}
    assert claims["client_id"] == client.client_id

    reply = await token_gateway.call("GET", "/rs256/accounts", client,
                                     token=body["access_token"])
    assert reply.status == 200, reply.body
    [seen] = token_gateway.upstream.seen
    assert seen.path_qs == "/rs256/accounts"
    assert seen.headers["x-client-cert-thumbprint"] == [client.thumbprint]

    # The same token with another client's certificate: binding_mismatch, upstream untouched.
    other = interop_pki.client_b if who == "self_signed" else interop_pki.self_signed
    reply = await token_gateway.call("GET", "/rs256/accounts", other, token=body["access_token"])
    assert (reply.status, reply.json()["reason"]) == (401, "binding_mismatch")
    assert 'resource_metadata="https://api.example.test/.well-known/oauth-protected-resource"' \
        in reply.headers["WWW-Authenticate"]
    assert len(token_gateway.upstream.seen) == 1


@pytest.mark.parametrize(("cert", "client_id", "reason"), [
    ("client_b", "client-a", "client_cert_mismatch"),          # same CA, other subject
    ("self_signed", "client-a", "client_cert_untrusted"),       # self-signed under tls_client_auth
    ("client_a", "client-self-signed", "client_cert_mismatch"),  # not the registered x5c
    ("client_b", "client-b", "unknown_client"),                 # not in the gateway's registry
])
async def test_wrong_certificate_never_reaches_the_as(token_gateway: TokenGateway,
                                                      interop_pki: InteropPKI, cert: str,
                                                      client_id: str, reason: str) -> None:
    before = await token_gateway.as_seen()
    reply = await token_gateway.token(getattr(interop_pki, cert), client_id)
    assert reply.status == 401, reply.body
    assert reply.json()["error"] == "invalid_client"
    assert reply.json()["reason"] == reason
    assert await token_gateway.as_seen() == before
    assert token_gateway.upstream.seen == []


async def test_as_rejects_a_forged_client_cert_header_sent_to_the_gateway(
        token_gateway: TokenGateway, interop_pki: InteropPKI) -> None:
    """A client cannot smuggle another certificate to the AS: the gateway replaces any inbound
    Client-Cert with the one of the connection, so client-a's token is bound to client-a."""
    forged = f":{base64.b64encode(interop_pki.client_b.cert_der).decode()}:"
    connector = aiohttp.TCPConnector(
        ssl=client_ssl_context(interop_pki.ca_file, interop_pki.client_a), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s, s.post(
            token_gateway.url + "/token", headers={"Client-Cert": forged},
            data={"grant_type": "client_credentials", "client_id": "client-a", "scope": SCOPE,
                  "resource": RESOURCE_JWT_RS256}) as resp:
        assert resp.status == 200, await resp.text()
        body = json.loads(await resp.text())
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["cnf"] == {"x5t#S256": interop_pki.client_a.thumbprint}
