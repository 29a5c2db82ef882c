"""What a client registry's files hold, parsed without I/O (config validation uses it too).

* a registered client's JWK Set (``jwks`` or the document at ``jwks_uri``): the DER of
  the first ``x5c`` certificate of each key (``self_signed_tls_client_auth``);
* a registry ``ca_file``: its trust anchors (``tls_client_auth`` chain check).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from cryptography import x509

__all__ = ["certificates_from_jwks", "load_client_ca"]


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


def load_client_ca(data: bytes) -> list[x509.Certificate]:
    """The trust anchors of a registry ``ca_file``; ValueError if it has none."""
    certs = x509.load_pem_x509_certificates(data)
    if not certs:
        raise ValueError("contains no certificate")
    return certs
