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

A ``jwks_uri`` is fetched in the background by :mod:`mtls_gateway.remote_document` (the
rules the JWT providers' key sets are fetched by: TLS, no redirects, JSON only, at most
512 KiB, one timeout) at start, then every ``jwks_refresh_interval`` (sooner, backing
off, after a failure; a presented certificate that is not in the set asks for one
early refetch, at most once per ``_REFETCH_COOLDOWN``). A request never waits for a
fetch. A set older than ``jwks_max_age`` or never loaded is not used: 503
``client_jwks_unavailable`` (fail closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from dataclasses import dataclass

from cryptography import x509

from .anchors import chains_to
from .config import ClientRegistration, ClientRegistryConfig
from .dn import Dn, dn_matches, parse_dn
from .errors import DependencyDown, InvalidClient
from .registry_files import certificates_from_jwks, load_client_ca
from .remote_document import FetchFailed, RemoteDocument, keep_refreshed
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

_REFETCH_COOLDOWN = 30.0

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
    dn: Dn = ()
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

class RemoteCertificates:
    """The registered certificates at one ``jwks_uri``, kept fresh in the background."""

    def __init__(self, uri: str, registry: ClientRegistryConfig) -> None:
        self.uri = uri
        self._config = registry
        self._document = RemoteDocument(uri, ca_file=registry.jwks_ca_file,
                                        timeout=registry.jwks_timeout)
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
        ok = await self.fetch()
        self._task = asyncio.create_task(
            keep_refreshed(self.fetch, self._config.jwks_refresh_interval, ok=ok,
                           wake=self._wake), name=f"client-jwks {self.uri}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._document.close()

    async def fetch(self) -> bool:
        """Fetch the set now; a failure keeps the last good one (True: it worked)."""
        try:
            certs = certificates_from_jwks(await self._document.fetch())
        except (FetchFailed, ValueError) as exc:
            log.warning("client JWK Set %s could not be loaded (%s): %s", self.uri,
                        "keeping the last one" if self._certs else "none yet",
                        exc if isinstance(exc, FetchFailed) else f"{type(exc).__name__}: {exc}")
            return False
        self._certs, self._fetched_at = certs, time.monotonic()
        return True


# --- chain check against a registry CA ----------------------------------------------------



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
        self._anchors = ([x509.load_der_x509_certificate(d) for d in config.ca_certs]
                         if config.ca_certs else None)
        remotes: dict[str, RemoteCertificates] = {}
        self._clients: dict[str, _Client] = {}
        for reg in config.clients:
            remote = None
            if reg.jwks_uri is not None and reg.jwks_uri not in remotes:
                remotes[reg.jwks_uri] = RemoteCertificates(reg.jwks_uri, config)
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

