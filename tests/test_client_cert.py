"""The client certificate from a trusted front proxy's header, end to end on real sockets.

Every refusal asserts the answer and that the upstream saw nothing.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gwtest import (
    GatewayFactory,
    Issuer,
    Pki,
    Reply,
    RunningGateway,
    Upstream,
    base_config,
    big_certificate_chain,
)
from mtls_gateway.cert_headers import encode_client_cert
from mtls_gateway.thumbprint import x5t_s256

PROXY_URI = "spiffe://cluster.local/ns/edge/sa/ingress"


def header_config(pki: Pki, issuer: Issuer, upstream: Upstream, *, fmt: str = "rfc9440",
                  tls: bool = True, **trusted: Any) -> dict[str, Any]:
    config = base_config(pki, issuer, upstream)
    config["listen"]["tls"] = tls
    if trusted.get("subjects") or trusted.get("sans"):   # names count only from the proxy CA
        trusted = {**trusted, "ca_file": str(pki.ca_file)}
    config["listen"]["client_certificate"] = {"source": "header", "format": fmt,
                                              "trusted_proxies": trusted}
    return config


async def plain_request(gw: RunningGateway, path: str, *, token: str | None = None,
                        headers: list[tuple[str, str]] | None = None) -> Reply:
    """A request over plain HTTP, as a front proxy in the same pod would send it."""
    hdrs = list(headers or [])
    if token is not None:
        hdrs.append(("Authorization", f"Bearer {token}"))
    async with aiohttp.ClientSession() as s, \
            s.get(f"http://127.0.0.1:{gw.server.port}{path}", headers=hdrs) as resp:
        return Reply(resp.status, resp.headers, await resp.read())


def xfcc(der: bytes, *, by: str = "spiffe://cluster.local/ns/api/sa/gw") -> str:
    pem = x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM).decode()
    return (f'By={by};Hash={hashlib.sha256(der).hexdigest()};Cert="{quote(pem, safe="")}";'
            f'Subject="CN=x"')


def url_pem(der: bytes) -> str:
    pem = x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM).decode()
    return quote(pem, safe="")


FORMATS = {
    "rfc9440": ("Client-Cert", encode_client_cert),
    "xfcc": ("X-Forwarded-Client-Cert", xfcc),
    "pem": ("X-SSL-Client-Cert", url_pem),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
async def test_trusted_proxy_by_cidr_each_format(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream,
        fmt: str) -> None:
    gw = await make_gateway(header_config(pki, issuer, upstream, fmt=fmt, tls=False,
                                          cidrs=["127.0.0.1/32"]))
    header, encode = FORMATS[fmt]
    token = issuer.mint(pki.clients["a"].thumbprint)
    ok = await plain_request(gw, "/accounts", token=token,
                             headers=[(header, encode(pki.clients["a"].der))])
    assert ok.status == 200, ok.body
    [seen] = upstream.seen
    assert seen.headers["x-client-cert-thumbprint"] == [pki.clients["a"].thumbprint]
    assert header.lower() not in seen.headers          # the proxy's header stops here
    wrong = await plain_request(gw, "/accounts", token=token,
                                headers=[(header, encode(pki.clients["b"].der))])
    assert wrong.status == 401
    assert wrong.json()["reason"] == "binding_mismatch"
    assert len(upstream.seen) == 1


@pytest.mark.parametrize(("headers", "status", "reason"), [
    ([], 401, "no_client_cert"),
    ([("Client-Cert", "")], 401, "no_client_cert"),
    ([("Client-Cert", ":bm90IGEgY2VydA==:")], 400, "invalid_client_cert_header"),
    ([("Client-Cert", "garbage")], 400, "invalid_client_cert_header"),
    ([("Client-Cert", "A"), ("Client-Cert", "A")], 400, "duplicate_client_cert_header"),
    ([("Client-Cert-Chain", ":AAAA:")], 400, "invalid_client_cert_header"),
    # The client asks a proxy to treat the certificate header as hop-by-hop: never read.
    ([("Connection", "Client-Cert"), ("Client-Cert", "A")], 401, "no_client_cert"),
    ([("Connection", "keep-alive, client-cert"), ("Client-Cert", "A")], 401, "no_client_cert"),
])
async def test_trusted_proxy_bad_or_missing_header_is_refused(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream,
        headers: list[tuple[str, str]], status: int, reason: str) -> None:
    gw = await make_gateway(header_config(pki, issuer, upstream, tls=False,
                                          cidrs=["127.0.0.0/8"]))
    good = encode_client_cert(pki.clients["a"].der)
    headers = [(k, good if v == "A" else v) for k, v in headers]
    reply = await plain_request(gw, "/accounts", token=issuer.mint(pki.clients["a"].thumbprint),
                                headers=headers)
    assert reply.status == status, reply.body
    assert reply.json()["reason"] == reason
    assert reply.json()["error"] == ("invalid_request" if status == 400 else "invalid_token")
    assert upstream.seen == []


async def test_forged_header_on_untrusted_connection_gets_no_credit(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mtls_gateway.access")
    gw = await make_gateway(header_config(pki, issuer, upstream, tls=False,
                                          cidrs=["10.0.0.0/8", "::1/128"]))
    token = issuer.mint(pki.clients["a"].thumbprint)     # a stolen token, and a's public cert
    reply = await plain_request(gw, "/accounts", token=token,
                                headers=[("Client-Cert", encode_client_cert(pki.clients["a"].der))])
    assert reply.status == 401
    assert reply.json()["reason"] == "no_client_cert"
    assert upstream.seen == []
    assert caplog.records[-1].decision["untrusted_cert_header"] is True  # type: ignore[attr-defined]
    # On a public route the forged header is removed before the upstream sees the request.
    public = await plain_request(gw, "/public/x", headers=[
        ("Client-Cert", encode_client_cert(pki.clients["a"].der)),
        ("X-Forwarded-Client-Cert", xfcc(pki.clients["a"].der))])
    assert public.status == 200
    [seen] = upstream.seen
    assert "client-cert" not in seen.headers and "x-forwarded-client-cert" not in seen.headers


@pytest.mark.parametrize(("trusted", "cert", "trusted_hop"), [
    ({"sans": [f"uri:{PROXY_URI}"]}, "proxy", True),
    ({"subjects": ["CN=edge-proxy,O=mtls-gateway test"]}, "proxy", True),
    ({"subjects": ["O=mtls-gateway test,CN=edge-proxy"]}, "proxy", False),   # DN order counts
    ({"sans": [f"uri:{PROXY_URI}"]}, "b", False),           # a client of the same CA
    ({"sans": [f"uri:{PROXY_URI}"]}, None, False),          # no certificate at all
    ({"sans": [f"uri:{PROXY_URI}"], "cidrs": ["127.0.0.1/32"]}, "proxy", True),
    ({"sans": [f"uri:{PROXY_URI}"], "cidrs": ["10.0.0.0/8"]}, "proxy", False),  # both must hold
    ({"sans": ["dns:edge.example"]}, "proxy", False),
])
async def test_trusted_proxy_by_mtls_identity(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream,
        trusted: dict[str, list[str]], cert: str | None, trusted_hop: bool) -> None:
    gw = await make_gateway(header_config(pki, issuer, upstream, fmt="xfcc", **trusted))
    token = issuer.mint(pki.clients["a"].thumbprint)
    forged = xfcc(pki.clients["b"].der, by="spiffe://evil")
    reply = await gw.request("/accounts", cert=cert, token=token, headers=[
        ("X-Forwarded-Client-Cert", f"{forged},{xfcc(pki.clients['a'].der)}")])
    if trusted_hop:
        assert reply.status == 200, reply.body
        [seen] = upstream.seen
        assert seen.headers["x-client-cert-thumbprint"] == [pki.clients["a"].thumbprint]
        assert "x-forwarded-client-cert" not in seen.headers
    else:
        assert reply.status == 401
        assert reply.json()["reason"] == "no_client_cert"
        assert upstream.seen == []


async def test_the_proxys_own_certificate_never_counts_for_binding(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream) -> None:
    gw = await make_gateway(header_config(pki, issuer, upstream, fmt="xfcc",
                                          sans=[f"uri:{PROXY_URI}"]))
    token = issuer.mint(pki.clients["proxy"].thumbprint)
    reply = await gw.request("/accounts", cert="proxy", token=token)
    assert reply.status == 401
    assert reply.json()["reason"] == "no_client_cert"
    assert upstream.seen == []


@pytest.mark.parametrize(("value", "status", "reason"), [
    ("HASH_A", 200, ""),                                     # Hash= alone binds
    ("HASH_B", 401, "binding_mismatch"),
    ("WRONG_HASH", 400, "invalid_client_cert_header"),              # Cert= and Hash= disagree
    ("By=spiffe://gw", 401, "no_client_cert"),                      # an element without a cert
])
async def test_xfcc_hash_rules_end_to_end(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream,
        value: str, status: int, reason: str) -> None:
    gw = await make_gateway(header_config(pki, issuer, upstream, fmt="xfcc", tls=False,
                                          cidrs=["127.0.0.1/32"]))
    a, b = pki.clients["a"].der, pki.clients["b"].der
    value = {"HASH_A": f"By=x;Hash={hashlib.sha256(a).hexdigest()}",
             "HASH_B": f"Hash={hashlib.sha256(b).hexdigest()}",
             "WRONG_HASH": xfcc(a).replace(hashlib.sha256(a).hexdigest(),
                                           hashlib.sha256(b).hexdigest())}.get(value, value)
    reply = await plain_request(gw, "/accounts", token=issuer.mint(pki.clients["a"].thumbprint),
                                headers=[("X-Forwarded-Client-Cert", value)])
    assert reply.status == status, reply.body
    if status == 200:
        assert upstream.seen[0].headers["x-client-cert-thumbprint"] == [pki.clients["a"].thumbprint]
    else:
        assert reply.json()["reason"] == reason
        assert upstream.seen == []


async def test_a_real_certificate_chain_fits_in_the_header_limit(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream) -> None:
    """XFCC with Cert= and Chain= of a 4096-bit RSA chain is well over 16 KiB."""
    chain = big_certificate_chain()
    pems = [quote(c.public_bytes(Encoding.PEM).decode(), safe="") for c in chain]
    leaf_der = chain[0].public_bytes(Encoding.DER)
    value = (f"Hash={hashlib.sha256(leaf_der).hexdigest()};Cert=\"{pems[0]}\";"
             f"Chain=\"{''.join(pems)}\"")
    assert len(value) > 20_000
    gw = await make_gateway(header_config(pki, issuer, upstream, fmt="xfcc", tls=False,
                                          cidrs=["127.0.0.1/32"]))
    reply = await plain_request(gw, "/accounts", token=issuer.mint(x5t_s256(leaf_der)),
                                headers=[("X-Forwarded-Client-Cert", value)])
    assert reply.status == 200, reply.body
    assert upstream.seen[0].headers["x-client-cert-thumbprint"] == [x5t_s256(leaf_der)]


@pytest.mark.parametrize("mode", ["tls", "header"])
async def test_forward_client_cert_to_the_upstream(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream,
        mode: str) -> None:
    """Opt-in per route: the upstream gets RFC 9440 Client-Cert; inbound copies never pass."""
    config = (header_config(pki, issuer, upstream, fmt="pem", cidrs=["127.0.0.1/32"])
              if mode == "header" else base_config(pki, issuer, upstream))
    config["routes"].insert(0, {"name": "legacy", "path_prefix": "/legacy",
                                "forward_client_cert": True, "auth": {"provider": "corp"}})
    gw = await make_gateway(config)
    a = pki.clients["a"]
    headers = [("Client-Cert", encode_client_cert(pki.clients["b"].der))]   # forged copy
    if mode == "header":
        headers.append(("X-SSL-Client-Cert", url_pem(a.der)))
    token = issuer.mint(a.thumbprint)
    reply = await gw.request("/legacy/x", cert="proxy" if mode == "header" else "a",
                             token=token, headers=headers)
    assert reply.status == 200, reply.body
    assert upstream.seen[0].headers["client-cert"] == [encode_client_cert(a.der)]
    # Routes without the option never send it, and drop the forged copy.
    reply = await gw.request("/accounts", cert="proxy" if mode == "header" else "a",
                             token=token, headers=headers)
    assert reply.status == 200
    assert "client-cert" not in upstream.seen[1].headers


@pytest.mark.parametrize("connection",
                         ["X-Forwarded-Client-Cert", "close, x-forwarded-client-cert"])
async def test_xfcc_named_in_connection_is_never_read(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream,
        connection: str) -> None:
    gw = await make_gateway(header_config(pki, issuer, upstream, fmt="xfcc",
                                          sans=[f"uri:{PROXY_URI}"]))
    reply = await gw.request("/accounts", cert="proxy",
                             token=issuer.mint(pki.clients["a"].thumbprint),
                             headers=[("Connection", connection),
                                      ("X-Forwarded-Client-Cert", xfcc(pki.clients["a"].der))])
    assert reply.status == 401
    assert reply.json()["reason"] == "no_client_cert"
    assert upstream.seen == []


async def test_token_endpoint_behind_a_front_proxy(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream) -> None:
    """auth: mtls_client authenticates the certificate the trusted proxy states; the AS gets it
    as Client-Cert. A Hash=-only XFCC names no certificate body: invalid_client."""
    config = header_config(pki, issuer, upstream, fmt="xfcc", tls=False, cidrs=["127.0.0.1/32"])
    config["client_registries"] = {"partners": {"clients": [{
        "client_id": "client-a", "token_endpoint_auth_method": "tls_client_auth",
        "tls_client_auth_subject_dn": "CN=client-a,O=mtls-gateway test"}],
        "ca_file": str(pki.ca_file)}}
    config["routes"].insert(0, {"name": "token", "path": "/token", "methods": ["POST"],
                                "auth": {"mtls_client": {"registry": "partners"}}})
    gw = await make_gateway(config)
    a, b = pki.clients["a"].der, pki.clients["b"].der

    async def post(xfcc_value: str) -> Reply:
        async with aiohttp.ClientSession() as s, s.post(
                f"http://127.0.0.1:{gw.server.port}/token", data={"client_id": "client-a"},
                headers={"X-Forwarded-Client-Cert": xfcc_value}) as resp:
            return Reply(resp.status, resp.headers, await resp.read())

    ok = await post(xfcc(a))
    assert ok.status == 200, ok.body
    assert upstream.seen[0].headers["client-cert"] == [encode_client_cert(a)]
    for value in (xfcc(b), f"Hash={hashlib.sha256(a).hexdigest()}"):
        refused = await post(value)
        assert refused.status == 401
        assert refused.json()["error"] == "invalid_client"
    assert len(upstream.seen) == 1


@pytest.mark.parametrize(("fmt", "value"), [
    # Found by tests/test_fuzz.py: %-escapes that decode to bytes that are not UTF-8 made
    # urllib's strict unquote raise UnicodeDecodeError, a 500 instead of a 400.
    ("xfcc", 'Hash=00;Cert="%9A%9A"'),
    ("xfcc", 'Cert="-----BEGIN%20CERTIFICATE-----%0AMII%FF%0A"'),
    ("xfcc", 'Chain="%C3%28"'),
    ("pem", "%9A"),
    ("pem", "-----BEGIN%20CERTIFICATE-----%0A%E2%82%0A-----END%20CERTIFICATE-----"),
])
async def test_url_encoded_bytes_that_are_not_utf8_are_a_400(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream,
        fmt: str, value: str) -> None:
    gw = await make_gateway(header_config(pki, issuer, upstream, fmt=fmt, tls=False,
                                          cidrs=["127.0.0.0/8"]))
    header = FORMATS[fmt][0]
    reply = await plain_request(gw, "/accounts", token=issuer.mint(pki.clients["a"].thumbprint),
                                headers=[(header, value)])
    assert reply.status == 400, reply.body
    assert reply.json()["reason"] == "invalid_client_cert_header"
    assert upstream.seen == []


def _der_with_a_mangled_subject(der: bytes) -> bytes:
    """A one-byte change of ``der`` that still loads as canonical DER but whose subject
    does not parse (cryptography parses names lazily)."""
    import warnings
    for pos in range(len(der)):
        for byte in (0x00, 0x2B, 0x7F, 0xFF):
            cand = der[:pos] + bytes([byte]) + der[pos + 1:]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    cert = x509.load_der_x509_certificate(cand)
                    if cert.public_bytes(Encoding.DER) != cand:
                        continue
                except (ValueError, x509.InvalidVersion):
                    continue
                try:
                    cert.subject.rfc4514_string()
                except ValueError:
                    return cand
    raise AssertionError("no such mutation found")


def _der_with_an_invalid_version(der: bytes) -> bytes:
    """``der`` with the X.509 version set to 44 (v3 is 2): cryptography raises InvalidVersion,
    which is not a ValueError."""
    marker = bytes([0xA0, 0x03, 0x02, 0x01, 0x02])     # [0] EXPLICIT INTEGER 2
    assert marker in der
    return der.replace(marker, marker[:-1] + bytes([0x2B]), 1)


@pytest.mark.parametrize("mangle", [_der_with_an_invalid_version])
@pytest.mark.parametrize("fmt", ["rfc9440"])
async def test_certificate_with_an_invalid_version_is_a_400(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream,
        fmt: str, mangle: Any) -> None:
    """Found while writing the test below: cryptography's InvalidVersion escaped the header
    parser (500)."""
    gw = await make_gateway(header_config(pki, issuer, upstream, fmt=fmt, tls=False,
                                          cidrs=["127.0.0.0/8"]))
    header, encode = FORMATS[fmt]
    reply = await plain_request(gw, "/accounts", token=issuer.mint(pki.clients["a"].thumbprint),
                                headers=[(header, encode(mangle(pki.clients["a"].der)))])
    assert reply.status == 400, reply.body
    assert reply.json()["reason"] == "invalid_client_cert_header"
    assert upstream.seen == []


@pytest.mark.parametrize("fmt", sorted(FORMATS))
async def test_certificate_with_unparseable_fields_is_a_400(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream,
        fmt: str) -> None:
    """Found by tests/test_fuzz.py: such a certificate passed the header parser and made
    describe_certificate raise (500) when the gateway first read its subject."""
    gw = await make_gateway(header_config(pki, issuer, upstream, fmt=fmt, tls=False,
                                          cidrs=["127.0.0.0/8"]))
    header, encode = FORMATS[fmt]
    mangled = _der_with_a_mangled_subject(pki.clients["a"].der)
    reply = await plain_request(gw, "/accounts", token=issuer.mint(pki.clients["a"].thumbprint),
                                headers=[(header, encode(mangled))])
    assert reply.status == 400, reply.body
    assert reply.json()["reason"] == "invalid_client_cert_header"
    assert upstream.seen == []
