"""The interop authorization server itself, over real mutual TLS (no gateway involved yet)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import jwt
import pytest

from mtls_gateway.pki import issue_client
from oidc_server import (
    RESOURCE_JWT_ES256,
    RESOURCE_JWT_RS256,
    RESOURCE_OPAQUE,
    SCOPE,
    SERVER_SCRIPT,
    ClientIdentity,
    InteropPKI,
    OidcProvider,
    TokenRequestError,
    client_identity,
    client_metadata,
    fetch_discovery,
    fetch_jwks,
    fetch_token,
    introspect,
    revoke,
    rotate_keys,
    verify_jwt,
)

JWT_RESOURCES = [(RESOURCE_JWT_RS256, "RS256"), (RESOURCE_JWT_ES256, "ES256")]
ALL_RESOURCES = [RESOURCE_JWT_RS256, RESOURCE_JWT_ES256, RESOURCE_OPAQUE]


def identity(pki: InteropPKI, name: str | None) -> ClientIdentity | None:
    return None if name is None else getattr(pki, name)


async def confirmation(provider: OidcProvider, token: str, resource: str) -> dict[str, Any] | None:
    """The token's ``cnf`` claim: from the verified JWT, or from introspection if opaque."""
    if resource == RESOURCE_OPAQUE:
        body = await introspect(provider, token)
        assert body["active"] is True
    else:
        body = verify_jwt(token, await fetch_jwks(provider), audience=resource,
                          issuer=provider.issuer)
    cnf: dict[str, Any] | None = body.get("cnf")
    return cnf


async def test_discovery_advertises_mtls(oidc_provider: OidcProvider) -> None:
    meta = await fetch_discovery(oidc_provider)
    assert meta["issuer"] == oidc_provider.issuer
    assert meta["tls_client_certificate_bound_access_tokens"] is True
    assert {"tls_client_auth", "self_signed_tls_client_auth", "client_secret_basic"} <= set(
        meta["token_endpoint_auth_methods_supported"]
    )
    assert meta["jwks_uri"] == oidc_provider.info.jwks_uri
    assert meta["introspection_endpoint"] == oidc_provider.info.introspection_endpoint


@pytest.mark.parametrize(("resource", "alg"), JWT_RESOURCES)
async def test_jwt_access_token_is_bound_to_client_a(
    oidc_provider: OidcProvider, interop_pki: InteropPKI, resource: str, alg: str
) -> None:
    client = interop_pki.client_a
    token = await fetch_token(oidc_provider, client, resource=resource, scope=SCOPE)
    assert token.token_type == "Bearer"
    assert token.scope == SCOPE

    header = jwt.get_unverified_header(token.access_token)
    assert header["alg"] == alg
    assert header["typ"] == "at+jwt"
    jwks = await fetch_jwks(oidc_provider)
    assert header["kid"] in {k["kid"] for k in jwks["keys"]}

    claims = verify_jwt(token.access_token, jwks, audience=resource, issuer=oidc_provider.issuer)
    assert claims["aud"] == resource
    assert claims["client_id"] == client.client_id
    assert claims["scope"] == SCOPE
    assert claims["cnf"] == {"x5t#S256": client.thumbprint}


async def test_opaque_token_introspected_by_gateway(
    oidc_provider: OidcProvider, interop_pki: InteropPKI
) -> None:
    client = interop_pki.client_a
    token = await fetch_token(oidc_provider, client, resource=RESOURCE_OPAQUE)
    assert token.access_token.count(".") == 0  # opaque, not a JWT

    body = await introspect(oidc_provider, token.access_token)
    assert body["active"] is True
    assert body["client_id"] == client.client_id
    assert body["aud"] == RESOURCE_OPAQUE
    assert body["scope"] == SCOPE
    assert body["iss"] == oidc_provider.issuer
    assert body["cnf"] == {"x5t#S256": client.thumbprint}


@pytest.mark.parametrize("resource", ALL_RESOURCES)
@pytest.mark.parametrize("name", ["client_a", "client_b", "self_signed"])
async def test_bound_clients_get_their_own_thumbprint(
    oidc_provider: OidcProvider, interop_pki: InteropPKI, name: str, resource: str
) -> None:
    client = getattr(interop_pki, name)
    token = await fetch_token(oidc_provider, client, resource=resource)
    assert await confirmation(oidc_provider, token.access_token, resource) == {
        "x5t#S256": client.thumbprint
    }


def test_client_thumbprints_are_distinct(interop_pki: InteropPKI) -> None:
    prints = {c.thumbprint for c in interop_pki.clients}
    assert len(prints) == len(interop_pki.clients)
    assert interop_pki.client_a.subject_dn != interop_pki.client_b.subject_dn


@pytest.mark.parametrize("resource", ALL_RESOURCES)
async def test_unbound_client_token_has_no_cnf(
    oidc_provider: OidcProvider, interop_pki: InteropPKI, resource: str
) -> None:
    token = await fetch_token(oidc_provider, interop_pki.unbound, resource=resource)
    assert await confirmation(oidc_provider, token.access_token, resource) is None


async def test_default_resource_applies_without_resource_parameter(
    oidc_provider: OidcProvider, interop_pki: InteropPKI
) -> None:
    token = await fetch_token(oidc_provider, interop_pki.client_a, resource=None)
    body = await introspect(oidc_provider, token.access_token)
    assert body["aud"] == oidc_provider.default_resource


@pytest.mark.parametrize(
    ("cert", "client_id", "status", "error"),
    [
        # client B's CA-issued certificate under client A's id: subject DN mismatch
        ("client_b", "client-a", 401, "invalid_client"),
        # a certificate that does not chain to the CA cannot do tls_client_auth
        ("self_signed", "client-a", 401, "invalid_client"),
        # client A's certificate is not the one the self-signed client registered
        ("client_a", "client-self-signed", 401, "invalid_client"),
        # no certificate at all
        (None, "client-a", 401, "invalid_client"),
        (None, "client-self-signed", 401, "invalid_client"),
        # the gateway client must use its secret
        ("client_a", "mtls-gateway", 401, "invalid_client"),
    ],
)
async def test_token_request_rejects_wrong_certificate(
    oidc_provider: OidcProvider, interop_pki: InteropPKI,
    cert: str | None, client_id: str, status: int, error: str,
) -> None:
    with pytest.raises(TokenRequestError) as raised:
        await fetch_token(oidc_provider, identity(interop_pki, cert), client_id=client_id,
                          resource=RESOURCE_OPAQUE)
    assert raised.value.status == status
    assert raised.value.error == error


async def test_unknown_resource_is_invalid_target(
    oidc_provider: OidcProvider, interop_pki: InteropPKI
) -> None:
    with pytest.raises(TokenRequestError) as raised:
        await fetch_token(oidc_provider, interop_pki.client_a,
                          resource="https://api.example.test/unknown")
    assert raised.value.error == "invalid_target"


@pytest.mark.parametrize(
    ("caller", "visible"),
    [(None, True), ("client_a", True), ("client_b", False)],  # None: the gateway's secret
)
async def test_introspection_policy(
    oidc_provider: OidcProvider, interop_pki: InteropPKI, caller: str | None, visible: bool
) -> None:
    token = await fetch_token(oidc_provider, interop_pki.client_a, resource=RESOURCE_OPAQUE)
    body = await introspect(oidc_provider, token.access_token,
                            client=identity(interop_pki, caller))
    assert body["active"] is visible


@pytest.mark.parametrize(
    ("revoker", "revoked"),
    [(None, True), ("client_a", True), ("client_b", False)],  # None: the gateway's secret
)
async def test_revocation(
    oidc_provider: OidcProvider, interop_pki: InteropPKI, revoker: str | None, revoked: bool
) -> None:
    token = await fetch_token(oidc_provider, interop_pki.client_a, resource=RESOURCE_OPAQUE)
    assert (await introspect(oidc_provider, token.access_token))["active"] is True

    assert await revoke(oidc_provider, token.access_token,
                        client=identity(interop_pki, revoker)) == 200
    body = await introspect(oidc_provider, token.access_token)
    assert body["active"] is (not revoked)


async def test_jwt_cannot_be_introspected(
    oidc_provider: OidcProvider, interop_pki: InteropPKI
) -> None:
    token = await fetch_token(oidc_provider, interop_pki.client_a, resource=RESOURCE_JWT_RS256)
    body = await introspect(oidc_provider, token.access_token)
    assert body["error"] == "unsupported_token_type"


@pytest.mark.parametrize("retain_previous", [False, True])
async def test_key_rotation(
    start_oidc_provider: Callable[..., OidcProvider], interop_pki: InteropPKI,
    retain_previous: bool,
) -> None:
    provider = start_oidc_provider()
    client = interop_pki.client_a
    before = {r: (await fetch_token(provider, client, resource=r)).access_token
              for r, _ in JWT_RESOURCES}
    opaque = (await fetch_token(provider, client, resource=RESOURCE_OPAQUE)).access_token
    jwks_before = await fetch_jwks(provider)
    old_kids = set(provider.info.kids.values())
    assert {k["kid"] for k in jwks_before["keys"]} == old_kids

    rotated = await rotate_keys(provider, retain_previous=retain_previous)
    new_kids = set(rotated["kids"].values())
    assert new_kids.isdisjoint(old_kids)

    jwks_after = await fetch_jwks(provider)
    assert jwks_after != jwks_before
    published = {k["kid"] for k in jwks_after["keys"]}
    assert published == (new_kids | old_kids if retain_previous else new_kids)

    for resource, alg in JWT_RESOURCES:
        fresh = (await fetch_token(provider, client, resource=resource)).access_token
        header = jwt.get_unverified_header(fresh)
        assert header["kid"] == rotated["kids"][alg]
        claims = verify_jwt(fresh, jwks_after, audience=resource, issuer=provider.issuer)
        assert claims["cnf"] == {"x5t#S256": client.thumbprint}

        old = before[resource]
        if retain_previous:
            verify_jwt(old, jwks_after, audience=resource, issuer=provider.issuer)
        else:
            with pytest.raises(jwt.InvalidTokenError):
                verify_jwt(old, jwks_after, audience=resource, issuer=provider.issuer)

    # Opaque tokens live in the AS token store, which the rotation keeps.
    assert (await introspect(provider, opaque))["active"] is True


async def test_extra_clients_and_expired_certificate(
    start_oidc_provider: Callable[..., OidcProvider], interop_pki: InteropPKI
) -> None:
    ca, directory = interop_pki.ca, interop_pki.directory
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    fresh = client_identity("client-extra", issue_client(ca, "client-extra"), directory)
    expired = client_identity(
        "client-expired", issue_client(ca, "client-expired", days=1, not_before=long_ago), directory
    )
    provider = start_oidc_provider(
        extra_clients=[client_metadata(fresh, bound=True), client_metadata(expired, bound=True)]
    )

    token = await fetch_token(provider, fresh, resource=RESOURCE_OPAQUE)
    assert (await introspect(provider, token.access_token))["cnf"] == {
        "x5t#S256": fresh.thumbprint
    }
    # The TLS layer lets it through (rejectUnauthorized: false); the chain check fails.
    with pytest.raises(TokenRequestError) as raised:
        await fetch_token(provider, expired, resource=RESOURCE_OPAQUE)
    assert raised.value.error == "invalid_client"


def test_server_never_exports_generated_keys_with_key_object_export() -> None:
    """Regression guard for the start-up/rotation hang (see newSigningKeys in server.mjs).

    On Node.js 20, ``generateKeyPairSync(...).privateKey.export({ format: 'jwk' })`` can
    deadlock the process (the export holds the key's mutex, a garbage collection during it
    finalises the key's generation job, whose destructor takes the same mutex). server.mjs must
    have generateKeyPairSync encode the keys itself.
    """
    source = SERVER_SCRIPT.read_text()
    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith("//"))
    assert ".export(" not in code
    assert "privateKeyEncoding: { format: 'jwk' }" in code
