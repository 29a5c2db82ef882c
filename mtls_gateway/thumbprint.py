"""The RFC 8705 section 3.1 certificate thumbprint, ``x5t#S256``.

base64url without padding of SHA-256 over the certificate's DER encoding. It is
the one value that ties an access token to a TLS connection, so it lives alone,
with no knowledge of requests, tokens or configuration.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

__all__ = ["thumbprint_matches", "x5t_s256", "x5t_s256_of_pem_file"]


def x5t_s256(der: bytes) -> str:
    """``x5t#S256`` of a DER-encoded certificate."""
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


def x5t_s256_of_pem_file(path: Path) -> str:
    """``x5t#S256`` of the first certificate in a PEM (or DER) file."""
    data = path.read_bytes()
    cert = (
        x509.load_pem_x509_certificate(data)
        if b"-----BEGIN" in data
        else x509.load_der_x509_certificate(data)
    )
    return x5t_s256(cert.public_bytes(serialization.Encoding.DER))


def thumbprint_matches(confirmed: str, presented: str) -> bool:
    """Constant-time, exact comparison of the token's and the connection's thumbprint."""
    return hmac.compare_digest(confirmed.encode("utf-8"), presented.encode("utf-8"))
