"""What a verified access token says, whichever provider verified it.

JWT claims (RFC 9068) and introspection responses (RFC 7662) carry the same
members, so both providers reduce a token to one :class:`TokenInfo`, and the
binding and scope checks downstream never know which kind it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidToken

__all__ = ["TokenInfo", "token_info_from_claims"]


@dataclass(frozen=True, slots=True)
class TokenInfo:
    provider: str
    subject: str | None
    client_id: str | None
    scopes: frozenset[str]
    cnf_x5t_s256: str | None     # the certificate the token is bound to (RFC 8705 s3.1)
    has_cnf: bool                # any confirmation at all (an x5t#S256 or another method)
    expires_at: float | None
    cnf_jkt: str | None = None   # the DPoP key the token is bound to (RFC 9449 s6)


def _scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """``scope`` is a space-separated string (RFC 9068/7662); some issuers use ``scp`` lists."""
    raw = claims.get("scope", claims.get("scp"))
    if isinstance(raw, str):
        return frozenset(raw.split())
    if isinstance(raw, list) and all(isinstance(s, str) for s in raw):
        return frozenset(raw)
    if raw is None:
        return frozenset()
    raise InvalidToken("token_malformed", "scope claim is malformed")


def _confirmation(claims: Mapping[str, Any]) -> tuple[str | None, str | None, bool]:
    """(x5t#S256, jkt, any cnf at all); a malformed member is refused, never ignored."""
    cnf = claims.get("cnf")
    if cnf is None:
        return None, None, False
    if not isinstance(cnf, dict):
        raise InvalidToken("token_malformed", "cnf claim is malformed")
    x5t, jkt = cnf.get("x5t#S256"), cnf.get("jkt")
    if x5t is not None and (not isinstance(x5t, str) or not x5t):
        raise InvalidToken("token_malformed", "cnf x5t#S256 is malformed")
    if jkt is not None and (not isinstance(jkt, str) or not jkt):
        raise InvalidToken("token_malformed", "cnf jkt is malformed")
    return x5t, jkt, True


def token_info_from_claims(provider: str, claims: Mapping[str, Any]) -> TokenInfo:
    """Reduce validated claims to :class:`TokenInfo`; malformed members are refused."""
    cnf, jkt, has_cnf = _confirmation(claims)
    sub, client_id, exp = claims.get("sub"), claims.get("client_id"), claims.get("exp")
    return TokenInfo(
        provider=provider,
        subject=sub if isinstance(sub, str) else None,
        client_id=client_id if isinstance(client_id, str) else None,
        scopes=_scopes(claims),
        cnf_x5t_s256=cnf,
        has_cnf=has_cnf,
        expires_at=float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool)
        else None,
        cnf_jkt=jkt,
    )
