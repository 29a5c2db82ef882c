"""Every reason code the gateway logs, with its status, its OAuth ``error`` and its meaning.

One registry (pure: no I/O, no aiohttp): the README's "Responses and reason codes" table
and SECURITY.md's table are checked against it (tests/test_reasons.py), and
:mod:`mtls_gateway.refusal` takes the generic ``error`` of a status from here. A new reason
code is added here first; the test then says which documents miss it.

``level`` is how loud the decision is for an operator: ``info`` for a client's own fault,
``warning`` for a dependency or an upstream failing (worth an alert when frequent),
``error`` for a bug.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["ALLOWED", "REASONS", "Reason", "generic_error"]

Level = Literal["info", "warning", "error"]


@dataclass(frozen=True, slots=True)
class Reason:
    status: int
    error: str | None            # the OAuth / body ``error`` (None: the status's generic one)
    description: str
    level: Level = "info"


def _r(status: int, error: str | None, description: str, level: Level = "info") -> Reason:
    return Reason(status, error, description, level)


_TOKEN = "invalid_token"
_CLIENT = "invalid_client"
_REQ = "invalid_request"
_DPOP = "invalid_dpop_proof"

#: Refusals: code -> what the client gets.
REASONS: dict[str, Reason] = {
    # the request itself
    "token_in_query": _r(400, _REQ, "a token in the query string"),
    "multiple_tokens": _r(400, _REQ, "more than one access token"),
    "malformed_authorization": _r(400, _REQ, "malformed Bearer credentials"),
    "bad_path": _r(400, _REQ, "a path an upstream might read differently"),
    "bad_target": _r(400, _REQ, "a request target that is not an origin-form path"),
    "bad_request": _r(400, _REQ, "HTTP the gateway will not pass (unparseable, CONNECT, ...)"),
    "invalid_client_cert_header": _r(400, _REQ, "a trusted proxy's certificate header is "
                                     "malformed"),
    "duplicate_client_cert_header": _r(400, _REQ, "a certificate header sent twice"),
    "header_timeout": _r(408, None, "the request head was too slow"),
    "body_timeout": _r(408, None, "the request body stalled"),
    "body_too_large": _r(413, None, "the request body is over limits.max_body_size"),
    "request_line_too_long": _r(414, None, "the request line is over limits.max_header_size"),
    "headers_too_large": _r(431, None, "a header over the limits, or too many headers"),
    "too_many_connections": _r(503, None, "over limits.max_connections", "warning"),
    # the token
    "no_token": _r(401, None, "no credentials (challenge without an error code)"),
    "token_expired": _r(401, _TOKEN, "exp has passed"),
    "token_not_yet_valid": _r(401, _TOKEN, "nbf or iat is in the future"),
    "wrong_issuer": _r(401, _TOKEN, "iss is not the provider's issuer"),
    "wrong_audience": _r(401, _TOKEN, "aud names none of the provider's audiences"),
    "missing_claim": _r(401, _TOKEN, "a required claim is missing"),
    "bad_signature": _r(401, _TOKEN, "the signature does not verify"),
    "alg_not_allowed": _r(401, _TOKEN, "alg is not on the provider's allowlist"),
    "unknown_key": _r(401, _TOKEN, "no key of the key set has this kid"),
    "crit_unsupported": _r(401, _TOKEN, "a crit header"),
    "wrong_typ": _r(401, _TOKEN, "typ is not an access-token type"),
    "token_malformed": _r(401, _TOKEN, "not a well-formed token"),
    "token_invalid": _r(401, _TOKEN, "the token failed another check"),
    "token_encrypted": _r(401, _TOKEN, "a JWE: never decrypted"),
    "header_unsupported": _r(401, _TOKEN, "a JWS header with cty, zip or b64"),
    "token_inactive": _r(401, _TOKEN, "introspection said active: false, or its answer about "
                         "this token was not RFC 7662"),
    "token_unknown": _r(401, _TOKEN, "introspection answered 400 unsupported_token_type"),
    # the sender constraint
    "no_client_cert": _r(401, _TOKEN, "no client certificate for a bound token or route"),
    "binding_missing": _r(401, _TOKEN, "the token is not bound (binding: required)"),
    "binding_mismatch": _r(401, _TOKEN, "the token is bound to another certificate"),
    "binding_unsupported": _r(401, _TOKEN, "a confirmation method other than x5t#S256"),
    # the sender constraint: DPoP (RFC 9449; WWW-Authenticate: DPoP, see mtls_gateway/dpop.py)
    "dpop_proof_missing": _r(401, _DPOP, "a DPoP proof is required with this token"),
    "dpop_proof_invalid": _r(401, _DPOP, "DPoP proof is malformed or its signature is invalid"),
    "dpop_alg_not_allowed": _r(401, _DPOP, "DPoP proof algorithm is not allowed"),
    "dpop_htm_mismatch": _r(401, _DPOP, "DPoP proof htm does not match the request method"),
    "dpop_htu_mismatch": _r(401, _DPOP, "DPoP proof htu does not match the request URI"),
    "dpop_proof_expired": _r(401, _DPOP, "DPoP proof iat is too old"),
    "dpop_iat_in_future": _r(401, _DPOP, "DPoP proof iat is in the future"),
    "dpop_ath_mismatch": _r(401, _DPOP, "DPoP proof ath does not match the access token"),
    "dpop_replayed": _r(401, _DPOP, "DPoP proof has already been used", "warning"),
    "dpop_nonce_required": _r(401, "use_dpop_nonce", "resource server requires a fresh nonce "
                              "in the DPoP proof"),
    "dpop_jkt_mismatch": _r(401, _TOKEN, "token is bound to a different DPoP key", "warning"),
    "dpop_binding_missing": _r(401, _TOKEN, "token is not bound to a DPoP key"),
    "dpop_bearer_downgrade": _r(401, _TOKEN, "a DPoP-bound token must be sent with the DPoP "
                                "scheme", "warning"),
    "dpop_replay_store_unavailable": _r(503, None, "DPoP replay store is unavailable",
                                        "warning"),
    # authorization and routing
    "insufficient_scope": _r(403, "insufficient_scope", "a required scope is missing"),
    "no_route": _r(404, None, "no route matches path and method"),
    # token endpoints (auth: mtls_client), RFC 6749 section 5.2
    "client_id_missing": _r(401, _CLIENT, "no client_id in the body"),
    "client_id_mismatch": _r(401, _CLIENT, "client_id in the body and in Basic differ"),
    "client_auth_malformed": _r(401, _CLIENT, "unreadable HTTP Basic credentials"),
    "unknown_client": _r(401, _CLIENT, "the registry has no such client"),
    "client_cert_missing": _r(401, _CLIENT, "no client certificate"),
    "client_cert_untrusted": _r(401, _CLIENT, "the certificate does not chain as registered"),
    "client_cert_mismatch": _r(401, _CLIENT, "the certificate is not the registered one"),
    "token_request_malformed": _r(400, _REQ, "not a form, repeated client_id, several "
                                  "Authorization headers"),
    "token_request_too_large": _r(400, _REQ, "over max_body_bytes"),
    "client_jwks_unavailable": _r(503, None, "a client's jwks_uri never loaded or too old",
                                  "warning"),
    # dependencies
    "jwks_unavailable": _r(503, None, "no signing keys could ever be loaded", "warning"),
    "introspection_unavailable": _r(503, None, "introspection down, slow, 5xx, breaker open",
                                    "warning"),
    "introspection_bad_response": _r(503, None, "introspection answered something unusable "
                                     "failure_threshold times in a row", "warning"),
    "introspection_misconfigured": _r(503, None, "introspection answered 401/403/404/405: "
                                      "the gateway's credentials or endpoint are wrong",
                                      "warning"),
    "introspection_refused": _r(503, None, "introspection answered another 4xx (such as 429) "
                                "about this request", "warning"),
    "introspection_overloaded": _r(503, None, "the gateway's own introspection pool is full "
                                   "(max_waiting or queue_timeout); not the endpoint's fault",
                                   "warning"),
    # the upstream
    "upstream_unavailable": _r(502, None, "upstream refused, closed, or answered malformed",
                               "warning"),
    "upstream_timeout": _r(504, None, "no upstream bytes within upstream.read_timeout",
                           "warning"),
    # bugs
    "internal_error": _r(500, "internal_error", "a bug: refused, logged", "error"),
}

#: Codes of requests that were let through (their status is the upstream's, or the answer's
#: as far as it got).
ALLOWED: dict[str, str] = {
    "allowed": "a valid token, bound and authorized",
    "public_route": "a route with auth: none",
    "client_authenticated": "a token endpoint's client authenticated by its certificate",
    "metadata": "the RFC 9728 document, answered by the gateway",
    "upstream_aborted": "the upstream broke off after its answer head was relayed: the "
                        "client connection was cut",
    "client_closed": "the client went away before its answer was complete (499 if no answer "
                     "had started)",
}

_GENERIC = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
            408: "request_timeout", 413: "request_too_large", 414: "uri_too_long",
            431: "headers_too_large", 500: "internal_error", 502: "bad_gateway",
            503: "temporarily_unavailable", 504: "gateway_timeout"}


def generic_error(status: int) -> str:
    """The body's ``error`` for a refusal whose class names none."""
    return _GENERIC.get(status, "refused")
