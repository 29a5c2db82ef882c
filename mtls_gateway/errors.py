"""Every error the gateway raises on purpose, and what the client is told.

::

    GatewayError
    ├── ConfigError              bad gateway.yaml: every problem with its YAML path; refuse to start
    └── Refusal                  a request is refused; carries status + stable reason code
        ├── InvalidRequest       400 error="invalid_request"  (token in query, several tokens)
        ├── RequestTimeout       408                          (request body too slow)
        ├── BodyTooLarge         413                          (request body over the cap)
        ├── NoToken              401, no error attribute      (RFC 6750 section 3.1)
        ├── InvalidToken         401 error="invalid_token"    (bad/expired/unbound token)
        ├── InsufficientScope    403 error="insufficient_scope", scope=
        ├── NoRoute              404                          (no route matches)
        ├── TokenEndpointRefusal RFC 6749 section 5.2 JSON, no Bearer challenge (auth: mtls_client)
        │   ├── InvalidTokenRequest  400 error="invalid_request"  (malformed token request)
        │   └── InvalidClient        401 error="invalid_client"   (client authentication failed)
        ├── DependencyDown       503                          (JWKS/introspection down)
        ├── InternalError        500                          (a bug: fail closed, logged)
        └── UpstreamFailed       502                          (upstream unreachable or broken)
            └── UpstreamTimeout  504                          (upstream too slow)

Foreign errors (pyjwt, aiohttp, ssl) are translated into these exactly once, at
the edge where they are caught, with ``raise ... from exc``. ``reason`` is a
stable, documented code for logs and metrics; ``description`` is short, safe to
show the client and never contains the token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

__all__ = [
    "AuthChallenge",
    "BodyTooLarge",
    "ConfigError",
    "DependencyDown",
    "GatewayError",
    "InsufficientScope",
    "InternalError",
    "InvalidClient",
    "InvalidRequest",
    "InvalidToken",
    "InvalidTokenRequest",
    "NoRoute",
    "NoToken",
    "Refusal",
    "RequestTimeout",
    "TokenEndpointRefusal",
    "UpstreamFailed",
    "UpstreamTimeout",
    "upstream_refusal",
]


class GatewayError(Exception):
    """Base of everything the gateway raises deliberately."""


class ConfigError(GatewayError):
    """The configuration is unusable; ``problems`` lists each one as ``path: message``."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} in configuration"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in self.problems))


@dataclass(frozen=True, slots=True)
class AuthChallenge:
    """The challenges of a route that accepts DPoP (RFC 9449 section 7.1).

    Set on a refusal by the decision core; :mod:`mtls_gateway.refusal` renders it:
    a ``DPoP`` challenge with ``algs``, the ``Bearer`` one too when the route also takes
    certificate-bound tokens, the error in the challenge of the scheme the client used,
    and ``DPoP-Nonce`` when the client is to retry with a nonce.
    """

    dpop_algs: tuple[str, ...]
    bearer: bool                          # send the Bearer challenge too (mtls_or_dpop)
    error_in: Literal["bearer", "dpop"]   # the challenge that carries error=...
    nonce: str | None = None


class Refusal(GatewayError):
    """A request is refused. Subclasses fix the HTTP status and RFC 6750 error code."""

    status: ClassVar[int] = 403
    error: ClassVar[str | None] = None
    #: None: the Bearer challenge alone (RFC 6750), as on every mutual-TLS route.
    challenge: AuthChallenge | None = None

    def __init__(self, reason: str, description: str = "") -> None:
        super().__init__(f"{reason}: {description}" if description else reason)
        self.reason = reason
        self.description = description


class InvalidRequest(Refusal):
    status = 400
    error = "invalid_request"


class RequestTimeout(Refusal):
    """The client was too slow sending its request body."""

    status = 408


class BodyTooLarge(Refusal):
    """The request body is larger than ``limits.max_body_size``."""

    status = 413


class NoToken(Refusal):
    status = 401
    error = None

    def __init__(self, reason: str = "no_token", description: str = "") -> None:
        super().__init__(reason, description)


class InvalidToken(Refusal):
    status = 401
    error = "invalid_token"


class InsufficientScope(Refusal):
    status = 403
    error = "insufficient_scope"

    def __init__(self, reason: str, description: str, scope: str) -> None:
        super().__init__(reason, description)
        self.scope = scope


class NoRoute(Refusal):
    status = 404


class TokenEndpointRefusal(Refusal):
    """Refused at a token endpoint: answered per RFC 6749 section 5.2, not RFC 6750.

    ``basic`` records that the client sent HTTP Basic credentials, which obliges a
    ``WWW-Authenticate: Basic`` challenge on 401 (RFC 6749 section 5.2).
    """

    status = 400
    error = "invalid_request"

    def __init__(self, reason: str, description: str = "", *, basic: bool = False) -> None:
        super().__init__(reason, description)
        self.basic = basic


class InvalidTokenRequest(TokenEndpointRefusal):
    status = 400
    error = "invalid_request"


class InvalidClient(TokenEndpointRefusal):
    status = 401
    error = "invalid_client"


class DependencyDown(Refusal):
    status = 503


class InternalError(Refusal):
    """A bug on the request path: refused (never forwarded), logged with its traceback."""

    status = 500
    error = "internal_error"

    def __init__(self, reason: str = "internal_error", description: str = "") -> None:
        super().__init__(reason, description)


class UpstreamFailed(Refusal):
    """The upstream could not serve the request: 502 unreachable or broken.

    ``cause``: why, in a few safe words for the decision line (never shown to the client).
    """

    status = 502

    def __init__(self, reason: str, description: str = "", *, cause: str = "") -> None:
        super().__init__(reason, description)
        self.cause = cause


class UpstreamTimeout(UpstreamFailed):
    status = 504


def upstream_refusal(cause: str, *, timeout: bool = False) -> UpstreamFailed:
    """The one refusal for an upstream that failed before answering, on every path: 504
    ``upstream_timeout`` or 502 ``upstream_unavailable``, with ``cause`` for the log."""
    if timeout:
        return UpstreamTimeout("upstream_timeout", "upstream did not answer in time",
                               cause=cause)
    return UpstreamFailed("upstream_unavailable", "upstream is unavailable", cause=cause)
