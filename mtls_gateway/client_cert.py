"""Where a request's client certificate comes from: our handshake, or a trusted front proxy.

:class:`TlsCertificates` (the default) reads the certificate verified in the
handshake of the request's own connection. :class:`HeaderCertificates` reads it
from a header, but only on a connection from a trusted front proxy (source CIDR
and/or the proxy's own mutual-TLS identity, chained to ``trusted_proxies.ca_file``; every
configured rule must hold).
On any other connection the header earns nothing: the request has no client
certificate, and the forwarder strips the header. There is no fallback to the
connection's own certificate in header mode: on a trusted connection that is the
proxy's certificate, and a missing header must never turn into a weaker check.

Returns None for "no certificate"; raises :class:`InvalidRequest` for a trusted
peer's header that is malformed or duplicated.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
from typing import Protocol

from aiohttp import web
from cachetools import LRUCache
from cryptography import x509

from .anchors import chains_to
from .cert_headers import (
    CertHeaderError,
    parse_client_cert,
    parse_client_cert_chain,
    parse_pem_header,
    xfcc_client,
)
from .config import HeaderCertificateSource, ListenConfig, TrustedProxies
from .errors import InvalidRequest
from .tls import PeerCertificate, describe_certificate, peer_certificate

__all__ = [
    "UNTRUSTED_HEADER",
    "CertificateSource",
    "HeaderCertificates",
    "TlsCertificates",
    "build_certificate_source",
    "connection_named",
    "normalise_san",
    "san_strings",
]

log = logging.getLogger("mtls_gateway.client_cert")

#: Set on a request that carried a certificate header on an untrusted connection (logged).
UNTRUSTED_HEADER = web.RequestKey("untrusted_cert_header", bool)


class CertificateSource(Protocol):
    #: Header names the upstream must never receive from the client (stripped on forward).
    strip: frozenset[str]

    def peer(self, request: web.Request) -> PeerCertificate | None:
        """The request's client certificate, None if it has none; raise if malformed."""


class TlsCertificates:
    """The certificate of the request's own mutual-TLS handshake."""

    strip: frozenset[str] = frozenset()

    def peer(self, request: web.Request) -> PeerCertificate | None:
        return peer_certificate(request.transport)


def connection_named(request: web.Request) -> frozenset[str]:
    """Header names listed in ``Connection``: hop-by-hop, so never read as end-to-end facts."""
    return frozenset(token.strip().lower() for value in request.headers.getall("Connection", ())
                     for token in value.split(",") if token.strip())


def san_strings(cert: x509.Certificate) -> frozenset[str]:
    """The certificate's SANs as ``dns:``/``uri:``/``ip:``/``email:`` strings (DNS lower-cased)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset()
    out = {f"dns:{v.lower()}" for v in sans.get_values_for_type(x509.DNSName)}
    out |= {f"uri:{v}" for v in sans.get_values_for_type(x509.UniformResourceIdentifier)}
    out |= {f"ip:{v}" for v in sans.get_values_for_type(x509.IPAddress)}
    out |= {f"email:{v}" for v in sans.get_values_for_type(x509.RFC822Name)}
    return frozenset(out)


def normalise_san(value: str) -> str:
    kind, _, rest = value.partition(":")
    kind = kind.lower()
    if kind == "dns":
        return f"dns:{rest.lower()}"
    if kind == "ip":
        return f"ip:{ipaddress.ip_address(rest)}"
    return f"{kind}:{rest}"


class _ProxyTrust:
    """The trust rule, built once; identity verdicts remembered per proxy certificate."""

    def __init__(self, trusted: TrustedProxies) -> None:
        self.cidrs = trusted.cidrs
        self.subjects = frozenset(x509.Name.from_rfc4514_string(s) for s in trusted.subjects)
        self.sans = frozenset(normalise_san(s) for s in trusted.sans)
        # A name counts only on a certificate the proxies' own CA issued: a certificate the
        # listener merely accepted may be of anyone's making (anchors.py).
        self.anchors = [x509.load_der_x509_certificate(d) for d in trusted.ca_certs]
        self._verdicts: LRUCache[str, bool] = LRUCache(maxsize=256)

    def allows(self, request: web.Request) -> bool:
        if self.cidrs and not self._address_ok(request):
            return False
        if self.subjects or self.sans:
            proxy = peer_certificate(request.transport)
            return proxy is not None and self._identity_ok(proxy)
        return True

    def _address_ok(self, request: web.Request) -> bool:
        peername = request.transport.get_extra_info("peername") if request.transport else None
        if not peername:
            return False
        try:
            address = ipaddress.ip_address(peername[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in net for net in self.cidrs)

    def _identity_ok(self, proxy: PeerCertificate) -> bool:
        verdict = self._verdicts.get(proxy.thumbprint)
        if verdict is None:
            cert = x509.load_der_x509_certificate(proxy.der)
            named = (cert.subject in self.subjects) or bool(san_strings(cert) & self.sans)
            verdict = named and chains_to(cert, self.anchors)
            self._verdicts[proxy.thumbprint] = verdict
        return verdict


class HeaderCertificates:
    """The client certificate stated by a trusted front proxy in a header."""

    def __init__(self, source: HeaderCertificateSource) -> None:
        self.format = source.format
        self.header = source.header
        self.chain_header = source.chain_header
        self.trust = _ProxyTrust(source.trusted)
        names = {source.header.lower()} | ({source.chain_header.lower()}
                                           if source.chain_header else set())
        self.strip = frozenset(names)
        # Parsing a certificate costs tens of microseconds; a client sends the same value
        # on every request, and the result depends on nothing else. Keyed by the value's
        # digest so that 1,024 entries of up to 64 KiB headers stay small.
        self._parsed: LRUCache[bytes, PeerCertificate] = LRUCache(maxsize=1024)

    def peer(self, request: web.Request) -> PeerCertificate | None:
        if not self.trust.allows(request):
            if self.header in request.headers:
                request[UNTRUSTED_HEADER] = True
            return None
        hop_by_hop = connection_named(request)
        if self.header.lower() in hop_by_hop:
            return None                                  # never read; treated as absent
        if self.chain_header and self.chain_header.lower() not in hop_by_hop:
            self._check_chain(request)
        values = request.headers.getall(self.header, ())
        if len(values) > 1:
            raise InvalidRequest("duplicate_client_cert_header",
                                 f"{self.header} was sent more than once")
        if not values or not values[0].strip():
            return None
        value = values[0]
        key = hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()
        cached = self._parsed.get(key)
        if cached is not None:
            return cached
        try:
            peer = self._parse(value)
        except CertHeaderError as exc:
            raise InvalidRequest("invalid_client_cert_header",
                                 f"{self.header} is malformed: {exc}") from exc
        if peer is not None:
            self._parsed[key] = peer
        return peer

    def _check_chain(self, request: web.Request) -> None:
        assert self.chain_header is not None
        values = request.headers.getall(self.chain_header, ())
        if len(values) > 1:
            raise InvalidRequest("duplicate_client_cert_header",
                                 f"{self.chain_header} was sent more than once")
        if values and values[0].strip():
            try:
                parse_client_cert_chain(values[0])
            except CertHeaderError as exc:
                raise InvalidRequest("invalid_client_cert_header",
                                     f"{self.chain_header} is malformed: {exc}") from exc

    def _parse(self, value: str) -> PeerCertificate | None:
        if self.format == "rfc9440":
            return describe_certificate(parse_client_cert(value))
        if self.format == "pem":
            return describe_certificate(parse_pem_header(value))
        der, digest, subject = xfcc_client(value)
        if der is not None:
            return describe_certificate(der)
        if digest is None:
            return None
        # Hash= only: the hex SHA-256 of the DER is the x5t#S256 digest, so binding still works.
        thumbprint = base64.urlsafe_b64encode(bytes.fromhex(digest)).rstrip(b"=").decode()
        return PeerCertificate(thumbprint=thumbprint, subject=subject or "", not_after=0.0)


def build_certificate_source(listen: ListenConfig) -> CertificateSource:
    if listen.client_certificate is None:
        return TlsCertificates()
    return HeaderCertificates(listen.client_certificate)
