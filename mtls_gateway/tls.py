"""The TLS side of the gateway: the server context and the peer certificate.

The certificate that counts for binding is the one verified in the handshake of
the connection the request arrived on (RFC 8705 section 7.2); renegotiation is
disabled so it cannot change. Its thumbprint is computed once per connection and
remembered against the connection's ``SSLObject`` (weakly, so it goes with it).
"""

from __future__ import annotations

import asyncio
import ssl
import weakref
from dataclasses import dataclass, field
from typing import Any

from cachetools import LRUCache
from cryptography import x509

from .config import ListenConfig
from .handshake import HandshakeFailures, alerting_class
from .thumbprint import x5t_s256

__all__ = [
    "PEER_CERTIFICATE",
    "PeerCertificate",
    "TlsContextSwitch",
    "describe_certificate",
    "peer_certificate",
    "server_ssl_context",
]

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_ssl_context(listen: ListenConfig,
                       failures: HandshakeFailures | None = None) -> ssl.SSLContext:
    """A server context that asks for (or requires) a client certificate chained to the CA,
    or one of the registered self-signed client certificates.

    A failed handshake sends its alert and is reported to ``failures`` (handshake.py)."""
    if listen.cert_file is None or listen.key_file is None or listen.client_ca_file is None:
        raise ValueError("the TLS listener needs cert_file, key_file and client_ca_file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[listen.min_tls_version]
    ctx.maximum_version = _VERSIONS[listen.max_tls_version]
    ctx.load_cert_chain(listen.cert_file, listen.key_file)
    assert listen.client_ca_file is not None   # config_load requires it for client_ca: pki
    ctx.load_verify_locations(cafile=str(listen.client_ca_file))
    if listen.pinned_client_certs:
        # Registered self-signed client certificates, accepted as exactly themselves: config
        # load admits only certificates OpenSSL will not take as issuers (anchors.can_issue).
        ctx.load_verify_locations(cadata=b"".join(listen.pinned_client_certs))
    ctx.verify_mode = ssl.CERT_REQUIRED if listen.client_cert == "required" else ssl.CERT_OPTIONAL
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    # One TLS 1.3 session ticket per handshake instead of two: resumption still works and a
    # full handshake costs about 10% less CPU (measured in bench/).
    ctx.num_tickets = 1
    ctx.sslobject_class = alerting_class(failures)
    return ctx


class TlsContextSwitch:
    """Lets new handshakes use new TLS material without touching open connections.

    The listener is bound once with ``base``; its SNI callback (called for every
    handshake, with or without SNI) moves the new connection onto ``current``,
    whose certificate, key and client-CA store then apply to that handshake.
    Established connections keep the material they were made with.
    """

    def __init__(self, base: ssl.SSLContext) -> None:
        self.base = base
        self.current = base
        base.sni_callback = self._select

    def update(self, ctx: ssl.SSLContext) -> None:
        self.current = ctx

    def _select(self, ssl_object: ssl.SSLObject, _server_name: str | None,
                ctx: ssl.SSLContext) -> None:
        if self.current is not ctx:
            ssl_object.context = self.current


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """The verified client certificate of one connection."""

    thumbprint: str          # x5t#S256
    subject: str             # RFC 4514 string, for logs and identity headers
    not_after: float         # POSIX seconds
    der: bytes = field(default=b"", repr=False, compare=False)   # for Client-Cert forwarding


#: ``get_extra_info`` name under which a transport that is not CPython's ``ssl`` (the
#: ``client_ca: any`` listener, :mod:`mtls_gateway.tls_any`) gives its connection's
#: PeerCertificate, computed once after the handshake.
PEER_CERTIFICATE = "mtls_gateway.peer_certificate"

_BY_CONNECTION: weakref.WeakKeyDictionary[ssl.SSLObject, PeerCertificate | None] = (
    weakref.WeakKeyDictionary()
)


#: Descriptions by DER: a client that reconnects (a new connection per request, or a resumed
#: session) presents the same certificate, and parsing it was a tenth of a resumed
#: connection's Python time. Bounded; derived from the DER alone, so never stale.
_DESCRIBED: LRUCache[bytes, PeerCertificate] = LRUCache(maxsize=1024)


def describe_certificate(der: bytes) -> PeerCertificate:
    """Thumbprint, subject and expiry of a DER certificate (called on the event loop)."""
    peer = _DESCRIBED.get(der)
    if peer is None:
        cert = x509.load_der_x509_certificate(der)
        peer = _DESCRIBED[der] = PeerCertificate(
            thumbprint=x5t_s256(der),
            subject=cert.subject.rfc4514_string(),
            not_after=cert.not_valid_after_utc.timestamp(),
            der=der,
        )
    return peer


def peer_certificate(transport: asyncio.BaseTransport | Any | None) -> PeerCertificate | None:
    """The connection's client certificate, or None (no TLS, or no certificate sent)."""
    if transport is None:
        return None
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        peer = transport.get_extra_info(PEER_CERTIFICATE)
        return peer if isinstance(peer, PeerCertificate) else None
    try:
        return _BY_CONNECTION[ssl_object]
    except KeyError:
        pass
    der = ssl_object.getpeercert(binary_form=True)
    peer = describe_certificate(der) if der else None
    _BY_CONNECTION[ssl_object] = peer
    return peer
