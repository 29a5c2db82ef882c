"""One token, one spelling (issue 17 item 5): every JWS segment is canonical unpadded
base64url (RFC 7515 section 2), else 401 token_malformed, on both request paths.

Each variant is signed for real over exactly the segments it sends, so that the old, lenient
decoding accepted it: a refusal here is never a bad signature in disguise.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from gwtest import GatewayFactory, Issuer, Pki, Upstream, base_config
from mtls_gateway.jwt_verifier import canonical_jws

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _flip_last_unused_bit(segment: str) -> str:
    """The same bytes with a nonzero unused trailing bit (needs len % 4 in (2, 3))."""
    assert len(segment) % 4 in (2, 3), segment
    return segment[:-1] + _ALPHABET[_ALPHABET.index(segment[-1]) ^ 1]


def _pad(segment: str) -> str:
    assert len(segment) % 4, segment
    return segment + "=" * (-len(segment) % 4)


@pytest.mark.parametrize(("token", "canonical"), [
    ("eyJh.eyJi.c2ln", True),
    ("eyJh.eyJi.c2lo", True),                 # 4 characters: no unused bits
    ("eyJh.eyJi.c2k", True),                  # "si": 2 unused bits, zero
    ("eyJh.eyJi.c2l", False),                 # "si" with a nonzero unused bit
    ("eyJh.eyJi.c2k=", False),                # padding
    ("eyJh.eyJi.c2ln==", False),
    ("eyJh=.eyJi.c2ln", False),
    ("eyJh.eyJi.c2+n", False),                # the standard alphabet
    ("eyJh.eyJi.c2/n", False),
    ("eyJh.eyJi.c2 n", False),                # white space
    ("eyJh.eyJi.c2\nln", False),
    ("eyJh.eyJi.c", False),                   # a length no bytes have
    ("eyJh.eyJi", False),                     # not three segments
    ("eyJh.eyJi.c2ln.x", False),
])
def test_canonical_jws(token: str, canonical: bool) -> None:
    assert canonical_jws(token) is canonical


def _sign(issuer: Issuer, header_segment: str, payload_segment: str) -> str:
    signing_input = f"{header_segment}.{payload_segment}".encode()
    signature = issuer.key("rsa-1").private.sign(signing_input, padding.PKCS1v15(),
                                                 hashes.SHA256())
    return f"{header_segment}.{payload_segment}.{_b64(signature)}"


def _segments(issuer: Issuer, thumbprint: str) -> tuple[str, str]:
    """Header and payload segments whose lengths are 2 mod 4 (room for == and 2 free bits...
    4 free bits in fact: 2 characters carry 12 bits for one byte)."""
    header: dict[str, Any] = {"alg": "RS256", "kid": "rsa-1", "typ": "at+jwt", "x": ""}
    while len(_b64(json.dumps(header).encode())) % 4 != 2:
        header["x"] += "x"
    claims = issuer.claims(thumbprint, filler="")
    while len(_b64(json.dumps(claims).encode())) % 4 != 2:
        claims["filler"] += "x"
    return _b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode())


def _on_signature(change: Callable[[str], str]) -> Callable[[str], str]:
    def changed(token: str) -> str:
        head, _, signature = token.rpartition(".")
        return head + "." + change(signature)
    return changed


def _std_alphabet(segment: str) -> str:
    return segment.replace("-", "+").replace("_", "/")


SPELLINGS: dict[str, Callable[[Issuer, str, str], str]] = {
    "canonical": lambda i, h, p: _sign(i, h, p),
    # RS256 with a 2048-bit key: 342 characters, 2 mod 4
    "signature_padded": lambda i, h, p: _on_signature(_pad)(_sign(i, h, p)),  # the issue's
    "signature_one_pad": lambda i, h, p: _sign(i, h, p) + "=",
    "signature_trailing_bits": lambda i, h, p: _on_signature(_flip_last_unused_bit)(
        _sign(i, h, p)),
    "signature_standard_alphabet": lambda i, h, p: _on_signature(_std_alphabet)(
        _sign(i, h, p)),
    "payload_padded": lambda i, h, p: _sign(i, h, _pad(p)),
    "payload_trailing_bits": lambda i, h, p: _sign(i, h, _flip_last_unused_bit(p)),
    "header_padded": lambda i, h, p: _sign(i, _pad(h), p),
    "header_trailing_bits": lambda i, h, p: _sign(i, _flip_last_unused_bit(h), p),
}
#: "=" inside the credential is no RFC 6750 b64token at all: refused before any provider.
NOT_A_B64TOKEN = {"payload_padded", "header_padded"}


@pytest.mark.parametrize("lane", [True, False], ids=["fast_lane", "aiohttp"])
@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
async def test_one_token_one_spelling(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream,
        lane: bool, spelling: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mtls_gateway.access")
    config = base_config(pki, issuer, upstream)
    config["fast_lane"] = lane
    gw = await make_gateway(config)
    header, payload = _segments(issuer, pki.clients["a"].thumbprint)
    token = SPELLINGS["canonical"](issuer, header, payload)
    variant = SPELLINGS[spelling](issuer, header, payload)
    if spelling == "signature_standard_alphabet":
        assert variant != token, "the signature has neither - nor _: mint again"
    # the canonical token first, so that a variant cannot ride on a cached verdict either
    assert (await gw.request("/accounts", token=token)).status == 200
    reply = await gw.request("/accounts", token=variant)
    if spelling == "canonical":
        assert reply.status == 200
        assert len(upstream.seen) == 2
        return
    status, reason, error = ((400, "malformed_authorization", "invalid_request")
                             if spelling in NOT_A_B64TOKEN else
                             (401, "token_malformed", "invalid_token"))
    assert (reply.status, reply.json()["reason"]) == (status, reason), reply.body
    assert f'error="{error}"' in reply.headers["WWW-Authenticate"]
    assert len(upstream.seen) == 1                 # only the canonical request
    assert caplog.records[-1].decision["reason"] == reason  # type: ignore[attr-defined]
