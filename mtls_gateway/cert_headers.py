"""Client certificates carried in HTTP headers by a front proxy, and to the upstream.

Pure parsing and encoding, no trust decisions (those live in
:mod:`mtls_gateway.client_cert`). Formats:

* RFC 9440 ``Client-Cert``: the DER certificate as a structured-field byte
  sequence, ``:<base64>:``; ``Client-Cert-Chain`` is a list of them.
"""

from __future__ import annotations

import base64

__all__ = ["encode_client_cert"]


def encode_client_cert(der: bytes) -> str:
    """RFC 9440 ``Client-Cert`` value: a structured-field byte sequence of the DER."""
    return ":" + base64.b64encode(der).decode("ascii") + ":"
