"""Finding the access token in a request (RFC 6750 section 2).

Only the ``Authorization: Bearer`` header is accepted. A token in the query
string is refused (it leaks into logs and caches and would reach the upstream),
and a request that carries more than one token is malformed. ``None`` means "no
credentials at all" (401 without an error code); a malformed credential raises.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from multidict import CIMultiDictProxy, MultiDictProxy

from .errors import InvalidRequest

__all__ = ["bearer_from", "bearer_token"]

# RFC 6750 section 2.1 b64token
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def bearer_token(headers: CIMultiDictProxy[str] | Mapping[str, str],
                 query: MultiDictProxy[str] | Mapping[str, str]) -> str | None:
    """The bearer token, None when the request has none, or :class:`InvalidRequest`."""
    values = (headers.getall("Authorization", [])
              if isinstance(headers, CIMultiDictProxy) else
              [v for k, v in headers.items() if k.lower() == "authorization"])
    return bearer_from(values, "access_token" in query)


def bearer_from(values: Sequence[str], in_query: bool) -> str | None:
    """:func:`bearer_token` from every ``Authorization`` value and whether the query has an
    ``access_token`` parameter (what a transport-neutral request view carries)."""
    if len(values) > 1 or (values and in_query and _is_bearer(values[0])):
        raise InvalidRequest("multiple_tokens", "more than one access token in the request")
    if in_query:
        raise InvalidRequest("token_in_query", "access tokens are accepted only in the "
                             "Authorization header")
    if not values or not _is_bearer(values[0]):
        return None
    token = values[0][7:].strip(" ")
    if not _B64TOKEN.fullmatch(token):
        raise InvalidRequest("malformed_authorization", "malformed Bearer credentials")
    return token


def _is_bearer(value: str) -> bool:
    return value[:7].lower() == "bearer " or value.strip().lower() == "bearer"
