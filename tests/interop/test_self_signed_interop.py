"""``listen.client_ca: any`` against a real authorization server (node-oidc-provider), issue 7.

The self_signed_tls_client_auth client (RFC 8705 section 2.2) gets a certificate-bound token
from the AS over mutual TLS, then calls the gateway, whose configuration names no client CA
and does not contain the client's certificate: the handshake accepts it, the binding decides.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

import pytest
from test_gateway_interop import (
    PROVIDER_FOR,
    RESOURCE_IDS,
    ROUTE_FOR,
    InteropGateway,
    assert_refused,
    decisions,
    start_gateway,  # noqa: F401 - the fixture start_any_gateway uses
)

from mtls_gateway.pki import self_signed_client
from oidc_server import (
    RESOURCE_JWT_ES256,
    RESOURCE_JWT_RS256,
    RESOURCE_OPAQUE,
    SCOPE,
    ClientIdentity,
    InteropPKI,
    OidcProvider,
    client_identity,
    fetch_token,
)

AnyGatewayFactory = Callable[[OidcProvider], Awaitable[InteropGateway]]


@pytest.fixture
def start_any_gateway(request: pytest.FixtureRequest) -> AnyGatewayFactory:
    """The interop gateway layout in ``client_ca: any`` mode (no client CA bundle at all)."""
    return functools.partial(request.getfixturevalue("start_gateway"), client_ca="any")


@pytest.fixture(scope="module")
def intruder(interop_pki: InteropPKI, tmp_path_factory: pytest.TempPathFactory) -> ClientIdentity:
    """Another self-signed certificate with the registered client's subject, unknown to the AS."""
    # make_interop_pki names the registered client's certificate CN=client-self-signed
    return client_identity("client-self-signed", self_signed_client("client-self-signed"),
                           tmp_path_factory.mktemp("intruder"), self_signed=True)


RESOURCES = [RESOURCE_JWT_RS256, RESOURCE_JWT_ES256, RESOURCE_OPAQUE]


@pytest.mark.parametrize("resource", RESOURCES, ids=RESOURCE_IDS.get)
@pytest.mark.parametrize(("presenter", "status", "reason"), [
    ("own", 200, "allowed"),
    ("intruder", 401, "binding_mismatch"),
])
async def test_self_signed_client_token_end_to_end(
        start_any_gateway: AnyGatewayFactory, oidc_provider: OidcProvider,
        interop_pki: InteropPKI, intruder: ClientIdentity, caplog: pytest.LogCaptureFixture,
        resource: str, presenter: str, status: int, reason: str) -> None:
    caplog.set_level(logging.INFO, "mtls_gateway.access")
    owner = interop_pki.self_signed
    assert intruder.subject_dn == owner.subject_dn and intruder.thumbprint != owner.thumbprint
    cert = owner if presenter == "own" else intruder
    token = (await fetch_token(oidc_provider, owner, resource=resource, scope=SCOPE)).access_token
    gw = await start_any_gateway(oidc_provider)
    path = ROUTE_FOR[resource] + "/accounts/42"

    reply = await gw.request(path, cert, token)

    if status == 200:
        assert reply.status == 200, reply.body
        assert [s.path_qs for s in gw.upstream.seen] == [path]
        seen = gw.upstream.seen[0].headers
        assert seen["x-client-cert-thumbprint"] == [owner.thumbprint]
        assert seen["x-auth-client-id"] == [owner.client_id]
    else:
        assert_refused(reply, gw, token, status=status, error="invalid_token", reason=reason)
    (decision,) = decisions(caplog)
    assert (decision["reason"], decision["provider"]) == (reason, PROVIDER_FOR[resource])
    assert decision["client_thumbprint"] == cert.thumbprint


async def test_ca_issued_clients_work_unchanged_in_any_mode(
        start_any_gateway: AnyGatewayFactory, oidc_provider: OidcProvider,
        interop_pki: InteropPKI) -> None:
    a, b = interop_pki.client_a, interop_pki.client_b
    token = (await fetch_token(oidc_provider, a, resource=RESOURCE_JWT_RS256)).access_token
    gw = await start_any_gateway(oidc_provider)
    assert (await gw.request("/rs256/x", a, token)).status == 200
    reply = await gw.request("/rs256/y", b, token)
    assert reply.status == 401 and reply.json()["reason"] == "binding_mismatch"
    assert [s.path_qs for s in gw.upstream.seen] == ["/rs256/x"]
