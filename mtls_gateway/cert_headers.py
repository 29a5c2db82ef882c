"""Client certificates carried in HTTP headers by a front proxy, and to the upstream.

Pure parsing and encoding; no trust decisions (those live in
:mod:`mtls_gateway.client_cert`). Every parser returns the leaf certificate's DER
or raises :class:`CertHeaderError` for anything it does not fully understand:
a header a trusted proxy mangled must never be half-read. Formats:

* RFC 9440 ``Client-Cert``: the DER as a structured-field byte sequence,
  ``:<base64>:``; ``Client-Cert-Chain`` is a list of them.
* Envoy ``X-Forwarded-Client-Cert`` (XFCC): comma-separated elements of
  ``;``-separated ``key=value`` pairs (keys case-insensitive, values optionally
  double-quoted). Each proxy hop appends one element; only the *last* one, the
  trusted hop's, counts. ``Cert=`` is URL-encoded PEM; ``Hash=`` is the hex
  SHA-256 of the DER, which is the same digest as ``x5t#S256``.
* URL-encoded PEM (nginx ``$ssl_client_escaped_cert``, AWS ALB, Traefik, which
  sends the base64 body without the PEM armour).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass, field
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

__all__ = [
    "CertHeaderError",
    "XfccElement",
    "encode_client_cert",
    "encode_client_cert_chain",
    "parse_client_cert",
    "parse_client_cert_chain",
    "parse_pem_header",
    "parse_xfcc",
    "xfcc_client",
]

_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_XFCC_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_XFCC_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_XFCC_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
_XFCC_BARE = re.compile(r'[^;,"]*')
#: XFCC keys whose value must appear at most once per element (DNS and URI may repeat).
_XFCC_SINGLE = frozenset({"by", "hash", "cert", "chain", "subject"})


class CertHeaderError(ValueError):
    """A certificate header that is malformed, ambiguous or inconsistent."""


def encode_client_cert(der: bytes) -> str:
    """RFC 9440 ``Client-Cert`` value: a structured-field byte sequence of the DER."""
    return ":" + base64.b64encode(der).decode("ascii") + ":"


def encode_client_cert_chain(ders: list[bytes]) -> str:
    """RFC 9440 ``Client-Cert-Chain`` value: a structured-field list of byte sequences."""
    return ", ".join(encode_client_cert(der) for der in ders)


def _fields_parse(cert: x509.Certificate) -> None:
    """cryptography parses names, dates and extensions lazily: read them now, so that a
    mangled certificate is refused here (400), not where the gateway first looks (500)."""
    try:
        cert.subject.rfc4514_string()
        cert.issuer.rfc4514_string()
        _ = cert.not_valid_before_utc, cert.not_valid_after_utc, cert.extensions
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise CertHeaderError("certificate fields are malformed") from exc


def _certificate_der(der: bytes) -> bytes:
    """``der`` if it is one well-formed X.509 certificate, re-encoded exactly as sent."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except (ValueError, x509.InvalidVersion) as exc:
        raise CertHeaderError("not a DER X.509 certificate") from exc
    if cert.public_bytes(Encoding.DER) != der:
        raise CertHeaderError("certificate is not in canonical DER")
    _fields_parse(cert)
    return der


def _byte_sequence(item: str) -> bytes:
    """One RFC 8941 byte sequence ``:base64:``; parameters are not allowed by RFC 9440."""
    item = item.strip(" \t")
    if len(item) < 2 or item[0] != ":" or item[-1] != ":":
        raise CertHeaderError("expected a structured-field byte sequence :base64:")
    body = item[1:-1]
    if not _B64.fullmatch(body):
        raise CertHeaderError("invalid base64 in byte sequence")
    try:
        return base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except binascii.Error as exc:
        raise CertHeaderError("invalid base64 in byte sequence") from exc


def parse_client_cert(value: str) -> bytes:
    """RFC 9440 ``Client-Cert`` -> the certificate's DER."""
    return _certificate_der(_byte_sequence(value))


def parse_client_cert_chain(value: str) -> list[bytes]:
    """RFC 9440 ``Client-Cert-Chain`` -> the DER of each certificate, in order."""
    return [_certificate_der(_byte_sequence(item)) for item in value.split(",")]


def _unquote(text: str) -> str:
    """URL-decoding where bytes that are not UTF-8 are refused (``%9A`` alone is no text)."""
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError as exc:   # a ValueError, but not ours: it would be a 500
        raise CertHeaderError("URL-encoded bytes are not UTF-8") from exc


def _pem_certificates(text: str) -> list[bytes]:
    """DER of every certificate in PEM text (lines may be indented, as nginx's old variable)."""
    cleaned = text.strip()
    if "\n " in cleaned or "\n\t" in cleaned:
        cleaned = "\n".join(line.strip() for line in cleaned.splitlines())
    try:
        certs = x509.load_pem_x509_certificates(cleaned.encode("ascii"))
    except (ValueError, UnicodeEncodeError, x509.InvalidVersion) as exc:
        raise CertHeaderError("not a PEM certificate") from exc
    for cert in certs:
        _fields_parse(cert)
    return [c.public_bytes(Encoding.DER) for c in certs]


def parse_pem_header(value: str) -> bytes:
    """URL-encoded PEM (or bare base64 DER) -> the leaf certificate's DER.

    A value with several certificates is the leaf followed by its chain: the first counts.
    """
    text = _unquote(value.strip())
    if "-----BEGIN" in text:
        return _pem_certificates(text)[0]
    first = text.split(",")[0].strip()            # Traefik separates certificates with commas
    body = re.sub(r"\s+", "", first)
    if not body or not _B64.fullmatch(body):
        raise CertHeaderError("expected URL-encoded PEM or base64 DER")
    try:
        der = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except binascii.Error as exc:
        raise CertHeaderError("invalid base64") from exc
    return _certificate_der(der)


@dataclass(frozen=True)
class XfccElement:
    """One hop's element of an XFCC header; keys lower-cased, values unquoted."""

    pairs: dict[str, list[str]] = field(default_factory=dict)

    def one(self, key: str) -> str | None:
        values = self.pairs.get(key)
        return values[0] if values else None


def _xfcc_value(text: str, i: int) -> tuple[str, int]:
    """Read one value at ``i``: quoted (with ``\\`` escapes) or bare up to ``;`` or ``,``."""
    if text.startswith('"', i):
        quoted = _XFCC_QUOTED.match(text, i)
        if quoted is None:
            raise CertHeaderError("unterminated quoted value")
        return _XFCC_ESCAPE.sub(r"\1", quoted.group(1)), quoted.end()
    bare = _XFCC_BARE.match(text, i)
    assert bare is not None                      # [^...]* always matches
    end = bare.end()
    if text.startswith('"', end):
        raise CertHeaderError("quote inside an unquoted value")
    return bare.group().strip(" \t"), end


def parse_xfcc(value: str) -> list[XfccElement]:
    """Every element of an XFCC header, in order (the last was appended by the nearest hop)."""
    elements: list[XfccElement] = []
    current: dict[str, list[str]] = {}
    i, n = 0, len(value)
    while True:
        while i < n and value[i] in " \t":
            i += 1
        key_match = _XFCC_KEY.match(value, i)
        if key_match is None:
            raise CertHeaderError("expected key=value")
        key = key_match.group().lower()
        i = key_match.end()
        if i >= n or value[i] != "=":
            raise CertHeaderError(f"expected = after {key!r}")
        item, i = _xfcc_value(value, i + 1)
        if key in _XFCC_SINGLE and key in current:
            raise CertHeaderError(f"{key!r} appears twice in one element")
        current.setdefault(key, []).append(item)
        while i < n and value[i] in " \t":
            i += 1
        if i >= n:
            elements.append(XfccElement(current))
            return elements
        if value[i] == ",":
            elements.append(XfccElement(current))
            current = {}
        elif value[i] != ";":
            raise CertHeaderError("expected ; or , between pairs")
        i += 1


def xfcc_client(value: str) -> tuple[bytes | None, str | None, str | None]:
    """The trusted hop's (last) element: (DER or None, hex SHA-256, Subject).

    With ``Cert=`` the DER is returned and a ``Hash=`` must agree with it. Without
    ``Cert=`` the ``Hash=`` alone still names the certificate exactly (it is the
    ``x5t#S256`` digest in hex). Neither present: no client certificate (None, None).
    """
    element = parse_xfcc(value)[-1]
    cert, digest = element.one("cert"), element.one("hash")
    der: bytes | None = None
    if cert is not None:
        certs = _pem_certificates(_unquote(cert))
        if len(certs) != 1:
            raise CertHeaderError("Cert= must hold exactly one certificate")
        der = certs[0]
    if digest is not None:
        if not re.fullmatch(r"[0-9A-Fa-f]{64}", digest):
            raise CertHeaderError("Hash= is not a hex SHA-256")
        digest = digest.lower()
        if der is not None and not hmac.compare_digest(hashlib.sha256(der).hexdigest(), digest):
            raise CertHeaderError("Hash= does not match Cert=")
    elif der is not None:
        digest = hashlib.sha256(der).hexdigest()
    if element.one("chain") is not None:
        _pem_certificates(_unquote(element.one("chain") or ""))
    return der, digest, element.one("subject")
