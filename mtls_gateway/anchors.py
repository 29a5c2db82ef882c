"""Which certificates may vouch for other certificates, and which may not.

A trust anchor can issue a certificate with any name, so the question for every trust
decision is what someone can do with a certificate of their own making. The rules:

* a CA bundle (``listen.client_ca_file``, a registry's ``ca_file``, the front proxies'
  ``trusted_proxies.ca_file``) holds real CA certificates only: ``basicConstraints
  CA:TRUE`` *and* ``keyUsage`` with ``keyCertSign`` (RFC 5280 sections 4.2.1.3, 4.2.1.9).
  A client's self-signed certificate is not one, even when ``openssl req -x509`` marked it
  ``CA:TRUE``: in a bundle it would let its holder issue itself any other client's name;
* a certificate registered for ``self_signed_tls_client_auth`` is never a bundle entry; the
  ``client_ca: pki`` listener accepts it by its exact bytes instead (:func:`can_issue` must
  be false for that, because OpenSSL's store cannot hold a certificate that is trusted as
  itself but not as an issuer);
* names (``tls_client_auth`` subject DN/SAN, a front proxy's subject/SAN) count only for a
  certificate that chains to a dedicated CA bundle (:func:`chains_to`), never merely
  because the handshake accepted it.

Pure functions over ``cryptography`` objects: no sockets, usable by ``check``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from .config import GatewayConfig

__all__ = ["bundle_problems", "can_issue", "chains_to", "handshake_warnings", "is_ca",
           "self_issued", "spki"]

#: Netscape certificate type: OpenSSL still reads its CA bits when basicConstraints is absent.
_NETSCAPE_CERT_TYPE = x509.ObjectIdentifier("2.16.840.1.113730.1.1")


def spki(cert: x509.Certificate) -> bytes:
    """The certificate's public key (SubjectPublicKeyInfo DER): who holds the private key."""
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def self_issued(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer


def _extension(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.ExtensionType | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def is_ca(cert: x509.Certificate) -> bool:
    """A real CA certificate: basicConstraints CA:TRUE and keyUsage keyCertSign."""
    try:
        constraints = _extension(cert, x509.BasicConstraints)
        usage = _extension(cert, x509.KeyUsage)
    except ValueError:                      # an extension cryptography cannot read
        return False
    return (isinstance(constraints, x509.BasicConstraints) and constraints.ca
            and isinstance(usage, x509.KeyUsage) and usage.key_cert_sign)


def can_issue(cert: x509.Certificate) -> bool:
    """Would OpenSSL accept this certificate as the issuer of another (``X509_check_ca``)?

    True for CA:TRUE without keyUsage (``openssl req -x509``), for a version 1 certificate,
    for keyUsage keyCertSign without basicConstraints; false only when an extension says no.
    Unreadable extensions count as "may issue" (fail closed).
    """
    try:
        constraints = _extension(cert, x509.BasicConstraints)
        usage = _extension(cert, x509.KeyUsage)
        netscape = any(e.oid == _NETSCAPE_CERT_TYPE for e in cert.extensions)
    except ValueError:
        return True
    if isinstance(usage, x509.KeyUsage) and not usage.key_cert_sign:
        return False
    if isinstance(constraints, x509.BasicConstraints):
        return constraints.ca
    return cert.version == x509.Version.v1 or usage is not None or netscape


def bundle_problems(certs: Iterable[x509.Certificate], registered: Mapping[bytes, str], *,
                    pins: bool = False) -> list[str]:
    """What is wrong with each entry of a CA bundle (``entry N (subject): ...``; 1-based).

    ``registered`` maps the public key (:func:`spki`) of every certificate registered for
    ``self_signed_tls_client_auth`` to its client id: such a key never anchors anything.
    ``pins``: the listener's bundle may also hold certificates that cannot issue (trusted as
    exactly themselves); a bundle that vouches for names holds real CAs only.
    """
    problems: list[str] = []
    for number, cert in enumerate(certs, start=1):
        where = f"entry {number} ({cert.subject.rfc4514_string()})"
        client = registered.get(spki(cert))
        if client is not None:
            problems.append(
                f"{where} is the certificate (key) of self_signed_tls_client_auth client "
                f"{client!r}: in a CA bundle its holder could issue certificates with any "
                "name. Remove it: registered self-signed certificates are accepted by their "
                "exact bytes (docs/self-signed-clients.md)")
        elif not is_ca(cert) and (not pins or can_issue(cert)):
            problems.append(
                f"{where} is not a CA certificate (it needs basicConstraints CA:TRUE and "
                "keyUsage keyCertSign)"
                + (", yet it can issue certificates (CA:TRUE without keyUsage, as openssl req "
                   "-x509 makes it, or no basicConstraints). A client's self-signed "
                   "certificate like this must not be put here, where its holder could issue "
                   "certificates with any name" if pins else "")
                + ": see docs/self-signed-clients.md")
    return problems


def chains_to(cert: x509.Certificate, anchors: list[x509.Certificate]) -> bool:
    """Does ``cert`` (a client certificate, sent without intermediates) chain to ``anchors``?

    The anchors are the issuing CAs themselves (intermediates included, as anchors).
    A self-issued certificate never chains: it would be its own voucher.
    """
    if self_issued(cert) or not anchors:
        return False
    # Client certificates often have no subjectAltName; the Web PKI leaf profile wants one.
    leaf = ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
    verifier = (PolicyBuilder().store(Store(anchors))
                .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=leaf)
                .build_client_verifier())
    try:
        verifier.verify(cert, [])
    except VerificationError:
        return False
    return True


def handshake_warnings(config: GatewayConfig, now: float | None = None) -> list[str]:
    """Registered self-signed clients the listener would refuse in the TLS handshake.

    For ``mtls-gateway check`` (and the start-up log): the configuration is valid, but such a
    client cannot connect. In header mode the front proxy decides, so nothing is said.
    """
    from .client_registry import certificates_from_jwks  # it imports this module

    listen = config.listen
    if not listen.tls or listen.client_certificate is not None:
        return []
    moment = time.time() if now is None else now
    bundle: list[x509.Certificate] = []
    if listen.client_ca == "pki" and listen.client_ca_file is not None:
        with contextlib.suppress(OSError, ValueError):
            bundle = x509.load_pem_x509_certificates(listen.client_ca_file.read_bytes())
    dates = listen.client_ca == "pki" or listen.client_cert_validity == "enforce"
    warnings: list[str] = []
    for name, registry in config.client_registries.items():
        for client in registry.clients:
            where = f"client_registries.{name}: client {client.client_id!r}"
            if client.method != "self_signed_tls_client_auth":
                continue
            if client.jwks_uri is not None:
                if listen.client_ca == "pki":
                    warnings.append(
                        f"{where} registers its certificate at jwks_uri, which the listener "
                        "cannot pin: under listen.client_ca: pki it connects only with a "
                        "certificate issued by a CA in client_ca_file (a self-signed one is "
                        "refused in the handshake); use listen.client_ca: any")
                continue
            try:
                ders = sorted(certificates_from_jwks(client.jwks))
            except ValueError:
                continue
            for der in ders:
                cert = x509.load_der_x509_certificate(der)
                subject = cert.subject.rfc4514_string()
                if dates and not (cert.not_valid_before_utc.timestamp() <= moment
                                  <= cert.not_valid_after_utc.timestamp()):
                    warnings.append(
                        f"{where}: its certificate ({subject}) is outside its validity period "
                        f"({cert.not_valid_before_utc:%Y-%m-%d} to "
                        f"{cert.not_valid_after_utc:%Y-%m-%d}): the handshake refuses it")
                if (listen.client_ca == "pki" and not self_issued(cert)
                        and not chains_to(cert, bundle)):
                    warnings.append(
                        f"{where}: its certificate ({subject}) is neither self-signed (pinned "
                        "by the gateway) nor issued by a CA in listen.client_ca_file: the "
                        "handshake refuses it")
    return warnings
