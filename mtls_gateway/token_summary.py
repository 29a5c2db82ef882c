"""What a deny line may say about a token: enough to see what was wrong, nothing to replay.

Built only for refusals (the allow path never pays for it): the unverified header and
payload of a JWT are decoded once more here, which is cheaper than carrying them from the
verifier on every request. Only these members are taken, each cut to a bounded size:
header ``alg``, ``kid``, ``typ``; claims ``iss``, ``aud``, ``exp``, ``client_id``; the kind
of ``cnf`` (``x5t#S256``, ``jkt``, another method or none) and its thumbprint. Never the
token, its signature, or any other claim (a claim may carry a secret). An opaque token
(introspection) is summarised from its verdict, when there is one.
"""

from __future__ import annotations

import base64
from typing import Any

from .strict_json import loads_object
from .tokeninfo import TokenInfo

__all__ = ["token_summary", "unverified_segments"]

_MAX_TOKEN_CHARS = 64 * 1024
_MAX_VALUE = 200            # characters of one string value
_MAX_LIST = 8               # members of an aud list


def unverified_segments(token: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Header and payload of a compact JWS, unverified; None if it is not one."""
    parts = token.split(".")
    if len(parts) != 3 or len(token) > _MAX_TOKEN_CHARS:
        return None
    try:
        header, payload = (loads_object(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
                           for p in parts[:2])
    except ValueError:      # binascii.Error and UnicodeDecodeError are ValueErrors
        return None
    return header, payload


def _safe(value: object) -> object:
    """A JSON scalar as it is (strings cut), anything else as its type's name."""
    if isinstance(value, str):
        return value if len(value) <= _MAX_VALUE else value[:_MAX_VALUE] + "..."
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return value
    if isinstance(value, list):
        return [_safe(v) for v in value[:_MAX_LIST]] + (["..."] if len(value) > _MAX_LIST
                                                         else [])
    return f"<{type(value).__name__}>"


def _cnf(cnf: object) -> tuple[str, object]:
    """(kind, thumbprint) of a ``cnf`` member."""
    if not isinstance(cnf, dict):
        return ("none", None) if cnf is None else ("malformed", None)
    for kind in ("x5t#S256", "jkt"):
        if kind in cnf:
            return kind, _safe(cnf[kind])
    return "other", None


def token_summary(token: str, info: TokenInfo | None) -> dict[str, object]:
    """The ``token_*`` fields of a deny line (see the module docstring)."""
    out: dict[str, object] = {}
    parts = unverified_segments(token)
    if parts is not None:
        header, payload = parts
        out["token_format"] = "jwt"
        for name in ("alg", "kid", "typ"):
            if name in header:
                out[f"token_{name}"] = _safe(header[name])
        for name in ("iss", "aud", "exp", "client_id"):
            if name in payload:
                out[f"token_{name}"] = _safe(payload[name])
        kind, thumbprint = _cnf(payload.get("cnf"))
    else:
        out["token_format"] = "opaque"
        kind, thumbprint = "none", None
        if info is not None:
            if info.client_id is not None:
                out["token_client_id"] = _safe(info.client_id)
            if info.expires_at is not None:
                out["token_exp"] = info.expires_at
    if info is not None:         # the verdict's cnf is what the checks compared
        kind, thumbprint = (("x5t#S256", info.cnf_x5t_s256) if info.cnf_x5t_s256 else
                            ("jkt", info.cnf_jkt) if info.cnf_jkt else
                            ("other", None) if info.has_cnf else ("none", None))
    out["token_cnf"] = kind
    if thumbprint is not None:
        out["token_cnf_thumbprint"] = thumbprint
    return out
