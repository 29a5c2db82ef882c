"""What a refused client is told: one rendering, whichever transport writes it.

:func:`render` turns a :class:`~mtls_gateway.errors.Refusal` into status, headers and body;
the aiohttp handler makes a ``web.Response`` of it (gateway.py), the fast lane and the
connection guard write :func:`as_bytes` to their transport. So the answer to a refusal is
the same bytes (but for ``Date``) on every path.

* token problems: an RFC 6750 ``Bearer`` challenge (``error``, ``error_description``,
  ``scope``), naming the RFC 9728 metadata URL when configured (section 5.1);
* on a route that accepts DPoP (the refusal carries an
  :class:`~mtls_gateway.errors.AuthChallenge`): a ``DPoP`` challenge with ``algs`` (RFC 9449
  section 7.1), the Bearer one too under ``mtls_or_dpop``, and ``DPoP-Nonce`` (section 9);
* token endpoints (``auth: mtls_client``): RFC 6749 section 5.2 JSON, ``WWW-Authenticate:
  Basic`` only when the client used Basic, never a Bearer challenge;
* everything else: the small JSON body alone.

Bodies are ``{"error", "reason", "error_description"}`` and never echo the request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from http import HTTPStatus

from .answer import SERVER, http_date
from .errors import (
    AuthChallenge,
    InsufficientScope,
    InvalidRequest,
    InvalidToken,
    NoToken,
    Refusal,
    TokenEndpointRefusal,
)
from .reasons import REASONS, generic_error

__all__ = ["Rendered", "as_bytes", "render", "render_code"]


@dataclass(frozen=True, slots=True)
class Rendered:
    """A refusal's answer: what every transport writes (``Content-Length``, ``Date``,
    ``Server`` and ``Connection`` are the transport's)."""

    status: int
    phrase: str
    headers: tuple[tuple[str, str], ...]
    body: bytes


def _quote(value: str) -> str:
    return value.replace("\\", "").replace('"', "'")


_JSON = ("Content-Type", "application/json; charset=utf-8")


def render(exc: Refusal, realm: str, resource_metadata: str | None = None) -> Rendered:
    """The answer to ``exc`` (see the module docstring)."""
    headers: list[tuple[str, str]] = [_JSON, ("Cache-Control", "no-store")]
    if isinstance(exc, TokenEndpointRefusal):
        headers.append(("Pragma", "no-cache"))
        if exc.status == 401 and exc.basic:
            headers.append(("WWW-Authenticate",
                            f'Basic realm="{_quote(realm)}", charset="UTF-8"'))
        error = exc.error or "invalid_request"
    else:
        challenge = exc.challenge
        if challenge is not None:
            headers += _dpop_challenges(exc, challenge, realm, resource_metadata)
        elif isinstance(exc, NoToken | InvalidToken | InsufficientScope | InvalidRequest):
            headers.append(("WWW-Authenticate",
                            "Bearer " + _params(exc, realm, resource_metadata, True)))
        error = exc.error or generic_error(exc.status)
    body: dict[str, str] = {"error": error, "reason": exc.reason}
    if exc.description:
        body["error_description"] = exc.description
    return Rendered(exc.status, HTTPStatus(exc.status).phrase, tuple(headers),
                    json.dumps(body).encode())


def render_code(reason: str, status: int | None = None) -> Rendered:
    """The answer to a refusal known only by its registered code (the connection guard's:
    no request object, no challenge); ``status`` overrides the registry's."""
    entry = REASONS[reason]
    status = status or entry.status
    body = {"error": entry.error or generic_error(status), "reason": reason}
    return Rendered(status, HTTPStatus(status).phrase, (_JSON, ("Cache-Control", "no-store")),
                    json.dumps(body).encode())


def _params(exc: Refusal, realm: str, resource_metadata: str | None, with_error: bool) -> str:
    """The RFC 6750 section 3 parameters (RFC 9449 section 7.1 reuses them for DPoP)."""
    params = [f'realm="{_quote(realm)}"']
    if with_error and exc.error:
        params.append(f'error="{exc.error}"')
        if exc.description:
            params.append(f'error_description="{_quote(exc.description)}"')
    if with_error and isinstance(exc, InsufficientScope):
        params.append(f'scope="{_quote(exc.scope)}"')
    if resource_metadata:
        params.append(f'resource_metadata="{_quote(resource_metadata)}"')
    return ", ".join(params)


def _dpop_challenges(exc: Refusal, challenge: AuthChallenge, realm: str,
                     resource_metadata: str | None) -> list[tuple[str, str]]:
    """A DPoP route's answer: the DPoP challenge with ``algs``, the Bearer one too on a
    route that also takes certificate-bound tokens, and ``DPoP-Nonce`` (RFC 9449 s7.1, 9)."""
    out: list[tuple[str, str]] = []
    if challenge.bearer:
        out.append(("WWW-Authenticate", "Bearer " + _params(
            exc, realm, resource_metadata, challenge.error_in == "bearer")))
    dpop = _params(exc, realm, resource_metadata, challenge.error_in == "dpop")
    out.append(("WWW-Authenticate", f'DPoP {dpop}, algs="{" ".join(challenge.dpop_algs)}"'))
    if challenge.nonce:
        out.append(("DPoP-Nonce", challenge.nonce))
    return out


def as_bytes(rendered: Rendered, *, close: bool) -> bytes:
    """The whole HTTP/1.1 answer, for a transport, with its Date and Server."""
    head = [b"HTTP/1.1 %d %s\r\n" % (rendered.status, rendered.phrase.encode())]
    head += [b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in rendered.headers]
    head.append(b"Content-Length: %d\r\nDate: %s\r\nServer: %s\r\n"
                % (len(rendered.body), http_date(), SERVER))
    if close:
        head.append(b"Connection: close\r\n")
    return b"".join(head) + b"\r\n" + rendered.body
