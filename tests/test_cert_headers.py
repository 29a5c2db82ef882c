"""Certificate headers parsed from real certificates: RFC 9440, Envoy XFCC, URL-encoded PEM."""

from __future__ import annotations

import base64
import hashlib
from urllib.parse import quote

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from gwtest import big_certificate_chain
from mtls_gateway import pki
from mtls_gateway.cert_headers import (
    CertHeaderError,
    encode_client_cert,
    encode_client_cert_chain,
    parse_client_cert,
    parse_client_cert_chain,
    parse_pem_header,
    parse_xfcc,
    xfcc_client,
)
from mtls_gateway.thumbprint import x5t_s256

CA = pki.make_ca("header test CA")
LEAF = pki.issue_client(CA, "client-a")
OTHER = pki.issue_client(CA, "client-b")
SELF = pki.self_signed_client("self")


def _pem(ck: pki.CertKey) -> str:
    return ck.cert_pem.decode()


def _url_pem(ck: pki.CertKey) -> str:
    return quote(_pem(ck), safe="")


def _hex(ck: pki.CertKey) -> str:
    return hashlib.sha256(ck.cert_der).hexdigest()


@pytest.mark.parametrize("ck", [LEAF, OTHER, SELF, CA], ids=["leaf", "other", "self", "ca"])
def test_rfc9440_round_trip(ck: pki.CertKey) -> None:
    value = encode_client_cert(ck.cert_der)
    assert value.startswith(":") and value.endswith(":")
    assert parse_client_cert(value) == ck.cert_der
    assert parse_client_cert(" " + value + "\t") == ck.cert_der      # OWS around the item
    unpadded = ":" + value[1:-1].rstrip("=") + ":"
    assert parse_client_cert(unpadded) == ck.cert_der                # RFC 8941: padding optional


def test_rfc9440_chain_round_trip() -> None:
    ders = [LEAF.cert_der, CA.cert_der]
    assert parse_client_cert_chain(encode_client_cert_chain(ders)) == ders


@pytest.mark.parametrize("value", [
    "",
    "::",                                                           # empty byte sequence
    base64.b64encode(LEAF.cert_der).decode(),                       # no colons
    ":" + base64.b64encode(LEAF.cert_der).decode(),                 # unterminated
    ":" + base64.urlsafe_b64encode(LEAF.cert_der).decode() + ":",   # base64url is not sf-binary
    ":" + base64.b64encode(b"not a certificate").decode() + ":",
    ":" + base64.b64encode(LEAF.cert_der + b"\x00").decode() + ":",  # trailing garbage
    ":" + base64.b64encode(LEAF.cert_der[:-10]).decode() + ":",     # truncated
    encode_client_cert(LEAF.cert_der) + ";a=1",                      # parameters
    encode_client_cert(LEAF.cert_der) + ", " + encode_client_cert(OTHER.cert_der),  # a list
    ":" + "*" * 40 + ":",
])
def test_rfc9440_malformed_values_are_refused(value: str) -> None:
    with pytest.raises(CertHeaderError):
        parse_client_cert(value)


@pytest.mark.parametrize("value", [
    _url_pem(LEAF),                                     # nginx $ssl_client_escaped_cert
    quote(_pem(LEAF)),                                  # "/" left unescaped
    _pem(LEAF).replace("\n", "\n\t"),                   # nginx's old $ssl_client_cert (tabbed)
    base64.b64encode(LEAF.cert_der).decode(),           # Traefik: base64 DER, no armour
    quote(base64.b64encode(LEAF.cert_der).decode(), safe=""),
    base64.b64encode(LEAF.cert_der).decode() + "," + base64.b64encode(CA.cert_der).decode(),
    _url_pem(LEAF) + quote(_pem(CA), safe=""),          # leaf then its chain: leaf counts
])
def test_pem_header_variants_give_the_leaf(value: str) -> None:
    assert parse_pem_header(value) == LEAF.cert_der


@pytest.mark.parametrize("value", [
    "",
    "%",
    "%ZZ",
    quote("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", safe=""),
    "not base64 !",
    base64.b64encode(b"junk").decode(),
])
def test_pem_header_malformed_values_are_refused(value: str) -> None:
    with pytest.raises(CertHeaderError):
        parse_pem_header(value)


def test_xfcc_envoy_example_with_quoted_subject() -> None:
    value = (f'By=spiffe://cluster.local/ns/api/sa/gw;Hash={_hex(LEAF)};'
             f'Cert="{_url_pem(LEAF)}";Subject="CN=client-a,O=Example, Inc.";'
             f'URI=spiffe://cluster.local/ns/a/sa/x;DNS=a.example;DNS=b.example')
    [element] = parse_xfcc(value)
    assert element.one("subject") == "CN=client-a,O=Example, Inc."
    assert element.pairs["dns"] == ["a.example", "b.example"]
    der, digest, subject = xfcc_client(value)
    assert der == LEAF.cert_der
    assert digest == _hex(LEAF)
    assert subject == "CN=client-a,O=Example, Inc."


def test_xfcc_keys_are_case_insensitive_and_quotes_escape() -> None:
    value = f'HASH={_hex(LEAF)}; cert={_url_pem(LEAF)} ;subject="a \\"quoted\\" \\\\ name;,"'
    der, digest, subject = xfcc_client(value)
    assert (der, digest, subject) == (LEAF.cert_der, _hex(LEAF), 'a "quoted" \\ name;,')


def test_xfcc_last_element_is_the_trusted_hops() -> None:
    forged = f"By=spiffe://evil;Hash={_hex(OTHER)};Cert={_url_pem(OTHER)}"
    real = f"By=spiffe://gw;Hash={_hex(LEAF)};Cert={_url_pem(LEAF)}"
    value = f"{forged},{real}"
    assert len(parse_xfcc(value)) == 2
    assert xfcc_client(value)[0] == LEAF.cert_der
    # Several proxies: each appends; the nearest (last) hop is the one we trust.
    assert xfcc_client(f"{forged}, {forged}, {real}")[0] == LEAF.cert_der


def test_xfcc_hash_alone_names_the_certificate() -> None:
    der, digest, _ = xfcc_client(f"By=spiffe://gw;Hash={_hex(LEAF).upper()}")
    assert der is None and digest == _hex(LEAF)
    thumbprint = base64.urlsafe_b64encode(bytes.fromhex(digest)).rstrip(b"=").decode()
    assert thumbprint == x5t_s256(LEAF.cert_der)


def test_xfcc_without_cert_or_hash_is_no_certificate() -> None:
    assert xfcc_client("By=spiffe://gw;URI=spiffe://client") == (None, None, None)


@pytest.mark.parametrize("value", [
    f"Hash={_hex(OTHER)};Cert={_url_pem(LEAF)}",              # wrong Hash
    f"Hash={_hex(LEAF)[:-2]};Cert={_url_pem(LEAF)}",          # short Hash
    f"Hash=zz{_hex(LEAF)[2:]}",                               # not hex
    f"Cert={_url_pem(LEAF)};Cert={_url_pem(OTHER)}",          # Cert twice in one element
    f"Hash={_hex(LEAF)};Hash={_hex(LEAF)}",
    f"Cert={_url_pem(LEAF)}{quote(_pem(CA), safe='')}",       # two certificates in Cert=
    "Cert=not-a-pem",
    f'Cert="{_url_pem(LEAF)}',                                # unterminated quote
    f'Cert=ab"c{_url_pem(LEAF)}',                              # quote inside a bare value
    f"Cert{_url_pem(LEAF)}",                                  # no =
    f"=x;Cert={_url_pem(LEAF)}",                              # no key
    f"Hash={_hex(LEAF)};",                                    # dangling separator
    f"Hash={_hex(LEAF)},",
    f"Hash={_hex(LEAF)} x=1",
    f"Hash={_hex(LEAF)};Chain=garbage",
    "",
])
def test_xfcc_malformed_values_are_refused(value: str) -> None:
    with pytest.raises(CertHeaderError):
        xfcc_client(value)


def test_xfcc_with_a_long_chain_of_rsa_certificates() -> None:
    """A realistic worst case: 4096-bit RSA leaf and chain, URL-encoded PEM, tens of KB."""
    chain = big_certificate_chain()
    leaf_der = chain[0].public_bytes(Encoding.DER)
    pems = [quote(c.public_bytes(Encoding.PEM).decode(), safe="") for c in chain]
    value = f'Hash={hashlib.sha256(leaf_der).hexdigest()};Cert="{pems[0]}";Chain="{"".join(pems)}"'
    assert len(value) > 16 * 1024
    assert xfcc_client(value)[0] == leaf_der
