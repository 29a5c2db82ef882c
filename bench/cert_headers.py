"""Cost of reading a client certificate from a front proxy's header, per format.

Prints microseconds per call for a first sight (parse + describe) and for a repeat
(the digest-keyed cache a keep-alive client hits), with the TLS-mode cost of
describing a handshake certificate as the baseline in the same run.

    .venv/bin/python bench/cert_headers.py
"""

from __future__ import annotations

import hashlib
import timeit
from urllib.parse import quote

from mtls_gateway import pki
from mtls_gateway.cert_headers import (
    encode_client_cert,
    parse_client_cert,
    parse_pem_header,
    xfcc_client,
)
from mtls_gateway.tls import describe_certificate

CA = pki.make_ca("bench CA")
LEAF = pki.issue_client(CA, "bench-client")
DER = LEAF.cert_der
PEM = quote(LEAF.cert_pem.decode(), safe="")
XFCC = (f"By=spiffe://a;Hash={hashlib.sha256(DER).hexdigest()};Cert=\"{PEM}\";"
        f"Subject=\"CN=bench-client\"")


def per_call(fn: object, number: int = 5000) -> float:
    best = min(timeit.repeat(fn, number=number, repeat=5))  # type: ignore[arg-type]
    return best / number * 1e6


def main() -> None:
    baseline = per_call(lambda: describe_certificate(DER))
    rows = [
        ("tls (describe handshake cert)", baseline),
        ("rfc9440 parse + describe", per_call(
            lambda: describe_certificate(parse_client_cert(encode_client_cert(DER))))),
        ("xfcc parse + describe", per_call(lambda: describe_certificate(xfcc_client(XFCC)[0]
                                                                        or b""))),
        ("pem parse + describe", per_call(lambda: describe_certificate(parse_pem_header(PEM)))),
        ("cache hit (sha256 of value)", per_call(
            lambda: hashlib.sha256(XFCC.encode()).digest())),
    ]
    print(f"{'case':34} {'us/call':>8} {'x tls':>6}")
    for name, us in rows:
        print(f"{name:34} {us:8.1f} {us / baseline:6.2f}")


if __name__ == "__main__":
    main()
