"""Token endpoint routes (auth: mtls_client): client_id, RFC 6749 s5.2 refusals, Client-Cert.

End-to-end over real mutual TLS: the gateway in front of a recording upstream standing in
for the authorization server. Every refusal asserts the answer and that the upstream saw
nothing.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import ssl
from collections.abc import Awaitable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import pytest
from cryptography import x509

from gwtest import GatewayFactory, Pki, Reply, RunningGateway, Upstream, base_config
from mtls_gateway import pki as pki_mod
from mtls_gateway.errors import InvalidClient, InvalidTokenRequest
from mtls_gateway.token_endpoint import basic_client_id, client_id_of

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def basic(client_id: str, secret: str = "") -> str:
    raw = f"{quote(client_id, safe='')}:{quote(secret, safe='')}".encode()
    return "Basic " + base64.b64encode(raw).decode()


# --- client_id from the body and HTTP Basic -----------------------------------------------

@pytest.mark.parametrize(("body", "auth", "expected"), [
    (b"grant_type=client_credentials&client_id=client-a", [], ("client-a", False)),
    (b"client_id=client-a", [basic("client-a")], ("client-a", True)),
    (b"client_id=a%3Ab+c", [basic("a:b c", "s:e/c")], ("a:b c", True)),  # RFC 6749 s2.3.1
    (b"client_id=client-a", ["Bearer xyz"], ("client-a", False)),        # not credentials
])
def test_client_id_accepted(body: bytes, auth: list[str], expected: tuple[str, bool]) -> None:
    assert client_id_of(body, auth) == expected


@pytest.mark.parametrize(("body", "auth", "error", "reason"), [
    (b"grant_type=client_credentials", [], InvalidClient, "client_id_missing"),
    (b"client_id=", [], InvalidClient, "client_id_missing"),
    (b"grant_type=x", [basic("client-a")], InvalidClient, "client_id_missing"),  # body required
    (b"client_id=client-a", [basic("client-b")], InvalidClient, "client_id_mismatch"),
    (b"client_id=client-a", ["Basic !!!"], InvalidClient, "client_auth_malformed"),
    (b"client_id=client-a", ["Basic " + base64.b64encode(b"no-colon").decode()], InvalidClient,
     "client_auth_malformed"),
    (b"client_id=a&client_id=b", [], InvalidTokenRequest, "token_request_malformed"),
    (b"client_id=client-a", [basic("client-a"), basic("client-a")], InvalidTokenRequest,
     "token_request_malformed"),
    (b"client_id=\xff", [], InvalidTokenRequest, "token_request_malformed"),
])
def test_client_id_refused(body: bytes, auth: list[str], error: type[Exception],
                           reason: str) -> None:
    with pytest.raises(error) as info:
        client_id_of(body, auth)
    assert getattr(info.value, "reason", None) == reason


def test_basic_without_basic_is_none() -> None:
    assert basic_client_id([]) is None


# --- through the gateway ------------------------------------------------------------------

def token_config(pki: Pki, upstream: Upstream, clients: list[dict[str, Any]],
                 **mtls_client: Any) -> dict[str, Any]:
    config = base_config(pki, None, upstream)
    config["client_registries"] = {"partners": {"clients": clients, "ca_file": str(pki.ca_file)}}
    config["routes"] = [{"name": "token", "path": "/token", "methods": ["POST"],
                         "auth": {"mtls_client": {"registry": "partners", **mtls_client}}},
                        {"name": "public", "path_prefix": "/public", "auth": "none"}]
    return config


CLIENT_A = {"client_id": "client-a", "token_endpoint_auth_method": "tls_client_auth",
            "tls_client_auth_subject_dn": "CN=client-a,O=mtls-gateway test"}


@pytest.fixture
async def token_gateway(make_gateway: GatewayFactory, pki: Pki,
                        upstream: Upstream) -> RunningGateway:
    return await make_gateway(token_config(pki, upstream, [CLIENT_A],
                                           client_header="X-OAuth-Client"))


def client_cert_der(value: str) -> bytes:
    """Parse an RFC 9440 Client-Cert value (a structured-field byte sequence)."""
    match = re.fullmatch(r":([A-Za-z0-9+/]*={0,2}):", value)
    assert match, value
    return base64.b64decode(match.group(1), validate=True)


async def test_authenticated_client_reaches_the_as_with_its_certificate(
        token_gateway: RunningGateway, upstream: Upstream, pki: Pki,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mtls_gateway.access")
    body = urlencode({"grant_type": "client_credentials", "client_id": "client-a",
                      "scope": "accounts:read"}).encode()
    forged = pki_mod.self_signed_client("forged").cert_der
    reply = await token_gateway.request(
        "/token", method="POST", data=body,
        headers=[*FORM.items(), ("Client-Cert", f":{base64.b64encode(forged).decode()}:"),
                 ("X-OAuth-Client", "client-b"), ("Authorization", basic("client-a", "ignored"))])
    assert reply.status == 200, reply.body
    [seen] = upstream.seen
    assert seen.method == "POST" and seen.path_qs == "/token"
    assert seen.body_sha256 == hashlib.sha256(body).hexdigest()       # body unchanged
    assert seen.headers["x-oauth-client"] == ["client-a"]             # forged copy gone
    [cert_header] = seen.headers["client-cert"]                       # forged copy gone
    cert = x509.load_der_x509_certificate(client_cert_der(cert_header))
    assert cert == x509.load_pem_x509_certificate(pki.clients["a"].cert.read_bytes())
    assert seen.headers["authorization"] == [basic("client-a", "ignored")]  # for the AS to judge
    [decision] = [r.decision for r in caplog.records  # type: ignore[attr-defined]
                  if r.name == "mtls_gateway.access"]
    assert (decision["decision"], decision["reason"], decision["route"], decision["client_id"]) \
        == ("allow", "client_authenticated", "token", "client-a")


@pytest.mark.parametrize(("cert", "form", "headers", "reason", "challenge"), [
    ("b", {"client_id": "client-a"}, {}, "client_cert_mismatch", False),  # same CA, other DN
    ("stranger", {"client_id": "client-a"}, {}, None, False),             # refused in TLS
    (None, {"client_id": "client-a"}, {}, "client_cert_missing", False),
    ("a", {"grant_type": "client_credentials"}, {}, "client_id_missing", False),
    ("a", {"client_id": "client-a"}, {"Authorization": basic("client-b")}, "client_id_mismatch",
     True),
    ("a", {"client_id": "client-z"}, {"Authorization": basic("client-z")}, "unknown_client", True),
])
async def test_refused_with_invalid_client(token_gateway: RunningGateway, upstream: Upstream,
                                           cert: str | None, form: dict[str, str],
                                           headers: dict[str, str], reason: str | None,
                                           challenge: bool) -> None:
    if reason is None:   # a certificate from another CA never completes the handshake
        with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
            await token_gateway.request("/token", cert=cert, method="POST", data=form)
        assert upstream.seen == []
        return
    reply = await token_gateway.request("/token", cert=cert, method="POST", data=form,
                                        headers=headers)
    assert reply.status == 401
    assert reply.json() == {"error": "invalid_client", "reason": reason,
                            "error_description": reply.json()["error_description"]}
    assert reply.headers["Cache-Control"] == "no-store"
    assert reply.headers.get("Content-Type", "").startswith("application/json")
    if challenge:
        assert reply.headers["WWW-Authenticate"] == 'Basic realm="mtls-gateway", charset="UTF-8"'
    else:
        assert "WWW-Authenticate" not in reply.headers
    assert upstream.seen == []


@pytest.mark.parametrize(("data", "headers", "reason"), [
    (b"client_id=client-a&x=" + b"y" * 70_000, FORM, "token_request_too_large"),
    (b'{"client_id": "client-a"}', {"Content-Type": "application/json"},
     "token_request_malformed"),
])
async def test_malformed_token_requests(token_gateway: RunningGateway, upstream: Upstream,
                                        data: bytes, headers: dict[str, str],
                                        reason: str) -> None:
    reply = await token_gateway.request("/token", method="POST", data=data, headers=headers)
    assert (reply.status, reply.json()["error"], reply.json()["reason"]) == (
        400, "invalid_request", reason)
    assert "WWW-Authenticate" not in reply.headers
    assert upstream.seen == []


async def test_client_header_is_stripped_on_other_routes(token_gateway: RunningGateway,
                                                         upstream: Upstream) -> None:
    reply = await token_gateway.request("/public/x", headers={"X-OAuth-Client": "client-a"})
    assert reply.status == 200
    assert "x-oauth-client" not in upstream.seen[0].headers


async def _post_token(gw: RunningGateway, ck: pki_mod.CertKey, client_id: str,
                      tmp_path: Path) -> Reply:
    """POST /token on a new connection presenting ``ck`` (a certificate not in the test PKI)."""
    crt, key = ck.write(tmp_path, f"c-{ck.cert.serial_number}")
    ctx = ssl.create_default_context(cafile=str(gw.pki.ca_file))
    ctx.load_cert_chain(crt, key)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s, \
            s.post(gw.url + "/token", data={"client_id": client_id}) as resp:
        return Reply(resp.status, resp.headers, await resp.read())


async def test_self_signed_client_through_the_gateway(
        make_gateway: GatewayFactory, pki: Pki, upstream: Upstream, tmp_path: Path) -> None:
    """section 2.2: the listener accepts each registered self-signed certificate as itself
    (never as a CA: the bundle is the test CA alone), the registry checks it against the
    client's jwks; another registered self-signed certificate is refused for client-s."""
    def ss(cn: str) -> pki_mod.CertKey:
        return pki_mod.self_signed_client(cn)

    def jwks(ck: pki_mod.CertKey) -> dict[str, Any]:
        return {"keys": [{"kty": "EC", "x5c": [base64.b64encode(ck.cert_der).decode()]}]}

    mine, other, unregistered = ss("self-1"), ss("self-2"), ss("self-3")
    # a self-signed certificate with the DN of a tls_client_auth client is not that client
    impostor = ss("client-a")
    method = {"token_endpoint_auth_method": "self_signed_tls_client_auth"}
    clients = [{"client_id": "client-s", **method, "jwks": jwks(mine)},
               {"client_id": "client-o", **method, "jwks": jwks(other)},
               {"client_id": "client-i", **method, "jwks": jwks(impostor)}, CLIENT_A]
    gw = await make_gateway(token_config(pki, upstream, clients))

    def post(ck: pki_mod.CertKey, client_id: str) -> Awaitable[Reply]:
        return _post_token(gw, ck, client_id, tmp_path)

    reply = await post(other, "client-s")
    assert (reply.status, reply.json()["reason"]) == (401, "client_cert_mismatch")
    reply = await post(impostor, "client-a")
    assert (reply.status, reply.json()["reason"]) == (401, "client_cert_untrusted")
    with pytest.raises((aiohttp.ClientError, ssl.SSLError)):    # not registered: no handshake
        await post(unregistered, "client-s")
    assert upstream.seen == []
    reply = await post(mine, "client-s")
    assert reply.status == 200
    assert client_cert_der(upstream.seen[0].headers["client-cert"][0]) == mine.cert_der


async def test_registry_ca_file_narrows_the_listener_trust(
        make_gateway: GatewayFactory, pki: Pki, upstream: Upstream, tmp_path: Path) -> None:
    """The listener trusts the test CA, the registry only another CA: client-a is refused."""
    other_ca, _ = pki_mod.make_ca("registry-only CA").write(tmp_path, "registry-ca")
    config = token_config(pki, upstream, [CLIENT_A])
    config["client_registries"]["partners"]["ca_file"] = str(other_ca)
    gw = await make_gateway(config)
    reply = await gw.request("/token", method="POST", data={"client_id": "client-a"})
    assert (reply.status, reply.json()["reason"]) == (401, "client_cert_untrusted")
    config["client_registries"]["partners"]["ca_file"] = str(pki.ca_file)
    gw = await make_gateway(config)
    reply = await gw.request("/token", method="POST", data={"client_id": "client-a"})
    assert reply.status == 200
    assert len(upstream.seen) == 1


async def test_token_endpoint_on_a_client_ca_any_listener(
        make_gateway: GatewayFactory, pki: Pki, upstream: Upstream, tmp_path: Path) -> None:
    """Under ``client_ca: any`` the handshake vouches for no name: a self-signed client is
    matched by its exact certificate, a tls_client_auth client by the registry ``ca_file``
    (required there), so a self-signed certificate claiming client-a's DN is refused."""
    mine, other = pki_mod.self_signed_client("self-1"), pki_mod.self_signed_client("self-2")
    impostor = pki_mod.self_signed_client("client-a")
    client = {"client_id": "client-s", "token_endpoint_auth_method": "self_signed_tls_client_auth",
              "jwks": {"keys": [{"kty": "EC", "x5c": [base64.b64encode(mine.cert_der).decode()]}]}}
    config = token_config(pki, upstream, [client, CLIENT_A])
    del config["listen"]["client_ca_file"]
    config["listen"]["client_ca"] = "any"
    config["client_registries"]["partners"]["ca_file"] = str(pki.ca_file)
    gw = await make_gateway(config)

    def post(ck: pki_mod.CertKey, client_id: str) -> Awaitable[Reply]:
        return _post_token(gw, ck, client_id, tmp_path)

    assert (await post(other, "client-s")).json()["reason"] == "client_cert_mismatch"
    assert (await post(impostor, "client-a")).json()["reason"] == "client_cert_untrusted"
    assert upstream.seen == []
    assert (await post(mine, "client-s")).status == 200
    assert client_cert_der(upstream.seen[0].headers["client-cert"][0]) == mine.cert_der
    reply = await gw.request("/token", method="POST", data={"client_id": "client-a"})
    assert reply.status == 200 and len(upstream.seen) == 2
