"""Client registry: RFC 8705 section 2.1.2 (PKI) and 2.2 (self-signed) matching, real certs."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gwtest import LoopbackServer, Pki
from mtls_gateway import pki as pki_mod
from mtls_gateway.client_registry import ClientRegistry, dn_matches, parse_dn
from mtls_gateway.config import ClientRegistration, ClientRegistryConfig
from mtls_gateway.errors import DependencyDown, InvalidClient
from mtls_gateway.tls import PeerCertificate, describe_certificate

# --- certificates -------------------------------------------------------------------------

def make_cert(ca: pki_mod.CertKey, subject: x509.Name,
              sans: list[x509.GeneralName] | None = None) -> pki_mod.CertKey:
    """A client certificate with any subject and subjectAltNames, signed by ``ca``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca.cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca.key.public_key()), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return pki_mod.CertKey(builder.sign(ca.key, hashes.SHA256()), key)


def name(*rdns: list[tuple[x509.ObjectIdentifier, str]]) -> x509.Name:
    return x509.Name([x509.RelativeDistinguishedName([x509.NameAttribute(o, v) for o, v in r])
                      for r in rdns])


def peer(ck: pki_mod.CertKey) -> PeerCertificate:
    return describe_certificate(ck.cert_der)


def jwk_with_x5c(*certs: pki_mod.CertKey) -> dict[str, Any]:
    return {"keys": [{"kty": "EC", "crv": "P-256", "x5c": [base64.b64encode(c.cert_der).decode()]}
                     for c in certs]}


def registry(*clients: ClientRegistration, **overrides: Any) -> ClientRegistry:
    config = ClientRegistryConfig(name="r", clients=clients, file=None, ca_file=None,
                                  jwks_ca_file=None, jwks_refresh_interval=300.0,
                                  jwks_max_age=3600.0, jwks_timeout=2.0)
    return ClientRegistry(replace(config, **overrides))


@dataclass
class Certs:
    ca: pki_mod.CertKey
    other_ca: pki_mod.CertKey
    a: pki_mod.CertKey          # O=Example Bank, OU=Payments+OU=Ops, CN=client-a; SANs
    b: pki_mod.CertKey          # same CA, CN=client-b, other SANs
    a_other_ca: pki_mod.CertKey  # another CA, same subject and SANs as a
    self_signed: pki_mod.CertKey
    self_signed_2: pki_mod.CertKey


SUBJECT_A = name([(NameOID.COUNTRY_NAME, "GB")], [(NameOID.ORGANIZATION_NAME, "Example  Bank")],
                 [(NameOID.ORGANIZATIONAL_UNIT_NAME, "Payments"),
                  (NameOID.ORGANIZATIONAL_UNIT_NAME, "Ops")],
                 [(NameOID.COMMON_NAME, "client-a")])
SANS_A: list[x509.GeneralName] = [
    x509.DNSName("client-a.example.com"), x509.UniformResourceIdentifier("https://a.example/id"),
    x509.IPAddress(ipaddress.ip_address("2001:db8::7")), x509.RFC822Name("Ops@Client-A.example")]


@pytest.fixture(scope="module")
def certs() -> Certs:
    ca, other = pki_mod.make_ca("registry CA"), pki_mod.make_ca("other CA")
    b_subject = name([(NameOID.COUNTRY_NAME, "GB")], [(NameOID.ORGANIZATION_NAME, "Example Bank")],
                     [(NameOID.COMMON_NAME, "client-b")])
    sans_b: list[x509.GeneralName] = [
        x509.DNSName("client-b.example.com"), x509.UniformResourceIdentifier("https://b.example/id"),
        x509.IPAddress(ipaddress.ip_address("192.0.2.8")), x509.RFC822Name("ops@client-b.example")]
    return Certs(ca, other, make_cert(ca, SUBJECT_A, SANS_A), make_cert(ca, b_subject, sans_b),
                 make_cert(other, SUBJECT_A, SANS_A),
                 pki_mod.self_signed_client("self-1"), pki_mod.self_signed_client("self-1"))


# --- distinguished names ------------------------------------------------------------------

@pytest.mark.parametrize(("registered", "matches"), [
    ("CN=client-a,OU=Payments+OU=Ops,O=Example  Bank,C=GB", True),
    ("cn=CLIENT-A, ou=Ops+ou=payments, o=example bank, c=gb", True),   # case, spaces, RDN set
    ("2.5.4.3=client-a,OU=Payments+OU=Ops,O=Example Bank,countryName=GB", True),  # OIDs, names
    ("CN=client-a,OU=Payments+OU=Ops,O=Example\\20Bank,C=GB", True),     # hex escape
    ("CN=client-a,OU=Payments,OU=Ops,O=Example Bank,C=GB", False),       # RDNs split differently
    ("CN=client-a,OU=Payments+OU=Ops,C=GB,O=Example Bank", False),       # RDN order matters
    ("CN=client-a,OU=Payments+OU=Ops,O=Example Bank", False),            # C missing
    ("CN=client-b,OU=Payments+OU=Ops,O=Example Bank,C=GB", False),       # other CN
    ("CN=client-a,OU=Payments+OU=Ops,O=Example Bank,C=GB,DC=x", False),  # one RDN more
    ("CN=client-a\\,x,OU=Payments+OU=Ops,O=Example Bank,C=GB", False),   # escaped comma is data
])
def test_subject_dn_is_compared_as_a_name(registered: str, matches: bool) -> None:
    assert dn_matches(parse_dn(registered), SUBJECT_A) is matches


def test_unknown_attribute_types_compare_exactly() -> None:
    subject = name([(x509.ObjectIdentifier("1.2.3.4.5"), "MixedCase")])
    assert dn_matches(parse_dn("1.2.3.4.5=MixedCase"), subject)
    assert not dn_matches(parse_dn("1.2.3.4.5=mixedcase"), subject)
    spaced = name([(x509.ObjectIdentifier("1.2.3.4.5"), "x ")])
    assert dn_matches(parse_dn("1.2.3.4.5=x\\ "), spaced)      # escaped trailing space kept
    assert not dn_matches(parse_dn("1.2.3.4.5=x "), spaced)      # unescaped one is not


@pytest.mark.parametrize("bad", ["", "CN", "=x", "XYZ=1", "CN=#0c0161", "CN=a\\"])
def test_unreadable_dns_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_dn(bad)


A_BY_DNS = ClientRegistration("client-a", "tls_client_auth", san_dns="client-a.example.com")


# --- tls_client_auth ----------------------------------------------------------------------

PKI_CASES = [
    ("subject_dn", "CN=client-a,OU=Ops+OU=Payments,O=Example Bank,C=GB"),
    ("san_dns", "CLIENT-A.example.com"),
    ("san_uri", "https://a.example/id"),
    ("san_ip", "2001:db8:0::7"),
    ("san_email", "Ops@client-a.EXAMPLE"),
]


@pytest.mark.parametrize(("kind", "value"), PKI_CASES, ids=[c[0] for c in PKI_CASES])
def test_tls_client_auth_accepts_the_registered_certificate_only(
        certs: Certs, kind: str, value: str) -> None:
    reg = registry(ClientRegistration("client-a", "tls_client_auth", **{kind: value}),
                   ca_certs=(certs.ca.cert_der,))
    assert reg.authenticate("client-a", peer(certs.a)) == "client-a"
    # same CA, different subject and SANs
    with pytest.raises(InvalidClient) as info:
        reg.authenticate("client-a", peer(certs.b))
    assert info.value.reason == "client_cert_mismatch" and info.value.status == 401


@pytest.mark.parametrize(("kind", "value"), [
    ("san_dns", "a.example.com"), ("san_dns", "*.example.com"), ("san_uri", "https://a.example/ID"),
    ("san_ip", "2001:db8::8"), ("san_email", "ops@client-a.example"),   # local part is exact
])
def test_san_mismatch(certs: Certs, kind: str, value: str) -> None:
    reg = registry(ClientRegistration("client-a", "tls_client_auth", **{kind: value}),
                   ca_certs=(certs.ca.cert_der,))
    with pytest.raises(InvalidClient) as info:
        reg.authenticate("client-a", peer(certs.a))
    assert info.value.reason == "client_cert_mismatch"


def test_self_issued_certificate_never_passes_tls_client_auth(certs: Certs) -> None:
    dn = certs.self_signed.cert.subject.rfc4514_string()
    reg = registry(ClientRegistration("client-a", "tls_client_auth", subject_dn=dn))
    with pytest.raises(InvalidClient) as info:
        reg.authenticate("client-a", peer(certs.self_signed))
    assert info.value.reason == "client_cert_untrusted"


def test_tls_client_auth_without_a_registry_ca_fails_closed(certs: Certs) -> None:
    """config_load requires ca_file; a registry built without one trusts no name at all."""
    reg = registry(A_BY_DNS)
    with pytest.raises(InvalidClient) as info:
        reg.authenticate("client-a", peer(certs.a))
    assert info.value.reason == "client_cert_untrusted"


def test_registry_ca_narrows_the_trusted_issuers(certs: Certs) -> None:
    der = certs.ca.cert.public_bytes(serialization.Encoding.DER)
    reg = registry(A_BY_DNS,
                   ca_certs=(der,))
    assert reg.authenticate("client-a", peer(certs.a)) == "client-a"
    with pytest.raises(InvalidClient) as info:   # right subject and SAN, another CA
        reg.authenticate("client-a", peer(certs.a_other_ca))
    assert info.value.reason == "client_cert_untrusted"


@pytest.mark.parametrize(("client_id", "use_cert", "reason"), [
    ("nobody", True, "unknown_client"),
    ("client-a", False, "client_cert_missing"),
])
def test_unknown_client_and_missing_certificate(certs: Certs, client_id: str, use_cert: bool,
                                                reason: str) -> None:
    reg = registry(A_BY_DNS)
    with pytest.raises(InvalidClient) as info:
        reg.authenticate(client_id, peer(certs.a) if use_cert else None, basic=True)
    assert info.value.reason == reason and info.value.basic


# --- self_signed_tls_client_auth ----------------------------------------------------------

def test_self_signed_matches_x5c_of_inline_jwks(certs: Certs) -> None:
    reg = registry(ClientRegistration("client-s", "self_signed_tls_client_auth",
                                      jwks=jwk_with_x5c(certs.self_signed)))
    assert reg.authenticate("client-s", peer(certs.self_signed)) == "client-s"
    # another self-signed certificate with the same subject, not in the JWKS
    for wrong in (certs.self_signed_2, certs.a):
        with pytest.raises(InvalidClient) as info:
            reg.authenticate("client-s", peer(wrong))
        assert info.value.reason == "client_cert_mismatch"


def test_self_signed_same_key_new_certificate_is_not_accepted(certs: Certs) -> None:
    """The whole certificate is registered, not only its key (documented choice)."""
    original = certs.self_signed
    now = dt.datetime.now(dt.UTC)
    reissued = (x509.CertificateBuilder().subject_name(original.cert.subject)
                .issuer_name(original.cert.subject).public_key(original.key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=1))
                .not_valid_after(now + dt.timedelta(days=2)).sign(original.key, hashes.SHA256()))
    reg = registry(ClientRegistration("client-s", "self_signed_tls_client_auth",
                                      jwks=jwk_with_x5c(original)))
    with pytest.raises(InvalidClient):
        reg.authenticate("client-s", describe_certificate(
            reissued.public_bytes(serialization.Encoding.DER)))


class JwksServer(LoopbackServer):
    """Serves a client's JWK Set over HTTPS on loopback; counts fetches."""

    def __init__(self, pki: Pki, doc: dict[str, Any]) -> None:
        self.pki, self.doc, self.fetches, self.status = pki, doc, 0, 200
        self.url = ""

    async def start(self) -> None:
        async def jwks(_: web.Request) -> web.Response:
            self.fetches += 1
            if self.status != 200:
                return web.Response(status=self.status)
            return web.json_response(self.doc)

        app = web.Application()
        app.router.add_get("/jwks", jwks)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.pki.server_cert, self.pki.server_key)
        self.url = await self.serve(app, ctx) + "/jwks"


@pytest.fixture
async def jwks_server(pki: Pki, certs: Certs) -> AsyncIterator[JwksServer]:
    server = JwksServer(pki, jwk_with_x5c(certs.self_signed))
    await server.start()
    yield server
    await server.stop()


def remote_registry(server: JwksServer, pki: Pki, **overrides: Any) -> ClientRegistry:
    return registry(ClientRegistration("client-s", "self_signed_tls_client_auth",
                                       jwks_uri=server.url),
                    jwks_ca_file=Path(pki.ca_file), **overrides)


async def test_self_signed_from_jwks_uri(jwks_server: JwksServer, pki: Pki, certs: Certs) -> None:
    reg = remote_registry(jwks_server, pki)
    await reg.start()
    try:
        assert reg.authenticate("client-s", peer(certs.self_signed)) == "client-s"
        with pytest.raises(InvalidClient):
            reg.authenticate("client-s", peer(certs.self_signed_2))
        # The miss asked for one early refetch in the background; the client has meanwhile
        # registered its second certificate, which is accepted once that fetch has landed.
        jwks_server.doc = jwk_with_x5c(certs.self_signed, certs.self_signed_2)
        accepted = None
        for _ in range(1000):   # polls until the refetch lands; no timing is asserted
            await asyncio.sleep(0.01)
            try:
                accepted = reg.authenticate("client-s", peer(certs.self_signed_2))
                break
            except InvalidClient:
                continue
        assert accepted == "client-s"
        assert jwks_server.fetches == 2   # one at start, one early refetch after the miss
    finally:
        await reg.close()


async def test_jwks_uri_never_loaded_fails_closed(jwks_server: JwksServer, pki: Pki,
                                                  certs: Certs) -> None:
    jwks_server.status = 500
    reg = remote_registry(jwks_server, pki)
    await reg.start()
    try:
        with pytest.raises(DependencyDown) as info:
            reg.authenticate("client-s", peer(certs.self_signed))
        assert info.value.reason == "client_jwks_unavailable" and info.value.status == 503
    finally:
        await reg.close()


async def test_jwks_older_than_max_age_is_not_used(jwks_server: JwksServer, pki: Pki,
                                                   certs: Certs) -> None:
    reg = remote_registry(jwks_server, pki, jwks_max_age=-1.0)   # every set is too old
    await reg.start()
    try:
        assert jwks_server.fetches == 1
        with pytest.raises(DependencyDown):
            reg.authenticate("client-s", peer(certs.self_signed))
    finally:
        await reg.close()
