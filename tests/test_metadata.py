"""RFC 9728 protected resource metadata, resource_metadata challenges, RFC 8705 s5 rewrite."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import jsonschema
import pytest
from aiohttp import web

from gwtest import ISSUER, GatewayFactory, Issuer, LoopbackServer, Pki, Upstream, base_config
from mtls_gateway.config import AsMetadataRewrite
from mtls_gateway.metadata import metadata_path, rewrite_as_metadata

_URI = {"type": "string", "pattern": "^https://[^#?]+$"}
_STRINGS = {"type": "array", "items": {"type": "string"}}

#: RFC 9728 section 2: ``resource`` is the one required member; the types of the others.
RFC9728_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["resource"],
    "properties": {
        "resource": _URI,
        "authorization_servers": {"type": "array", "items": _URI},
        "jwks_uri": _URI,
        "scopes_supported": _STRINGS,
        "bearer_methods_supported": {"type": "array",
                                     "items": {"enum": ["header", "body", "query"]}},
        "resource_signing_alg_values_supported": _STRINGS,
        "resource_name": {"type": "string"},
        "resource_documentation": _URI,
        "resource_policy_uri": _URI,
        "resource_tos_uri": _URI,
        "tls_client_certificate_bound_access_tokens": {"type": "boolean"},
        "authorization_details_types_supported": _STRINGS,
        "dpop_signing_alg_values_supported": _STRINGS,
        "dpop_bound_access_tokens_required": {"type": "boolean"},
    },
}

#: RFC 8414 section 2 required members, with RFC 8705 sections 3.3 and 5.
RFC8414_8705_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["issuer", "response_types_supported", "token_endpoint",
                 "mtls_endpoint_aliases", "tls_client_certificate_bound_access_tokens"],
    "properties": {
        "issuer": _URI,
        "token_endpoint": _URI,
        "response_types_supported": _STRINGS,
        "mtls_endpoint_aliases": {"type": "object", "additionalProperties": _URI,
                                  "minProperties": 1},
        "tls_client_certificate_bound_access_tokens": {"const": True},
    },
}


@pytest.mark.parametrize(("resource", "path"), [
    ("https://api.test", "/.well-known/oauth-protected-resource"),
    ("https://api.test/", "/.well-known/oauth-protected-resource"),
    ("https://api.test/v1/accounts", "/.well-known/oauth-protected-resource/v1/accounts"),
])
def test_well_known_path(resource: str, path: str) -> None:
    assert metadata_path(resource) == path


def meta_config(pki: Pki, issuer: Issuer | None, upstream: Upstream,
                **metadata: Any) -> dict[str, Any]:
    config = base_config(pki, issuer, upstream)
    config["routes"][1]["auth"]["scopes"] = ["accounts:read"]
    config["metadata"] = {"resource": "https://api.test", **metadata}
    return config


async def test_protected_resource_metadata(make_gateway: GatewayFactory, pki: Pki,
                                           issuer: Issuer, upstream: Upstream) -> None:
    gw = await make_gateway(meta_config(pki, issuer, upstream, resource_name="Accounts"))
    reply = await gw.request("/.well-known/oauth-protected-resource", cert=None)
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    doc = reply.json()
    jsonschema.validate(doc, RFC9728_SCHEMA)
    assert doc == {"resource": "https://api.test", "authorization_servers": [ISSUER],
                   "scopes_supported": ["accounts:read"], "bearer_methods_supported": ["header"],
                   "tls_client_certificate_bound_access_tokens": True,
                   "resource_name": "Accounts"}
    assert upstream.seen == []


async def test_resource_with_path_and_explicit_members(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream) -> None:
    gw = await make_gateway(meta_config(
        pki, issuer, upstream, resource="https://api.test/v1",
        authorization_servers=["https://as.test"], scopes_supported=["a", "b"]))
    reply = await gw.request("/.well-known/oauth-protected-resource/v1")
    doc = reply.json()
    jsonschema.validate(doc, RFC9728_SCHEMA)
    assert doc["resource"] == "https://api.test/v1"   # RFC 9728 s3.3: identical
    assert (doc["authorization_servers"], doc["scopes_supported"]) == (["https://as.test"],
                                                                        ["a", "b"])
    # the path without the suffix is not the document: it is routed like any other path
    reply = await gw.request("/.well-known/oauth-protected-resource")
    assert reply.status == 401 and upstream.seen == []


@pytest.mark.parametrize("configured", [True, False])
async def test_challenges_name_the_metadata_url(make_gateway: GatewayFactory, pki: Pki,
                                                issuer: Issuer, upstream: Upstream,
                                                configured: bool) -> None:
    config = meta_config(pki, issuer, upstream)
    if not configured:
        del config["metadata"]
    gw = await make_gateway(config)
    expected = 'resource_metadata="https://api.test/.well-known/oauth-protected-resource"'
    for token, status in ((None, 401), ("not-a-jwt", 401),
                          (issuer.mint(pki.clients["a"].thumbprint, scope="other"), 403)):
        reply = await gw.request("/accounts", token=token, headers={"Host": "evil.test"})
        assert reply.status == status
        challenge = reply.headers["WWW-Authenticate"]
        assert challenge.startswith("Bearer ")
        assert (expected in challenge) is configured
    assert upstream.seen == []


class AuthorizationServer(LoopbackServer):
    """An upstream serving an RFC 8414 metadata document (and a broken one)."""

    DOC: ClassVar[dict[str, Any]] = {
        "issuer": "https://as.test", "token_endpoint": "https://as.test/token",
        "authorization_endpoint": "https://as.test/authorize",
        "response_types_supported": ["code"],
        "mtls_endpoint_aliases": {"introspection_endpoint": "https://mtls.as.test/introspect"},
    }

    def __init__(self) -> None:
        self.url = ""
        self.seen: list[str] = []

    async def start(self) -> None:
        async def handle(request: web.Request) -> web.Response:
            self.seen.append(request.path)
            if request.path == "/.well-known/oauth-authorization-server":
                return web.json_response(self.DOC, headers={"Cache-Control": "max-age=60"})
            if request.path == "/.well-known/openid-configuration":
                return web.Response(text="not json", content_type="text/plain")
            if request.path == "/.well-known/huge":
                return web.json_response({"issuer": "x" * 300_000})
            return web.Response(status=404, text="nope")

        app = web.Application()
        app.router.add_get("/{p:.*}", handle)
        self.url = await self.serve(app)


@pytest.fixture
async def auth_server() -> AsyncIterator[AuthorizationServer]:
    server = AuthorizationServer()
    await server.start()
    yield server
    await server.stop()


async def test_as_metadata_rewrite(make_gateway: GatewayFactory, pki: Pki, upstream: Upstream,
                                   auth_server: AuthorizationServer) -> None:
    config = meta_config(pki, None, upstream, authorization_server_metadata={
        "mtls_endpoint_aliases": {"token_endpoint": "https://gateway.test/token"},
        "paths": ["/.well-known/oauth-authorization-server", "/.well-known/openid-configuration",
                  "/.well-known/huge", "/.well-known/other"]})
    config["routes"] = [{"name": "as", "path_prefix": "/.well-known", "auth": "none",
                         "upstream": auth_server.url}]
    gw = await make_gateway(config)
    reply = await gw.request("/.well-known/oauth-authorization-server")
    assert reply.status == 200
    doc = reply.json()
    jsonschema.validate(doc, RFC8414_8705_SCHEMA)
    assert doc["mtls_endpoint_aliases"] == {
        "introspection_endpoint": "https://mtls.as.test/introspect",
        "token_endpoint": "https://gateway.test/token"}
    assert {k: v for k, v in doc.items() if k not in (
        "mtls_endpoint_aliases", "tls_client_certificate_bound_access_tokens")} == {
        k: v for k, v in AuthorizationServer.DOC.items() if k != "mtls_endpoint_aliases"}
    assert reply.headers["Cache-Control"] == "max-age=60"
    # not JSON, or not 200: passed on unchanged
    reply = await gw.request("/.well-known/openid-configuration")
    assert (reply.status, reply.body) == (200, b"not json")
    reply = await gw.request("/.well-known/other")
    assert (reply.status, reply.body) == (404, b"nope")
    # a document over the 256 KiB cap is not relayed half-read
    reply = await gw.request("/.well-known/huge")
    assert (reply.status, reply.json()["reason"]) == (502, "upstream_unavailable")
    assert auth_server.seen == ["/.well-known/oauth-authorization-server",
                                "/.well-known/openid-configuration", "/.well-known/other",
                                "/.well-known/huge"]


def test_rewrite_does_not_touch_the_input() -> None:
    doc = {"issuer": "https://as.test", "mtls_endpoint_aliases": {"a": "https://x.test/a"}}
    before = json.dumps(doc, sort_keys=True)
    out = rewrite_as_metadata(doc, AsMetadataRewrite((), {"token_endpoint": "https://g.test/t"}))
    assert json.dumps(doc, sort_keys=True) == before
    assert out["mtls_endpoint_aliases"] == {"a": "https://x.test/a",
                                            "token_endpoint": "https://g.test/t"}


# --- a document per route (RFC 9728 section 3.1), issue 21 ------------------------------------

def per_route_config(pki: Pki, issuer: Issuer, upstream: Upstream) -> dict[str, Any]:
    config = meta_config(pki, issuer, upstream)
    config["routes"].insert(1, {
        "name": "payments", "path_prefix": "/payments", "resource": "https://api.test/payments",
        "auth": {"provider": "corp", "scopes": ["payments:write"]}})
    return config


async def test_route_resource_has_its_own_document(make_gateway: GatewayFactory, pki: Pki,
                                                   issuer: Issuer, upstream: Upstream) -> None:
    gw = await make_gateway(per_route_config(pki, issuer, upstream))
    own = (await gw.request("/.well-known/oauth-protected-resource/payments", cert=None)).json()
    jsonschema.validate(own, RFC9728_SCHEMA)
    assert own == {"resource": "https://api.test/payments", "authorization_servers": [ISSUER],
                   "scopes_supported": ["payments:write"],
                   "bearer_methods_supported": ["header"],
                   "tls_client_certificate_bound_access_tokens": True}
    main = (await gw.request("/.well-known/oauth-protected-resource", cert=None)).json()
    assert main["resource"] == "https://api.test"
    assert upstream.seen == []


@pytest.mark.parametrize("why", ["no_token", "unbound", "scope"])
async def test_route_challenge_names_its_own_document(make_gateway: GatewayFactory, pki: Pki,
                                                      issuer: Issuer, upstream: Upstream,
                                                      why: str) -> None:
    """Whichever step refuses (the fast lane would refuse an unbound token), the challenge
    names the route's document; other routes keep the gateway's."""
    gw = await make_gateway(per_route_config(pki, issuer, upstream))
    token = {"no_token": None,
             "unbound": issuer.mint(pki.clients["b"].thumbprint, scope="payments:write"),
             "scope": issuer.mint(pki.clients["a"].thumbprint, scope="other")}[why]
    own = 'resource_metadata="https://api.test/.well-known/oauth-protected-resource/payments"'
    main = 'resource_metadata="https://api.test/.well-known/oauth-protected-resource"'
    reply = await gw.request("/payments/1", token=token)
    assert reply.status in (401, 403) and own in reply.headers["WWW-Authenticate"]
    reply = await gw.request("/accounts", token=token)
    assert reply.status in (401, 403) and main in reply.headers["WWW-Authenticate"]
    assert upstream.seen == []


async def test_route_with_its_own_resource_still_forwards(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream) -> None:
    gw = await make_gateway(per_route_config(pki, issuer, upstream))
    token = issuer.mint(pki.clients["a"].thumbprint, scope="payments:write")
    assert (await gw.request("/payments/1", token=token)).status == 200
    assert [s.path_qs for s in upstream.seen] == ["/payments/1"]
