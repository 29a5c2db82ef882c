"""A token endpoint behind the gateway: who the client is, from its certificate (RFC 8705 s2).

For an ``auth: {mtls_client: ...}`` route the gateway reads the token request (a small
form, read whole up to ``max_body_bytes``), takes ``client_id`` from the body (required
by RFC 8705 section 2) and, when the client also sent HTTP Basic credentials, from
those (RFC 6749 section 2.3.1: form-urlencoded before the Basic encoding), which must
agree. The registry then checks the certificate of the connection against that client's
registration. The authorization server receives the request with the body bytes
exactly as read, the verified certificate in RFC 9440 ``Client-Cert`` and the client id
in the configured header (inbound copies of both are always stripped by the proxy).

Refusals are RFC 6749 section 5.2 JSON (``invalid_client`` 401, ``invalid_request``
400), with ``WWW-Authenticate: Basic`` when the client used Basic. The gateway judges
the certificate only: Basic passwords are not checked here, and go on to the
authorization server untouched.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote_plus

from aiohttp import web

from .cert_headers import encode_client_cert
from .client_registry import ClientRegistry
from .config import AuthMtlsClient
from .errors import InvalidClient, InvalidTokenRequest, TokenEndpointRefusal
from .tls import PeerCertificate

__all__ = [
    "AuthenticatedClient",
    "TokenEndpoint",
    "basic_client_id",
    "client_id_of",
    "read_form",
    "token_refusal_response",
]

_FORM = "application/x-www-form-urlencoded"


@dataclass(frozen=True)
class AuthenticatedClient:
    client_id: str
    body: bytes                    # the token request as read, forwarded unchanged
    upstream_headers: dict[str, str]


def basic_client_id(authorization: list[str]) -> str | None:
    """The client id of HTTP Basic credentials (RFC 6749 s2.3.1), None without Basic.

    Raises :class:`InvalidClient` for malformed Basic credentials or several
    Authorization headers; other schemes are not client credentials and are ignored.
    """
    if len(authorization) > 1:
        raise InvalidTokenRequest("token_request_malformed", "several Authorization headers")
    if not authorization:
        return None
    scheme, _, credentials = authorization[0].strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidClient("client_auth_malformed", "malformed HTTP Basic credentials",
                            basic=True) from exc
    login, sep, _password = decoded.partition(":")
    if not sep:
        raise InvalidClient("client_auth_malformed", "malformed HTTP Basic credentials",
                            basic=True)
    return unquote_plus(login)


def client_id_of(body: bytes, authorization: list[str]) -> tuple[str, bool]:
    """``(client_id, basic_used)`` of a token request, or a token-endpoint refusal."""
    basic_id = basic_client_id(authorization)
    basic = basic_id is not None
    try:
        params = parse_qsl(body.decode("utf-8"), keep_blank_values=True,
                           strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidTokenRequest("token_request_malformed",
                                  "token request is not a well-formed form",
                                  basic=basic) from exc
    ids = [v for k, v in params if k == "client_id"]
    if len(ids) > 1:   # RFC 6749 section 3.2: no parameter more than once
        raise InvalidTokenRequest("token_request_malformed", "client_id is repeated",
                                  basic=basic)
    if not ids or not ids[0]:
        raise InvalidClient("client_id_missing", "client_id is required in the request body",
                            basic=basic)
    if basic_id is not None and basic_id != ids[0]:
        raise InvalidClient("client_id_mismatch",
                            "client_id in the body and in HTTP Basic differ", basic=True)
    return ids[0], basic


def token_refusal_response(exc: TokenEndpointRefusal, realm: str) -> web.Response:
    """RFC 6749 section 5.2 error response (never an RFC 6750 Bearer challenge)."""
    headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
    if exc.status == 401 and exc.basic:
        headers["WWW-Authenticate"] = f'Basic realm="{realm}", charset="UTF-8"'
    body = {"error": exc.error or "invalid_request", "reason": exc.reason}
    if exc.description:
        body["error_description"] = exc.description
    return web.json_response(body, status=exc.status, headers=headers)


async def read_form(request: web.Request, limit: int) -> bytes:
    """The whole form body of a token request, refused beyond ``limit`` or if not a form."""
    if request.content_length is not None and request.content_length > limit:
        raise InvalidTokenRequest("token_request_too_large", "token request is too large")
    if request.body_exists and request.content_type != _FORM:
        raise InvalidTokenRequest("token_request_malformed", f"token requests must be {_FORM}")
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(16 * 1024):
        size += len(chunk)
        if size > limit:
            raise InvalidTokenRequest("token_request_too_large", "token request is too large")
        chunks.append(chunk)
    return b"".join(chunks)


class TokenEndpoint:
    """One ``mtls_client`` route: authenticate, and say what the AS is to be told."""

    def __init__(self, policy: AuthMtlsClient, registry: ClientRegistry) -> None:
        self.policy = policy
        self.registry = registry

    def authenticate(self, body: bytes, authorization: Sequence[str],
                     peer: PeerCertificate | None) -> AuthenticatedClient:
        """The client of a token request (its ``body`` as read), or a refusal."""
        client_id, basic = client_id_of(body, list(authorization))
        client_id = self.registry.authenticate(client_id, peer, basic=basic)
        assert peer is not None   # authenticate() refuses a request without a certificate
        headers = {"Client-Cert": encode_client_cert(peer.der)}
        if self.policy.client_header:
            headers[self.policy.client_header] = client_id
        return AuthenticatedClient(client_id, body, headers)
