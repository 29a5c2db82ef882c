"""Throwaway X.509 material for the demo and the tests.

Real certificates made with ``cryptography``: a CA, server and client leaves it
signs, and self-signed client certificates (RFC 8705 section 2.2). Nothing here
is used on the request path; it exists so that ``mtls-gateway demo`` and the
test-suite can stand up real mutual TLS without openssl or any other tool.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertKey", "issue_client", "issue_server", "make_ca", "self_signed_client"]

_PrivateKey = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class CertKey:
    """A certificate with its private key; ``issuer`` is None for a root."""

    cert: x509.Certificate
    key: _PrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """Write ``stem.crt`` and ``stem.key`` (mode 0600) and return both paths."""
        directory.mkdir(parents=True, exist_ok=True)
        crt, key = directory / f"{stem}.crt", directory / f"{stem}.key"
        crt.write_bytes(self.cert_pem)
        key.touch(mode=0o600)
        key.write_bytes(self.key_pem)
        return crt, key


def _name(common_name: str, organization: str = "mtls-gateway test") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             days: int, not_before: dt.datetime | None) -> x509.CertificateBuilder:
    start = not_before or (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
    )


def make_ca(common_name: str = "mtls-gateway demo CA", *, days: int = 30) -> CertKey:
    """A self-signed root that may sign leaves (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    cert = (
        _builder(name, name, key.public_key(), days, None)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertKey(cert, key)


def _leaf(ca: CertKey, common_name: str, usage: x509.ObjectIdentifier,
          sans: list[x509.GeneralName], days: int,
          not_before: dt.datetime | None = None) -> CertKey:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(_name(common_name), ca.cert.subject, key.public_key(), days, not_before)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return CertKey(builder.sign(ca.key, hashes.SHA256()), key)


def issue_server(ca: CertKey, hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"),
                 *, days: int = 30) -> CertKey:
    """A TLS server certificate for ``hosts`` (DNS names or IP addresses)."""
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    return _leaf(ca, hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, sans, days)


def issue_client(ca: CertKey, common_name: str, *, days: int = 30,
                 not_before: dt.datetime | None = None,
                 sans: list[x509.GeneralName] | None = None) -> CertKey:
    """A TLS client certificate; two calls with one name give two distinct certificates."""
    return _leaf(ca, common_name, ExtendedKeyUsageOID.CLIENT_AUTH, sans or [], days, not_before)


def self_signed_client(common_name: str, *, days: int = 30,
                       not_before: dt.datetime | None = None) -> CertKey:
    """A client certificate that chains nowhere (``self_signed_tls_client_auth``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    cert = (
        _builder(name, name, key.public_key(), days, not_before)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertKey(cert, key)
