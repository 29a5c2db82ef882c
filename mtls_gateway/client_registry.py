"""Which OAuth client a certificate belongs to: RFC 8705 section 2 client authentication.

A registry holds client registrations (from ``gateway.yaml`` or a YAML file) and answers
one question per token request: does this verified certificate authenticate this
``client_id``? Two methods, as registered:

* ``tls_client_auth`` (section 2.1): the certificate chains to the registry's own
  ``ca_file`` (required: the handshake's acceptance alone proves no name, see
  :mod:`mtls_gateway.anchors`) and carries the one registered value:

  - ``tls_client_auth_subject_dn``: compared as a distinguished name, not as a string
    (RFC 4514 parsing; the RDN sequence in order, each RDN as a set; attribute types by
    OID; values of the known string attribute types with caseIgnoreMatch (RFC 4518
    style: Unicode NFKC, case folding, runs of white space as one space); values of
    attribute types given as a dotted OID the gateway does not know compared exactly);
  - ``tls_client_auth_san_dns`` / ``_san_uri`` / ``_san_ip`` / ``_san_email``: one
    subjectAltName entry of that kind equals it (DNS case-insensitively, literally, no
    wildcard expansion; URI exactly; IP as an address, so ``::1`` equals ``0:0::1``;
    e-mail with the domain case-insensitive).

  A self-issued certificate (subject equals issuer) never passes this method.

* ``self_signed_tls_client_auth`` (section 2.2): the presented certificate is, byte for
  byte (DER), the first ``x5c`` certificate of a key in the client's ``jwks`` or in the
  JWK Set at its ``jwks_uri``. Matching the whole certificate rather than only its public
  key is the stricter choice: re-issuing a certificate for the same key needs a new
  registration, exactly like at an authorization server that compares ``x5t#S256``.
  The certificate's validity period is checked too.

A ``jwks_uri`` is fetched in the background (at start, then every
``jwks_refresh_interval``; a presented certificate that is not in the set asks for one
early refetch, at most once per ``_REFETCH_COOLDOWN``). A request never waits for a
fetch. A set older than ``jwks_max_age`` or never loaded is not used: 503
``client_jwks_unavailable`` (fail closed).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import logging
import re
import ssl
import time
import unicodedata
from dataclasses import dataclass
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.x509.oid import NameOID

from .anchors import chains_to
from .bodies import read_capped
from .config import ClientRegistration, ClientRegistryConfig
from .errors import DependencyDown, InvalidClient
from .strict_json import loads_object
from .tls import PeerCertificate

__all__ = [
    "ClientRegistry",
    "RemoteCertificates",
    "certificates_from_jwks",
    "dn_matches",
    "load_client_ca",
    "parse_dn",
]

log = logging.getLogger("mtls_gateway.client_registry")

_MAX_JWKS_BYTES = 512 * 1024
_REFETCH_COOLDOWN = 30.0

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

# --- distinguished names (RFC 4514) -------------------------------------------------------

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


# --- subjectAltName -----------------------------------------------------------------------

def _sans(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return None


def _email_key(value: str) -> tuple[str, str]:
    local, _, domain = value.rpartition("@")
    return local, domain.lower()


@dataclass(frozen=True)
class _Expectation:
    """One registered tls_client_auth value, parsed once."""

    kind: str                            # subject_dn | san_dns | san_uri | san_ip | san_email
    dn: tuple[frozenset[_Ava], ...] = ()
    text: str = ""
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None

    @classmethod
    def of(cls, reg: ClientRegistration) -> _Expectation:
        if reg.subject_dn is not None:
            return cls("subject_dn", dn=parse_dn(reg.subject_dn))
        if reg.san_ip is not None:
            return cls("san_ip", ip=ipaddress.ip_address(reg.san_ip))
        for kind in ("san_dns", "san_uri", "san_email"):
            value = getattr(reg, kind)
            if value is not None:
                return cls(kind, text=value)
        raise ValueError(f"client {reg.client_id}: no tls_client_auth_* value registered")

    def matches(self, cert: x509.Certificate) -> bool:
        if self.kind == "subject_dn":
            return dn_matches(self.dn, cert.subject)
        sans = _sans(cert)
        if sans is None:
            return False
        if self.kind == "san_ip":
            return self.ip in sans.get_values_for_type(x509.IPAddress)
        if self.kind == "san_dns":
            want = self.text.rstrip(".").lower()
            return any(v.rstrip(".").lower() == want
                       for v in sans.get_values_for_type(x509.DNSName))
        if self.kind == "san_uri":
            return self.text in sans.get_values_for_type(x509.UniformResourceIdentifier)
        want_email = _email_key(self.text)
        return any(_email_key(v) == want_email for v in sans.get_values_for_type(x509.RFC822Name))


# --- registered certificates (self_signed_tls_client_auth) --------------------------------

def certificates_from_jwks(doc: Any) -> frozenset[bytes]:
    """DER of the first ``x5c`` certificate of each key in a JWK Set; ValueError if none."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError('a JWK Set must be an object with a "keys" list')
    found: set[bytes] = set()
    for jwk in doc["keys"]:
        x5c = jwk.get("x5c") if isinstance(jwk, dict) else None
        if not isinstance(x5c, list) or not x5c or not isinstance(x5c[0], str):
            continue
        try:
            der = base64.b64decode(x5c[0], validate=True)
            x509.load_der_x509_certificate(der)
        except (binascii.Error, ValueError):
            continue
        found.add(der)
    if not found:
        raise ValueError("no key in the JWK Set has a usable x5c certificate")
    return frozenset(found)


class RemoteCertificates:
    """The registered certificates at one ``jwks_uri``, kept fresh in the background."""

    def __init__(self, uri: str, session_factory: _Sessions, registry: ClientRegistryConfig,
                 ) -> None:
        self.uri = uri
        self._sessions = session_factory
        self._config = registry
        self._certs: frozenset[bytes] | None = None
        self._fetched_at = -float("inf")      # monotonic
        self._last_kick = -float("inf")
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def current(self) -> frozenset[bytes] | None:
        """The set, or None when never loaded or older than ``jwks_max_age``."""
        if self._certs is None or time.monotonic() - self._fetched_at > self._config.jwks_max_age:
            return None
        return self._certs

    def kick(self) -> None:
        """Ask for an early refetch (rate-limited); never waits for it."""
        now = time.monotonic()
        if now - self._last_kick >= _REFETCH_COOLDOWN:
            self._last_kick = now
            self._wake.set()

    async def start(self) -> None:
        await self.fetch()
        self._task = asyncio.create_task(self._loop(), name=f"client-jwks {self.uri}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def fetch(self) -> bool:
        session = self._sessions.get()
        try:
            async with session.get(self.uri, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                body = await read_capped(resp.content, _MAX_JWKS_BYTES)
                if len(body) > _MAX_JWKS_BYTES:
                    raise ValueError("JWK Set too large")
            certs = certificates_from_jwks(loads_object(body))
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
            log.warning("client JWK Set %s could not be loaded (%s): %s", self.uri,
                        "keeping the last one" if self._certs else "none yet",
                        f"{type(exc).__name__}: {exc}")
            return False
        self._certs, self._fetched_at = certs, time.monotonic()
        return True

    async def _loop(self) -> None:
        interval, backoff = self._config.jwks_refresh_interval, 1.0
        ok = self._certs is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval if ok else backoff)
            self._wake.clear()
            ok = await self.fetch()
            backoff = 1.0 if ok else min(backoff * 2, interval)


class _Sessions:
    """One lazily opened HTTP session per registry for its ``jwks_uri`` fetches."""

    def __init__(self, config: ClientRegistryConfig) -> None:
        self._config = config
        self._session: aiohttp.ClientSession | None = None

    def get(self) -> aiohttp.ClientSession:
        if self._session is None:
            cafile = str(self._config.jwks_ca_file) if self._config.jwks_ca_file else None
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=cafile),
                                               limit=4),
                timeout=aiohttp.ClientTimeout(total=self._config.jwks_timeout),
                headers={"Accept": "application/jwk-set+json, application/json"})
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


# --- chain check against a registry CA ----------------------------------------------------

def load_client_ca(data: bytes) -> list[x509.Certificate]:
    """The trust anchors of a registry ``ca_file``; ValueError if it has none."""
    certs = x509.load_pem_x509_certificates(data)
    if not certs:
        raise ValueError("contains no certificate")
    return certs


# --- the registry -------------------------------------------------------------------------

@dataclass(frozen=True)
class _Client:
    client_id: str
    method: str
    expectation: _Expectation | None          # tls_client_auth
    certs: frozenset[bytes] | None            # self_signed, inline jwks
    remote: RemoteCertificates | None         # self_signed, jwks_uri


class ClientRegistry:
    """One configured registry: ``authenticate(client_id, peer)`` or a refusal."""

    def __init__(self, config: ClientRegistryConfig) -> None:
        self.config = config
        self._sessions = _Sessions(config)
        self._anchors = ([x509.load_der_x509_certificate(d) for d in config.ca_certs]
                         if config.ca_certs else None)
        remotes: dict[str, RemoteCertificates] = {}
        self._clients: dict[str, _Client] = {}
        for reg in config.clients:
            remote = None
            if reg.jwks_uri is not None and reg.jwks_uri not in remotes:
                remotes[reg.jwks_uri] = RemoteCertificates(reg.jwks_uri, self._sessions, config)
            if reg.jwks_uri is not None:
                remote = remotes[reg.jwks_uri]
            self._clients[reg.client_id] = _Client(
                client_id=reg.client_id, method=reg.method,
                expectation=_Expectation.of(reg) if reg.method == "tls_client_auth" else None,
                certs=certificates_from_jwks(reg.jwks) if reg.jwks is not None else None,
                remote=remote)
        self._remotes = tuple(remotes.values())

    async def start(self) -> None:
        """First fetch of every ``jwks_uri`` (failures are logged, retried, and fail closed)."""
        await asyncio.gather(*(r.start() for r in self._remotes))

    async def close(self) -> None:
        for remote in self._remotes:
            await remote.close()
        await self._sessions.close()

    def authenticate(self, client_id: str, peer: PeerCertificate | None, *,
                     basic: bool = False) -> str:
        """The authenticated client id, or :class:`InvalidClient` / 503 (see module doc)."""
        client = self._clients.get(client_id)
        if client is None:
            raise InvalidClient("unknown_client", "client is not registered for mutual TLS",
                                basic=basic)
        if peer is None or not peer.der:
            raise InvalidClient("client_cert_missing", "a client certificate is required",
                                basic=basic)
        cert = x509.load_der_x509_certificate(peer.der)
        if client.expectation is not None:
            self._check_pki(client.expectation, cert, basic)
        else:
            self._check_self_signed(client, cert, peer.der, basic)
        return client.client_id

    def _check_pki(self, expectation: _Expectation, cert: x509.Certificate, basic: bool) -> None:
        # Fail closed: without the registry's ca_file (config_load requires it) no name counts.
        if self._anchors is None or not chains_to(cert, self._anchors):
            raise InvalidClient("client_cert_untrusted",
                                "certificate is not issued by a trusted CA", basic=basic)
        if not expectation.matches(cert):
            raise InvalidClient("client_cert_mismatch",
                                "certificate does not match the client's registration",
                                basic=basic)

    @staticmethod
    def _check_self_signed(client: _Client, cert: x509.Certificate, der: bytes,
                           basic: bool) -> None:
        certs = client.certs
        if client.remote is not None:
            certs = client.remote.current()
            if certs is None:
                raise DependencyDown("client_jwks_unavailable",
                                     "the client's registered keys are not available")
        now = time.time()
        in_period = (cert.not_valid_before_utc.timestamp() <= now
                     <= cert.not_valid_after_utc.timestamp())
        if certs is None or der not in certs or not in_period:
            if client.remote is not None and in_period:
                client.remote.kick()   # maybe the client registered a new certificate
            raise InvalidClient("client_cert_mismatch",
                                "certificate does not match the client's registration",
                                basic=basic)

