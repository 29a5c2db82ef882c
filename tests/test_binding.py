from __future__ import annotations

import pytest

from mtls_gateway.binding import check_binding
from mtls_gateway.config import Binding
from mtls_gateway.errors import InvalidToken
from mtls_gateway.tls import PeerCertificate
from mtls_gateway.tokeninfo import TokenInfo

A = "A4DtL2JmUMhAsvJj5tKyn64SqzmuXbMrJa0n761y5v0"
B = "njtR9sbnWiQia-WS6mgh6hMsZD-OovR7-1AkYxOgvGI"


def _token(x5t: str | None, other_cnf: bool = False, jkt: str | None = None) -> TokenInfo:
    return TokenInfo("p", "sub", "cid", frozenset(), x5t,
                     x5t is not None or other_cnf or jkt is not None, None, jkt)


def _peer(tp: str | None) -> PeerCertificate | None:
    return PeerCertificate(tp, "CN=x", 0.0) if tp else None


@pytest.mark.parametrize(("mode", "cnf", "other_cnf", "peer", "reason"), [
    ("required", A, False, A, None),
    ("required", A, False, B, "binding_mismatch"),
    ("required", A, False, None, "no_client_cert"),
    ("required", None, False, A, "binding_missing"),
    ("required", None, True, A, "binding_missing"),
    ("optional", None, False, None, None),
    ("optional", None, True, A, "binding_unsupported"),
    ("optional", A, False, A, None),
    ("optional", A, False, B, "binding_mismatch"),
    ("optional", A, False, None, "no_client_cert"),
    ("off", A, False, B, None),
    ("off", None, False, None, None),
])
def test_binding(mode: Binding, cnf: str | None, other_cnf: bool, peer: str | None,
                 reason: str | None) -> None:
    if reason is None:
        check_binding(mode, _token(cnf, other_cnf), _peer(peer))
        return
    with pytest.raises(InvalidToken) as info:
        check_binding(mode, _token(cnf, other_cnf), _peer(peer))
    assert info.value.reason == reason


@pytest.mark.parametrize(("mode", "x5t", "peer", "reason"), [
    ("off", None, None, "dpop_bearer_downgrade"),
    ("off", A, A, "dpop_bearer_downgrade"),     # off checks no certificate: no proof at all
    ("optional", None, A, "binding_unsupported"),
    ("optional", A, A, None),                   # its certificate binding is proven
    ("required", None, A, "binding_missing"),
    ("required", A, A, None),
])
def test_a_dpop_bound_token_as_bearer(mode: Binding, x5t: str | None, peer: str | None,
                                      reason: str | None) -> None:
    """RFC 9449 section 7.2: a token bound to a DPoP key is never taken as a plain bearer
    token, whatever the certificate binding mode."""
    token = _token(x5t, jkt="some-jkt")
    if reason is None:
        check_binding(mode, token, _peer(peer))
        return
    with pytest.raises(InvalidToken) as info:
        check_binding(mode, token, _peer(peer))
    assert info.value.reason == reason
