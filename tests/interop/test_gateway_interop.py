"""The gateway against a real authorization server (node-oidc-provider), issue 4.

Real access tokens come from the client_credentials grant over mutual TLS (``fetch_token``);
a real gateway on 127.0.0.1 verifies JWTs locally against the AS's JWKS and sends opaque tokens
to the AS's introspection endpoint; a recording upstream shows what got through. Every refusal
asserts the status, the RFC 6750 error, the reason code and that the upstream saw nothing.

Gateway layout (see :func:`gateway_config`, the same settings as the worked example in
docs/authorization-servers.md):

=====================  =======================================================  ==========
route                  provider chain                                           binding
=====================  =======================================================  ==========
``/rs256``             as-jwt-rs256 -> as-introspection                         required
``/es256``             as-jwt-es256 -> as-introspection                         required
``/optional``          as-jwt-rs256 -> as-introspection                         optional
=====================  =======================================================  ==========
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiohttp
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from gwtest import Reply, Upstream
from mtls_gateway.app import GatewayServer
from mtls_gateway.config_load import load_config, load_config_text
from mtls_gateway.errors import ConfigError
from mtls_gateway.introspection import IntrospectionVerifier
from mtls_gateway.jwt_verifier import JwtVerifier
from oidc_server import (
    GATEWAY_CLIENT_ID,
    RESERVED_SECRET_CHARACTERS,
    RESOURCE_JWT_ES256,
    RESOURCE_JWT_RS256,
    RESOURCE_OPAQUE,
    RESOURCE_OTHER_JWT,
    RESOURCE_OTHER_OPAQUE,
    SCOPE,
    ClientIdentity,
    InteropPKI,
    OidcProvider,
    client_ssl_context,
    fetch_token,
    introspect,
    revoke,
    rotate_keys,
)

JWT_RS256 = "as-jwt-rs256"
JWT_ES256 = "as-jwt-es256"
INTROSPECTION = "as-introspection"

#: resource (the token's audience) -> route that API is served under, and the provider that
#: should verify its tokens there.
ROUTE_FOR = {RESOURCE_JWT_RS256: "/rs256", RESOURCE_JWT_ES256: "/es256", RESOURCE_OPAQUE: "/rs256"}
PROVIDER_FOR = {RESOURCE_JWT_RS256: JWT_RS256, RESOURCE_JWT_ES256: JWT_ES256,
                RESOURCE_OPAQUE: INTROSPECTION}
ALL_RESOURCES = [RESOURCE_JWT_RS256, RESOURCE_JWT_ES256, RESOURCE_OPAQUE]
RESOURCE_IDS = {RESOURCE_JWT_RS256: "jwt-rs256", RESOURCE_JWT_ES256: "jwt-es256",
                RESOURCE_OPAQUE: "opaque"}


# ---- the gateway under test ----------------------------------------------------------------


def gateway_config(provider: OidcProvider, *, upstream_url: str, client_ca_file: Path,
                   secret_file: Path, cache_ttl: str = "60s") -> dict[str, Any]:
    """A gateway.yaml for ``provider``: one JWT provider per audience, introspection last."""
    pki, info = provider.pki, provider.info

    def jwt_provider(resource: str, alg: str) -> dict[str, Any]:
        return {
            "type": "jwt",
            "issuer": info.issuer,                 # exactly as the AS prints it: no trailing /
            "audiences": [resource],               # the resource indicator the client asked for
            "algorithms": [alg],
            "jwks_uri": info.jwks_uri,
            "jwks_ca_file": str(pki.ca_file),
            "require_typ_at_jwt": True,            # oidc-provider sets typ: at+jwt
            "required_claims": ["sub", "client_id", "iat", "jti"],
        }

    def chain(*providers: str, binding: str = "required") -> dict[str, Any]:
        return {"provider": list(providers), "binding": binding, "scopes": [SCOPE]}

    return {
        "realm": "interop",
        "listen": {
            "host": "127.0.0.1", "port": 0,
            "cert_file": str(pki.server_cert), "key_file": str(pki.server_key),
            "client_ca_file": str(client_ca_file), "client_cert": "required",
        },
        "admin": {"enabled": False},
        "providers": {
            JWT_RS256: jwt_provider(RESOURCE_JWT_RS256, "RS256"),
            JWT_ES256: jwt_provider(RESOURCE_JWT_ES256, "ES256"),
            INTROSPECTION: {
                "type": "introspection",
                "endpoint": info.introspection_endpoint,
                "client_id": provider.gateway_client_id,
                "auth_method": "client_secret_basic",
                "client_secret_file": str(secret_file),
                "ca_file": str(pki.ca_file),
                "issuer": info.issuer,
                "audiences": [RESOURCE_OPAQUE],
                "cache": {"ttl": cache_ttl, "negative_ttl": "10s"},
            },
        },
        "upstream": {"url": upstream_url, "connect_timeout": "2s", "read_timeout": "5s"},
        "routes": [
            {"name": "rs256", "path_prefix": "/rs256", "auth": chain(JWT_RS256, INTROSPECTION)},
            {"name": "es256", "path_prefix": "/es256", "auth": chain(JWT_ES256, INTROSPECTION)},
            {"name": "optional", "path_prefix": "/optional",
             "auth": chain(JWT_RS256, INTROSPECTION, binding="optional")},
        ],
    }


@dataclass
class InteropGateway:
    """A running gateway in front of ``upstream``, trusting ``provider``."""

    server: GatewayServer
    provider: OidcProvider
    upstream: Upstream

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.port}"

    async def request(self, path: str, client: ClientIdentity, token: str | None) -> Reply:
        """GET ``path`` over a new mutual-TLS connection presenting ``client``'s certificate."""
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        context = client_ssl_context(self.provider.pki.ca_file, client)
        connector = aiohttp.TCPConnector(ssl=context, force_close=True)
        async with aiohttp.ClientSession(connector=connector,
                                         timeout=aiohttp.ClientTimeout(total=10)) as session, \
                session.get(self.url + path, headers=headers) as resp:
            return Reply(resp.status, resp.headers, await resp.read())

    def introspection(self) -> IntrospectionVerifier:
        return cast(IntrospectionVerifier, self.server.gateway.verifiers[INTROSPECTION])

    def jwt_verifier(self, name: str) -> JwtVerifier:
        return cast(JwtVerifier, self.server.gateway.verifiers[name])


GatewayFactory = Callable[..., Awaitable[InteropGateway]]


def client_ca_bundle(pki: InteropPKI, directory: Path, *, self_signed: bool) -> Path:
    """The interop CA, plus (RFC 8705 section 2.2) the self-signed client's own certificate."""
    parts = [pki.ca_file.read_bytes()]
    if self_signed:
        parts.append(pki.self_signed.cert.read_bytes())
    path = directory / ("client-ca+self-signed.pem" if self_signed else "client-ca.pem")
    path.write_bytes(b"".join(parts))
    return path


@pytest.fixture
async def start_gateway(interop_pki: InteropPKI, upstream: Upstream,
                        tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    """``await start_gateway(provider, **overrides)``; every gateway is stopped at the end."""
    started: list[GatewayServer] = []

    async def start(provider: OidcProvider, *, cache_ttl: str = "60s",
                    trust_self_signed: bool = True, client_ca: str = "pki") -> InteropGateway:
        directory = tmp_path / f"gateway-{len(started)}"
        directory.mkdir()
        secret_file = directory / "introspection-secret"
        secret_file.touch(mode=0o600)
        secret_file.write_text(provider.gateway_client_secret + "\n")
        config = gateway_config(
            provider, upstream_url=upstream.url, secret_file=secret_file, cache_ttl=cache_ttl,
            client_ca_file=client_ca_bundle(interop_pki, directory,
                                            self_signed=trust_self_signed))
        if client_ca == "any":      # no client CA bundle at all (issue 7)
            del config["listen"]["client_ca_file"]
            config["listen"]["client_ca"] = "any"
            # binding: optional is refused under client_ca: any (see test_config_load.py)
            config["routes"] = [r for r in config["routes"]
                                if r["auth"]["binding"] == "required"]
        config_path = directory / "gateway.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        server = GatewayServer(load_config(config_path))
        await server.start()
        started.append(server)
        return InteropGateway(server, provider, upstream)

    yield start
    for server in reversed(started):
        await server.stop()


@pytest.fixture
async def gateway(start_gateway: GatewayFactory, oidc_provider: OidcProvider) -> InteropGateway:
    """The gateway in front of the shared authorization server."""
    return await start_gateway(oidc_provider)


# ---- assertions ----------------------------------------------------------------------------


def decisions(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The gateway's decision log records (logger ``mtls_gateway.access``), oldest first."""
    return [r.decision for r in caplog.records  # type: ignore[attr-defined]
            if r.name == "mtls_gateway.access"]


def assert_refused(reply: Reply, gw: InteropGateway, token: str, *, status: int, error: str,
                   reason: str) -> None:
    """An RFC 6750 refusal that never reached the upstream and never echoes the token."""
    assert reply.status == status, reply.body
    challenge = reply.headers.get("WWW-Authenticate", "")
    assert challenge.startswith('Bearer realm="interop"'), challenge
    assert f'error="{error}"' in challenge, challenge
    assert reply.json()["reason"] == reason, reply.body
    assert token not in reply.body.decode()
    assert gw.upstream.seen == []


def pki_client(pki: InteropPKI, name: str) -> ClientIdentity:
    return cast(ClientIdentity, getattr(pki, name))


# ---- binding with real tokens --------------------------------------------------------------


BINDING_CASES: list[Any] = []
for _resource in ALL_RESOURCES:
    _id = RESOURCE_IDS[_resource]
    BINDING_CASES += [
        # (token of, resource, presented certificate, route, status, reason)
        pytest.param("client_a", _resource, "client_a", None, 200, "allowed",
                     id=f"{_id}-a-with-cert-a"),
        pytest.param("client_a", _resource, "client_b", None, 401, "binding_mismatch",
                     id=f"{_id}-a-with-cert-b"),
        pytest.param("self_signed", _resource, "self_signed", None, 200, "allowed",
                     id=f"{_id}-self-signed-with-its-cert"),
        pytest.param("self_signed", _resource, "client_a", None, 401, "binding_mismatch",
                     id=f"{_id}-self-signed-with-cert-a"),
        # client-unbound is registered with tls_client_certificate_bound_access_tokens false
        pytest.param("unbound", _resource, "unbound", None, 401, "binding_missing",
                     id=f"{_id}-unbound-required"),
    ]
BINDING_CASES += [
    pytest.param("unbound", RESOURCE_JWT_RS256, "unbound", "/optional", 200, "allowed",
                 id="jwt-rs256-unbound-optional"),
    pytest.param("unbound", RESOURCE_OPAQUE, "unbound", "/optional", 200, "allowed",
                 id="opaque-unbound-optional"),
    pytest.param("client_a", RESOURCE_OPAQUE, "client_b", "/optional", 401, "binding_mismatch",
                 id="opaque-a-with-cert-b-optional"),
]


@pytest.mark.parametrize(("holder", "resource", "presenter", "route", "status", "reason"),
                         BINDING_CASES)
async def test_real_tokens_are_bound_to_the_certificate_they_were_issued_to(
        gateway: InteropGateway, oidc_provider: OidcProvider, interop_pki: InteropPKI,
        caplog: pytest.LogCaptureFixture, holder: str, resource: str, presenter: str,
        route: str | None, status: int, reason: str) -> None:
    caplog.set_level(logging.INFO, "mtls_gateway.access")
    owner, cert = pki_client(interop_pki, holder), pki_client(interop_pki, presenter)
    token = (await fetch_token(oidc_provider, owner, resource=resource, scope=SCOPE)).access_token
    path = f"{route or ROUTE_FOR[resource]}/accounts/42?x=1"

    reply = await gateway.request(path, cert, token)

    if status == 200:
        assert reply.status == 200, reply.body
        assert [s.path_qs for s in gateway.upstream.seen] == [path]
        seen = gateway.upstream.seen[0].headers
        assert seen["x-client-cert-thumbprint"] == [cert.thumbprint]
        assert seen["x-auth-client-id"] == [owner.client_id]
        assert seen["x-auth-scope"] == [SCOPE]
        assert seen["authorization"] == [f"Bearer {token}"]
        # oidc-provider puts sub (= client_id) in its JWTs, but no sub in the introspection
        # answer of a client_credentials token, so the upstream gets no subject header then.
        expected_subject = None if resource == RESOURCE_OPAQUE else [owner.client_id]
        assert seen.get("x-auth-subject") == expected_subject
    else:
        assert_refused(reply, gateway, token, status=status, error="invalid_token",
                       reason=reason)
    (decision,) = decisions(caplog)
    assert decision["decision"] == ("allow" if status == 200 else "deny")
    assert decision["reason"] == reason
    assert decision["status"] == status
    assert decision["provider"] == PROVIDER_FOR[resource]   # which provider took the token
    assert decision["client_thumbprint"] == cert.thumbprint
    assert token not in caplog.text


@pytest.mark.parametrize("resource", ALL_RESOURCES, ids=RESOURCE_IDS.get)
async def test_token_without_the_route_scope_is_403(
        gateway: InteropGateway, oidc_provider: OidcProvider, interop_pki: InteropPKI,
        resource: str) -> None:
    client = interop_pki.client_a
    token = (await fetch_token(oidc_provider, client, resource=resource, scope=None)).access_token
    reply = await gateway.request(ROUTE_FOR[resource] + "/accounts/42", client, token)
    assert_refused(reply, gateway, token, status=403, error="insufficient_scope",
                   reason="insufficient_scope")
    assert f'scope="{SCOPE}"' in reply.headers["WWW-Authenticate"]


@pytest.mark.parametrize(("resource", "route", "reason"), [
    (RESOURCE_OTHER_JWT, "/rs256", "wrong_audience"),
    (RESOURCE_OTHER_OPAQUE, "/rs256", "wrong_audience"),
    # an RS256 JWT of our issuer on the ES256 API is claimed there and fails the alg allowlist
    (RESOURCE_JWT_RS256, "/es256", "alg_not_allowed"),
], ids=["jwt", "opaque", "jwt-rs256-on-es256-api"])
async def test_token_issued_for_another_api_is_refused(
        gateway: InteropGateway, oidc_provider: OidcProvider, interop_pki: InteropPKI,
        caplog: pytest.LogCaptureFixture, resource: str, route: str, reason: str) -> None:
    """A valid, bound token of our AS, for a resource (audience) this API is not."""
    caplog.set_level(logging.INFO, "mtls_gateway.access")
    client = interop_pki.client_a
    token = (await fetch_token(oidc_provider, client, resource=resource)).access_token
    reply = await gateway.request(route + "/accounts/42", client, token)
    assert_refused(reply, gateway, token, status=401, error="invalid_token", reason=reason)
    (decision,) = decisions(caplog)
    assert decision["provider"] == (INTROSPECTION if resource == RESOURCE_OTHER_OPAQUE
                                    else {"/rs256": JWT_RS256, "/es256": JWT_ES256}[route])


async def test_self_signed_client_needs_its_certificate_in_the_client_ca_bundle(
        start_gateway: GatewayFactory, oidc_provider: OidcProvider,
        interop_pki: InteropPKI) -> None:
    client = interop_pki.self_signed
    token = (await fetch_token(oidc_provider, client, resource=RESOURCE_JWT_RS256)).access_token
    gw = await start_gateway(oidc_provider, trust_self_signed=False)
    with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
        await gw.request("/rs256/accounts/42", client, token)
    assert gw.upstream.seen == []
    # the CA-issued clients are unaffected by the bundle
    a_token = (await fetch_token(oidc_provider, interop_pki.client_a,
                                 resource=RESOURCE_JWT_RS256)).access_token
    assert (await gw.request("/rs256/accounts/42", interop_pki.client_a, a_token)).status == 200


# ---- introspection: revocation and the cache -----------------------------------------------


async def test_revoked_opaque_token_is_refused_once_its_cache_entry_expires(
        start_gateway: GatewayFactory, oidc_provider: OidcProvider, interop_pki: InteropPKI,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mtls_gateway.access")
    ttl = 1.0
    gw = await start_gateway(oidc_provider, cache_ttl=f"{ttl}s")
    client = interop_pki.client_a
    token = (await fetch_token(oidc_provider, client, resource=RESOURCE_OPAQUE)).access_token
    path = "/rs256/accounts/42"

    assert (await gw.request(path, client, token)).status == 200
    cached_by = time.monotonic()  # the answer was cached before the reply was sent
    assert gw.introspection().stats.calls == 1

    assert await revoke(oidc_provider, token) == 200
    still = await gw.request(path, client, token)
    assert time.monotonic() - cached_by < ttl, "too slow to observe the cached answer"
    assert still.status == 200, still.body
    assert gw.introspection().stats.calls == 1  # served from the cache, the AS not asked
    assert (await introspect(oidc_provider, token))["active"] is False  # the AS forgot it

    await _sleep_until(cached_by + ttl + 0.05)
    reply = await gw.request(path, client, token)
    assert reply.status == 401, reply.body
    assert 'error="invalid_token"' in reply.headers["WWW-Authenticate"]
    assert reply.json()["reason"] == "token_inactive"
    assert gw.introspection().stats.calls == 2
    assert len(gw.upstream.seen) == 2  # the two requests before expiry, not the third
    assert [(d["reason"], d["provider"]) for d in decisions(caplog)] == [
        ("allowed", INTROSPECTION), ("allowed", INTROSPECTION), ("token_inactive", INTROSPECTION)]


async def test_jwt_cannot_be_revoked_and_stays_valid_until_it_expires(
        gateway: InteropGateway, oidc_provider: OidcProvider, interop_pki: InteropPKI) -> None:
    """oidc-provider refuses to revoke structured tokens; the gateway, verifying JWTs locally,
    keeps accepting them until exp (keep JWT access token lifetimes short)."""
    client = interop_pki.client_a
    token = (await fetch_token(oidc_provider, client, resource=RESOURCE_JWT_RS256)).access_token
    assert await revoke(oidc_provider, token) == 400
    assert (await gateway.request("/rs256/accounts/42", client, token)).status == 200


async def _sleep_until(deadline: float) -> None:
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))


# ---- JWKS rotation at the AS -----------------------------------------------------------------


@pytest.mark.parametrize("retain_previous", [False, True], ids=["replace", "retain"])
async def test_jwks_rotation_at_the_as_is_picked_up(
        start_oidc_provider: Callable[..., OidcProvider], start_gateway: GatewayFactory,
        interop_pki: InteropPKI, caplog: pytest.LogCaptureFixture,
        retain_previous: bool) -> None:
    caplog.set_level(logging.INFO, "mtls_gateway.access")
    provider = start_oidc_provider()  # a dedicated AS: rotating the shared one would disturb
    gw = await start_gateway(provider)
    client = interop_pki.client_a
    routes = {RESOURCE_JWT_RS256: ("/rs256", JWT_RS256, "RS256"),
              RESOURCE_JWT_ES256: ("/es256", JWT_ES256, "ES256")}

    old: dict[str, str] = {}
    for resource, (route, _, alg) in routes.items():
        old[resource] = (await fetch_token(provider, client, resource=resource)).access_token
        assert jwt.get_unverified_header(old[resource])["kid"] == provider.info.kids[alg]
        assert (await gw.request(route, client, old[resource])).status == 200

    rotated = await rotate_keys(provider, retain_previous=retain_previous)

    for resource, (route, name, alg) in routes.items():
        # until something makes it refetch, the gateway keeps the keys it has: old tokens pass
        assert (await gw.request(route, client, old[resource])).status == 200
        new = (await fetch_token(provider, client, resource=resource)).access_token
        new_kid = jwt.get_unverified_header(new)["kid"]
        # the gateway fetched the JWKS at start, before the rotation: this kid is unknown to it
        assert new_kid == rotated["kids"][alg] != provider.info.kids[alg]
        keys = gw.jwt_verifier(name).keys
        assert keys.stats.kid_refetches == 0

        reply = await gw.request(route, client, new)
        assert reply.status == 200, reply.body  # unknown kid -> one refetch -> accepted
        assert keys.stats.kid_refetches == 1

        before = await gw.request(route, client, old[resource])
        if retain_previous:
            assert before.status == 200, before.body
        else:
            # the refetched JWKS no longer has the old key: tokens signed with it are refused
            # (without another fetch: the refetch cooldown is running)
            assert before.status == 401, before.body
            assert 'error="invalid_token"' in before.headers["WWW-Authenticate"]
            assert before.json()["reason"] == "unknown_key"
        assert keys.stats.kid_refetches == 1

    assert len(gw.upstream.seen) == 2 * (4 if retain_previous else 3)
    assert {d["provider"] for d in decisions(caplog)} == {JWT_RS256, JWT_ES256}


# ---- provider chains: what the gateway does with tokens no JWT provider claims ---------------


def test_two_jwt_providers_of_one_issuer_in_one_chain_are_refused_at_start(
        oidc_provider: OidcProvider, interop_pki: InteropPKI, tmp_path: Path) -> None:
    """A JWT provider claims every JWT naming its issuer, whatever the audience or algorithm,
    so in ``[as-jwt-rs256, as-jwt-es256, ...]`` the second could never see a token. The
    gateway refuses such a chain at start instead of surprising you at run time: list several
    audiences (and algorithms) in one provider, or use one route per API."""
    secret = tmp_path / "secret"
    secret.write_text("s")
    config = gateway_config(oidc_provider, upstream_url="http://127.0.0.1:1",
                            client_ca_file=interop_pki.ca_file, secret_file=secret)
    config["routes"].append({"name": "both", "path_prefix": "/both", "auth": {
        "provider": [JWT_RS256, JWT_ES256, INTROSPECTION]}})
    with pytest.raises(ConfigError) as info:
        load_config_text(yaml.safe_dump(config), base_dir=tmp_path)
    assert info.value.problems == [
        f'routes[3].auth.provider: "{JWT_ES256}" can never be reached: "{JWT_RS256}" claims '
        f"every JWT of issuer {oidc_provider.info.issuer}"]


def foreign_jwt(client: ClientIdentity) -> str:
    """A well-formed, certificate-bound JWT access token from an issuer the gateway does not
    know (no JWT provider claims it, so the chain hands it to introspection)."""
    now = int(time.time())
    claims = {"iss": "https://other-issuer.example", "aud": RESOURCE_JWT_RS256,
              "sub": client.client_id, "client_id": client.client_id, "scope": SCOPE,
              "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex,
              "cnf": {"x5t#S256": client.thumbprint}}
    return jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256",
                      headers={"typ": "at+jwt", "kid": "other"})


async def test_jwt_of_an_unknown_issuer_is_an_invalid_token(
        gateway: InteropGateway, interop_pki: InteropPKI) -> None:
    client = interop_pki.client_a
    token = foreign_jwt(client)
    reply = await gateway.request("/rs256/accounts/42", client, token)
    # oidc-provider answers 400 unsupported_token_type for JWTs: the AS does not know it
    assert_refused(reply, gateway, token, status=401, error="invalid_token",
                   reason="token_unknown")


async def test_tokens_a_client_chooses_cannot_open_the_introspection_breaker(
        gateway: InteropGateway, oidc_provider: OidcProvider, interop_pki: InteropPKI,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mtls_gateway.access")
    attacker, victim = interop_pki.client_b, interop_pki.client_a
    threshold = gateway.introspection().provider.failure_threshold
    for _ in range(threshold):
        await gateway.request("/rs256/x", attacker, foreign_jwt(attacker))
    token = (await fetch_token(oidc_provider, victim, resource=RESOURCE_OPAQUE)).access_token
    reply = await gateway.request("/rs256/x", victim, token)
    assert reply.status == 200, (reply.body, _reasons(decisions(caplog)))


def _reasons(log: Sequence[dict[str, Any]]) -> list[tuple[int, str]]:
    return [(d["status"], d["reason"]) for d in log]


# ---- the gateway's own client at the AS ----------------------------------------------------


async def test_introspection_client_secret_with_reserved_characters(
        gateway: InteropGateway, oidc_provider: OidcProvider, interop_pki: InteropPKI) -> None:
    """client_secret_basic form-urlencodes id and secret (RFC 6749 section 2.3.1) before the
    Basic encoding and oidc-provider decodes them: the shared AS's secret has ``: / + = % &``,
    a space, ``?`` and ``#``, and the gateway must still authenticate (else: 503)."""
    assert set(RESERVED_SECRET_CHARACTERS) <= set(oidc_provider.gateway_client_secret)
    assert oidc_provider.gateway_client_id == GATEWAY_CLIENT_ID
    client = interop_pki.client_a
    token = (await fetch_token(oidc_provider, client, resource=RESOURCE_OPAQUE)).access_token
    reply = await gateway.request("/rs256/accounts/42", client, token)
    assert reply.status == 200, reply.body
    assert gateway.introspection().stats.calls == 1
