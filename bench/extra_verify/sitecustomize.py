"""Bench only (row ``xverify-es256``): one extra ES256 verification per authorized request.

``bench/run.py`` starts one gateway with this folder first on ``PYTHONPATH`` and
``MTLS_GATEWAY_BENCH_EXTRA_VERIFY=1``; Python imports this module at start-up, and it wraps
``Pipeline.authorize`` so that every authorized request first verifies one ES256 signature,
by the very function a DPoP proof's signature goes through, over a proof-sized input, a
different signature each time. That row minus its reference is what one verification costs
*in the request path*, where it shares the core's caches with TLS, HTTP, the kernel and the
rest of the decision; the verification measured alone runs with warm caches. Nothing of the
gateway's code changes: the wrapper lives here and exists only in that process.
"""

from __future__ import annotations

import itertools
import os
import sys

#: What this module writes to the gateway's log once the wrapper is in place.
MARK = "bench: one extra ES256 verification per authorized request"

if os.environ.get("MTLS_GATEWAY_BENCH_EXTRA_VERIFY") == "1":
    from typing import Any

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    from mtls_gateway import dpop, pipeline

    _key = ec.generate_private_key(ec.SECP256R1())
    _public = _key.public_key()
    _signed: list[tuple[bytes, bytes]] = []
    for _n in range(512):
        _message = b"eyJ0eXAiOiJkcG9wK2p3dCJ9." + f"{_n:0400d}".encode()   # a proof's size
        _r, _s = decode_dss_signature(_key.sign(_message, ec.ECDSA(hashes.SHA256())))
        _signed.append((_message, _r.to_bytes(32, "big") + _s.to_bytes(32, "big")))
    _next = itertools.cycle(_signed).__next__
    _authorize = pipeline.Pipeline.authorize

    def _authorize_after_one_verification(policy: Any, info: Any) -> None:
        message, signature = _next()
        if not dpop._signature_valid("ES256", _public, message, signature):
            raise RuntimeError("bench: the extra ES256 verification failed")
        _authorize(policy, info)

    pipeline.Pipeline.authorize = staticmethod(_authorize_after_one_verification)  # type: ignore[method-assign]
    print(MARK, file=sys.stderr, flush=True)    # bench/run.py checks the row measures this
