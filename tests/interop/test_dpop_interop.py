"""DPoP against a real authorization server: node-oidc-provider's dPoP feature (issue 19).

A real DPoP client (tests/dpop_client.py) obtains DPoP-bound tokens with the
client_credentials grant (a proof for the token endpoint in the ``DPoP`` header): JWTs that
carry ``cnf.jkt`` and opaque tokens whose introspection answer carries it. It then calls the
gateway as a public client (no certificate) with ``Authorization: DPoP`` and a fresh proof.
Every refusal asserts the status, the DPoP challenge, the reason code and that the upstream
saw nothing.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import yaml
from test_gateway_interop import INTROSPECTION, JWT_ES256, JWT_RS256, gateway_config

from dpop_client import DpopKey
from gwtest import Reply, Upstream
from mtls_gateway.app import GatewayServer
from mtls_gateway.config_load import load_config
from oidc_server import (
    RESOURCE_JWT_ES256,
    RESOURCE_JWT_RS256,
    RESOURCE_OPAQUE,
    SCOPE,
    ClientIdentity,
    OidcProvider,
    client_ssl_context,
    introspect,
)

#: resource -> the DPoP route serving it
DPOP_ROUTE = {RESOURCE_JWT_RS256: "/dpop-rs256", RESOURCE_JWT_ES256: "/dpop-es256",
              RESOURCE_OPAQUE: "/dpop-rs256"}
RESOURCES = [pytest.param(r, id=r.rsplit("/", 1)[-1]) for r in DPOP_ROUTE]


async def fetch_dpop_token(provider: OidcProvider, client: ClientIdentity, key: DpopKey, *,
                           resource: str) -> dict[str, Any]:
    """client_credentials with a DPoP proof (RFC 9449 section 5): a DPoP-bound token."""
    endpoint = provider.info.token_endpoint
    form = {"grant_type": "client_credentials", "client_id": client.client_id,
            "scope": SCOPE, "resource": resource}
    connector = aiohttp.TCPConnector(ssl=provider.ssl_context(client))
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=15)) as session, \
            session.post(endpoint, data=form,
                         headers={"DPoP": key.proof("POST", endpoint)}) as response:
        body: dict[str, Any] = await response.json(content_type=None)
        assert response.status == 200, body
    return body


@dataclass
class DpopGateway:
    server: GatewayServer
    upstream: Upstream
    ca_file: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.port}"

    async def request(self, path: str, headers: list[tuple[str, str]], *,
                      method: str = "GET") -> Reply:
        """As a public client: a new TLS connection, no client certificate."""
        connector = aiohttp.TCPConnector(ssl=client_ssl_context(self.ca_file, None),
                                         force_close=True)
        async with aiohttp.ClientSession(connector=connector,
                                         timeout=aiohttp.ClientTimeout(total=10)) as session, \
                session.request(method, self.url + path, headers=headers) as resp:
            return Reply(resp.status, resp.headers, await resp.read())


@pytest.fixture
async def dpop_gateway(oidc_provider: OidcProvider, upstream: Upstream,
                       tmp_path: Path) -> AsyncIterator[DpopGateway]:
    secret = tmp_path / "introspection-secret"
    secret.write_text(oidc_provider.gateway_client_secret + "\n")
    config = gateway_config(oidc_provider, upstream_url=upstream.url,
                            client_ca_file=oidc_provider.pki.ca_file, secret_file=secret)
    config["listen"]["client_cert"] = "optional"      # DPoP clients are public clients

    def dpop(*providers: str) -> dict[str, Any]:
        return {"provider": list(providers), "scopes": [SCOPE], "sender_constraint": "dpop"}

    config["routes"] = [
        {"name": "dpop-rs256", "path_prefix": "/dpop-rs256",
         "auth": dpop(JWT_RS256, INTROSPECTION)},
        {"name": "dpop-es256", "path_prefix": "/dpop-es256",
         "auth": dpop(JWT_ES256, INTROSPECTION)},
    ]
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    server = GatewayServer(load_config(path))
    await server.start()
    try:
        yield DpopGateway(server, upstream, oidc_provider.pki.ca_file)
    finally:
        await server.stop()


def _headers(token: str, proof: str | None, scheme: str = "DPoP") -> list[tuple[str, str]]:
    out = [("Authorization", f"{scheme} {token}")]
    return [*out, ("DPoP", proof)] if proof is not None else out


@pytest.mark.parametrize("resource", RESOURCES)
async def test_dpop_bound_tokens_from_node_oidc_provider(
        oidc_provider: OidcProvider, dpop_gateway: DpopGateway, resource: str) -> None:
    key = DpopKey.generate("ES256")
    body = await fetch_dpop_token(oidc_provider, oidc_provider.pki.unbound, key,
                                  resource=resource)
    assert body["token_type"] == "DPoP"
    token = body["access_token"]
    if resource == RESOURCE_OPAQUE:                    # introspection carries cnf.jkt
        answer = await introspect(oidc_provider, token)
        assert answer["cnf"] == {"jkt": key.thumbprint}
    else:                                              # the JWT carries cnf.jkt
        claims = jwt.decode(token, options={"verify_signature": False})
        assert claims["cnf"] == {"jkt": key.thumbprint}
    gw, path = dpop_gateway, DPOP_ROUTE[resource] + "/accounts"
    url = gw.url + path
    ok = await gw.request(path, _headers(token, key.proof("GET", url, token)))
    assert ok.status == 200, ok.body
    assert len(gw.upstream.seen) == 1
    gw.upstream.seen.clear()

    replayed = key.proof("GET", url, token)
    assert (await gw.request(path, _headers(token, replayed))).status == 200
    gw.upstream.seen.clear()
    other = DpopKey.generate("ES256")
    faults = {
        "dpop_replayed": _headers(token, replayed),
        "dpop_htm_mismatch": _headers(token, key.proof("POST", url, token)),
        "dpop_htu_mismatch": _headers(token, key.proof("GET", url + "/other", token)),
        "dpop_ath_mismatch": _headers(token, key.proof("GET", url, token + "x")),
        "dpop_jkt_mismatch": _headers(token, other.proof("GET", url, token)),
        "dpop_bearer_downgrade": _headers(token, None, "Bearer"),
        "dpop_proof_expired": _headers(token, key.proof("GET", url, token,
                                                        iat=time.time() - 600)),
        "dpop_proof_missing": _headers(token, None),
    }
    for reason, headers in faults.items():
        reply = await gw.request(path, headers)
        assert reply.status == 401, (reason, reply.body)
        assert reply.json()["reason"] == reason
        challenge = reply.headers["WWW-Authenticate"]
        assert challenge.startswith('DPoP realm="interop", error="'), challenge
        assert 'algs="' in challenge
        assert token not in reply.body.decode()
        assert gw.upstream.seen == [], reason
