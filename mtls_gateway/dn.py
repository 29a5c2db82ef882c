"""Distinguished names (RFC 4514) as comparable values: pure, for config validation too.

A registered ``tls_client_auth_subject_dn`` is parsed once into RDNs of (OID, normalised
value); a certificate's subject is compared in the same form. Values of attribute types
whose matching rule is caseIgnoreMatch are compared after NFKC, white-space folding and
case folding; others exactly.
"""

from __future__ import annotations

import re
import unicodedata

from cryptography import x509
from cryptography.x509.oid import NameOID

__all__ = ["Dn", "dn_matches", "parse_dn"]

# RFC 4514 section 3 keywords plus those common in client certificates (eIDAS/PSD2 QWACs
# carry organizationIdentifier). Looked up case-insensitively.
_KEYWORDS: dict[str, x509.ObjectIdentifier] = {
    "CN": NameOID.COMMON_NAME, "COMMONNAME": NameOID.COMMON_NAME,
    "L": NameOID.LOCALITY_NAME, "LOCALITYNAME": NameOID.LOCALITY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME, "STATEORPROVINCENAME": NameOID.STATE_OR_PROVINCE_NAME,
    "O": NameOID.ORGANIZATION_NAME, "ORGANIZATIONNAME": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "ORGANIZATIONALUNITNAME": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "C": NameOID.COUNTRY_NAME, "COUNTRYNAME": NameOID.COUNTRY_NAME,
    "STREET": NameOID.STREET_ADDRESS, "STREETADDRESS": NameOID.STREET_ADDRESS,
    "DC": NameOID.DOMAIN_COMPONENT, "DOMAINCOMPONENT": NameOID.DOMAIN_COMPONENT,
    "UID": NameOID.USER_ID, "USERID": NameOID.USER_ID,
    "SERIALNUMBER": NameOID.SERIAL_NUMBER,
    "E": NameOID.EMAIL_ADDRESS, "EMAILADDRESS": NameOID.EMAIL_ADDRESS,
    "GN": NameOID.GIVEN_NAME, "GIVENNAME": NameOID.GIVEN_NAME,
    "SN": NameOID.SURNAME, "SURNAME": NameOID.SURNAME,
    "TITLE": NameOID.TITLE,
    "ORGANIZATIONIDENTIFIER": NameOID.ORGANIZATION_IDENTIFIER,
    "POSTALCODE": NameOID.POSTAL_CODE,
    "DNQUALIFIER": NameOID.DN_QUALIFIER,
    "PSEUDONYM": NameOID.PSEUDONYM,
    "BUSINESSCATEGORY": NameOID.BUSINESS_CATEGORY,
}
#: Attribute types whose matching rule is caseIgnoreMatch (RFC 4519, PKCS #9, X.520).
_CASE_IGNORE = frozenset(_KEYWORDS.values())
_OID = re.compile(r"^\d+(?:\.\d+)+$")
_SPACES = re.compile(r"\s+")

_Ava = tuple[str, str]              # (dotted OID, normalised value)


def _split(text: str, separator: str) -> list[str]:
    """Split at unescaped ``separator`` (escapes are kept for :func:`_unescape`)."""
    parts, current, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            current.append(text[i:i + 2])
            i += 2
            continue
        if ch == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def _strip_unescaped(value: str) -> str:
    """Drop surrounding white space, but not an escaped trailing space (``a\\ ``)."""
    value = value.lstrip()
    while value.endswith(" "):
        body = value[:-1]
        if (len(body) - len(body.rstrip("\\"))) % 2:   # an odd run of backslashes escapes it
            break
        value = body
    return value


def _unescape(value: str) -> str:
    """RFC 4514 section 2.4 escapes: ``\\,`` style and ``\\XX`` hex pairs (UTF-8 bytes)."""
    out, i = bytearray(), 0
    while i < len(value):
        ch = value[i]
        if ch == "\\":
            pair = value[i + 1:i + 3]
            if len(pair) == 2 and all(c in "0123456789abcdefABCDEF" for c in pair):
                out.append(int(pair, 16))
                i += 3
                continue
            if i + 1 >= len(value):
                raise ValueError("dangling backslash")
            out += value[i + 1].encode()
            i += 2
            continue
        out += ch.encode()
        i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError("escaped bytes are not UTF-8") from exc


def _normalise(oid: x509.ObjectIdentifier, value: str | bytes) -> str:
    if isinstance(value, bytes):          # bit strings (x500UniqueIdentifier): exact
        return "#" + value.hex()
    if oid not in _CASE_IGNORE:
        return value
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", value)).strip().casefold()


def parse_dn(text: str) -> tuple[frozenset[_Ava], ...]:
    """An RFC 4514 string as comparable RDNs, most significant first (the DER order).

    Raises ValueError for anything it cannot read unambiguously (including ``#`` hex
    values, which are refused rather than guessed at).
    """
    if not text.strip():
        raise ValueError("empty distinguished name")
    rdns: list[frozenset[_Ava]] = []
    for rdn_text in _split(text, ","):
        avas: set[_Ava] = set()
        for ava in _split(rdn_text, "+"):
            kind, sep, raw = ava.partition("=")
            kind = kind.strip()
            if not sep or not kind:
                raise ValueError(f"{ava.strip()!r} is not type=value")
            if _OID.match(kind):
                oid = x509.ObjectIdentifier(kind)
            elif kind.upper() in _KEYWORDS:
                oid = _KEYWORDS[kind.upper()]
            else:
                raise ValueError(f"unknown attribute type {kind!r} (use its dotted OID)")
            raw = _strip_unescaped(raw)
            if raw.startswith("#"):
                raise ValueError(f"hex-encoded value of {kind} is not supported")
            avas.add((oid.dotted_string, _normalise(oid, _unescape(raw))))
        rdns.append(frozenset(avas))
    rdns.reverse()   # RFC 4514 writes the last RDN of the sequence first
    return tuple(rdns)


def _name_rdns(name: x509.Name) -> tuple[frozenset[_Ava], ...]:
    return tuple(frozenset((a.oid.dotted_string, _normalise(a.oid, a.value)) for a in rdn)
                 for rdn in name.rdns)


def dn_matches(registered: tuple[frozenset[_Ava], ...], subject: x509.Name) -> bool:
    """Does the certificate subject equal the registered DN (see the module docstring)?"""
    try:
        return _name_rdns(subject) == registered
    except ValueError:
        return False


Dn = tuple[frozenset[_Ava], ...]
