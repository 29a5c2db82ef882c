"""RFC 8705 section 3: is this token bound to the certificate of this connection?

``required``: the token must carry ``cnf["x5t#S256"]`` and the connection must
have presented that exact certificate. ``optional``: a token that carries a
confirmation must match; a token without ``cnf`` passes. ``off``: plain bearer, but
never a token bound to a DPoP key (``cnf.jkt``): sent as a bearer token, without its
proof, it is refused (RFC 9449 section 7.2; the other modes refuse it by its ``cnf``).
"""

from __future__ import annotations

from .config import Binding
from .errors import InvalidToken
from .reasons import REASONS
from .thumbprint import thumbprint_matches
from .tls import PeerCertificate
from .tokeninfo import TokenInfo

__all__ = ["check_binding"]


def check_binding(mode: Binding, token: TokenInfo, peer: PeerCertificate | None) -> None:
    """Raise :class:`InvalidToken` unless ``token`` may be used on this connection."""
    if mode == "off":
        if token.cnf_jkt is not None:
            raise InvalidToken("dpop_bearer_downgrade",
                               REASONS["dpop_bearer_downgrade"].description)
        return
    if token.cnf_x5t_s256 is None:
        if mode == "required":
            raise InvalidToken("binding_missing", "token is not bound to a client certificate")
        if token.has_cnf:
            raise InvalidToken("binding_unsupported",
                               "token uses a confirmation method other than x5t#S256")
        return
    if peer is None:
        raise InvalidToken("no_client_cert", "token is certificate-bound but no client "
                           "certificate was presented")
    if not thumbprint_matches(token.cnf_x5t_s256, peer.thumbprint):
        raise InvalidToken("binding_mismatch", "token is bound to a different certificate")
