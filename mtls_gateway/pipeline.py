"""The decision core: every auth step of every request, top to bottom in one function.

route -> peer certificate -> credential -> verify -> sender constraint -> authorize
-> identity headers

Transport-neutral: the aiohttp handler (:mod:`mtls_gateway.gateway`) and the fast lane
(:mod:`mtls_gateway.fastlane`) each describe their request as a :class:`RequestView`, await
:meth:`Pipeline.decide`, and carry out the :class:`Allow` or :class:`Refuse` it returns: they
parse and relay bytes, they hold no auth step of their own. What happened is recorded here
too (:meth:`Pipeline.record`): one decision log line and the request metrics, the same facts
whichever way a request came in.

Where to change what (docs/architecture.md has the picture):

* a new sender constraint (DPoP, RFC 9449): :meth:`Pipeline.sender_constraint`; the view
  carries what a proof check needs (method, target, Host, every ``Authorization`` and
  ``DPoP`` value);
* a new credential scheme: :meth:`Pipeline.credential`;
* a new provider kind: a :class:`~mtls_gateway.providers.Verifier`, built in gateway.py.

A refusal's decision line carries the token's safe summary and what was expected
(:meth:`Pipeline.refusal_facts`, built only for refusals). ``mtls-gateway explain`` runs
:meth:`Pipeline.decide` itself with ``view.trace`` set (:mod:`mtls_gateway.trace`): a new
step should note its check there when tracing, so explain keeps showing every check.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from .bearer import bearer_from
from .binding import check_binding
from .cert_headers import encode_client_cert
from .config import AuthMtlsClient, AuthNone, AuthPolicy, GatewayConfig, JwtProvider, Route
from .decision_log import log_fields, token_digest, token_hash
from .dpop import DpopRefusal, DpopVerifier, ProofRequest, authorization_scheme, dpop_refusal
from .errors import (
    AuthChallenge,
    InsufficientScope,
    InternalError,
    InvalidRequest,
    InvalidToken,
    NoToken,
    Refusal,
)
from .jwt_verifier import JwtVerifier
from .metrics import Metrics
from .providers import Verifier, pick_verifier
from .refusal import Rendered, render
from .routing import Router
from .tls import PeerCertificate
from .token_endpoint import TokenEndpoint
from .token_summary import token_summary
from .tokeninfo import TokenInfo
from .trace import Check, note, tracing

__all__ = [
    "Allow",
    "ConnectionMemo",
    "Credential",
    "Decision",
    "Pipeline",
    "Refuse",
    "RequestView",
]

log = logging.getLogger("mtls_gateway.pipeline")


@dataclass(slots=True)
class RequestView:
    """A request as the decision core sees it, whichever transport parsed it.

    ``target`` is the request target exactly as addressed (origin form, percent-encoding
    and query untouched); ``path`` its decoded path, for routing. Header values are as
    sent, every occurrence in order: ``authorization`` and ``dpop`` (RFC 9449 wants exactly
    one ``DPoP`` header and the ``DPoP`` scheme); no step reads another header (a new one
    would add its field here, filled by both transports).
    """

    method: str
    target: str
    path: str
    host: str | None                     # the Host header (None: absent)
    authorization: tuple[str, ...]
    dpop: tuple[str, ...]
    token_in_query: bool                 # an access_token query parameter is present
    scheme: str                          # "https" (mutual TLS) or "http" (behind a proxy)
    remote: str                          # the peer address, "" when unknown
    memo: ConnectionMemo
    peer: Callable[[], PeerCertificate | None]   # may raise (a malformed proxy header)
    #: The request body, read whole up to a limit (token endpoints); None: not available on
    #: this transport (the fast lane carries no bodies and never routes a token endpoint).
    read_form: Callable[[int], Awaitable[bytes]] | None = None
    #: ``explain`` only: every check is appended here (:mod:`mtls_gateway.trace`); None in
    #: a running gateway, which then records nothing.
    trace: list[Check] | None = None


@dataclass(frozen=True, slots=True)
class Credential:
    """The access token a request presents, the scheme it came in (``Bearer``) and the
    verifier its route picked for it."""

    scheme: str
    token: str
    digest: bytes                        # SHA-256: the verifier caches' key
    token_hash: str                      # the log's name for it
    verifier: Verifier


@dataclass(slots=True)
class ConnectionMemo:
    """What one client connection's last credential came to.

    Keep-alive clients send the same ``Authorization`` value on every request: the memo
    saves parsing, hashing and looking it up again, and building the same identity headers.
    What is checked on every use (exp, nbf, the key set, binding, scope) still runs on every
    request. A memo made by another :class:`Pipeline` (before a reload) counts for nothing.
    """

    owner: object | None = None          # the Pipeline that filled it
    authorization: str = ""              # the Authorization value, as sent
    providers: tuple[str, ...] = ()      # of the route the verifier was picked for
    credential: Credential | None = None
    entry: object | None = None          # the verifier's cache entry (Verifier.cached_entry)
    route: Route | None = None           # identity below: made for this route...
    info: TokenInfo | None = None        # ...this verdict...
    peer: PeerCertificate | None = None  # ...and this certificate
    identity: Mapping[str, str] | None = None
    #: a refused credential's token summary (credential, verdict, summary): deny lines only
    summary: tuple[Credential, TokenInfo | None, dict[str, object]] | None = None


@dataclass(slots=True)
class Allow:
    """Forward the request: to ``upstream_url``, with ``identity`` headers added."""

    route: Route
    upstream_url: str
    identity: Mapping[str, str]          # identity headers and Client-Cert; never mutated
    reason: str                          # allowed | public_route | client_authenticated
    fields: dict[str, object]            # the decision log line's facts so far
    peer: PeerCertificate | None
    started: float
    body: bytes | None = None            # token endpoints: the body as read, forwarded as is
    #: headers added to the client's answer, after the upstream's (a fresh DPoP-Nonce)
    response_headers: Mapping[str, str] | None = None

    allowed = True


@dataclass(slots=True)
class Refuse:
    """Answer with ``refusal`` (rendered by :mod:`mtls_gateway.refusal`); nothing forwarded."""

    refusal: Refusal
    fields: dict[str, object]
    peer: PeerCertificate | None
    started: float
    route: Route | None = None

    allowed = False


Decision = Allow | Refuse


class Pipeline:
    """The auth steps of one configuration generation (rebuilt on reload)."""

    def __init__(self, config: GatewayConfig, *, verifiers: Mapping[str, Verifier],
                 token_endpoints: Mapping[int, TokenEndpoint], metrics: Metrics,
                 resource_metadata: Callable[[Route | None], str] | None = None) -> None:
        self.config = config
        self.realm = config.realm
        #: the RFC 9728 metadata URL a Bearer challenge names, by route (routes[].resource)
        self.resource_metadata = resource_metadata
        self.router = Router(config.routes)
        self.verifiers = verifiers
        self.token_endpoints = token_endpoints       # id(route) -> endpoint
        self.metrics = metrics
        self.default_upstream = config.upstream.url
        self._identity = config.upstream.identity_headers
        # DPoP (RFC 9449): one proof verifier for the routes that accept DPoP, if any
        self.dpop = DpopVerifier(config.dpop) if any(
            isinstance(r.auth, AuthPolicy) and r.auth.sender_constraint != "mtls"
            for r in config.routes) else None

    async def decide(self, view: RequestView,
                     serves: Callable[[Route], bool] | None = None) -> Decision | None:
        """Allow or refuse ``view``. ``serves``: the transport's say on the route (the fast
        lane takes only some); False there returns None before anything else is looked at."""
        started = time.perf_counter()
        fields: dict[str, object] = {"method": view.method, "path": view.path,
                                     "remote": view.remote or None}
        route: Route | None = None
        peer: PeerCertificate | None = None
        credential: Credential | None = None
        info: TokenInfo | None = None
        trace = view.trace
        try:
            route = self.router.match(view.method, view.path, view.target)
            if serves is not None and not serves(route):
                return None
            fields["route"] = route.name
            peer = view.peer()
            auth = route.auth
            if trace is not None:
                self._trace_route(trace, route, peer)
            identity: Mapping[str, str]
            body: bytes | None = None
            answer: Mapping[str, str] | None = None
            if isinstance(auth, AuthPolicy):
                credential = self.credential(view, auth)
                if credential is None:
                    raise NoToken()
                fields["token_hash"] = credential.token_hash
                if auth.binding == "required" and peer is None \
                        and auth.sender_constraint == "mtls":
                    raise InvalidToken("no_client_cert", "a client certificate is required")
                verifier = credential.verifier
                fields["provider"] = verifier.name
                info = self._cached(verifier, view.memo, credential.digest)
                if info is None:
                    if trace is None:
                        info = await verifier.verify(credential.token, credential.digest)
                    else:
                        note(trace, "credential", "pass", scheme=credential.scheme,
                             token_hash=credential.token_hash, provider=verifier.name)
                        with tracing(trace):
                            info = await verifier.verify(credential.token, credential.digest)
                nonce = await self.sender_constraint(auth, info, peer, view, credential)
                if nonce is not None:       # RFC 9449 s8.2: the client's nonce is ageing
                    answer = {"DPoP-Nonce": nonce}
                if trace is not None:
                    self._trace_constraint(trace, auth, info, peer)
                self.authorize(auth, info)
                if trace is not None:
                    note(trace, "scope", "pass", required=list(auth.scopes),
                         granted=sorted(info.scopes))
                identity = self.identity_headers(route, info, peer, view.memo)
                reason = "allowed"
            elif isinstance(auth, AuthMtlsClient):   # a token endpoint (RFC 8705 s2)
                if view.read_form is None:
                    raise InternalError("internal_error", "token endpoint without a body")
                endpoint = self.token_endpoints[id(route)]
                body = await view.read_form(auth.max_body_bytes)
                client = endpoint.authenticate(body, view.authorization, peer)
                fields["client_id"] = client.client_id
                identity = self._with_client_cert(route, dict(client.upstream_headers), peer)
                reason = "client_authenticated"
            elif isinstance(auth, AuthNone):
                identity = self.identity_headers(route, None, peer, view.memo)
                reason = "public_route"
            else:   # an auth type without its branch must fail closed, never become public
                raise TypeError(f"no request path for {type(auth).__name__}")
            return Allow(route, route.upstream_url or self.default_upstream, identity, reason,
                         fields, peer, started, body, response_headers=answer)
        except Refusal as exc:
            if route is not None and isinstance(route.auth, AuthPolicy) \
                    and route.auth.sender_constraint != "mtls":
                self._challenge(exc, route.auth, view)
            if credential is not None and route is not None \
                    and isinstance(route.auth, AuthPolicy):
                fields.update(self.refusal_facts(exc, route.auth, credential, info, peer,
                                                 view.memo))
            if trace is not None:
                note(trace, "route" if route is None else "refusal", "fail", reason=exc.reason,
                     **{k: v for k, v in fields.items()
                        if k.startswith(("token_", "expected_", "dpop_"))})
            return Refuse(exc, fields, peer, started, route)
        except Exception:  # a bug must fail closed, logged, and never reach the upstream
            log.exception("internal error while deciding %s %s", view.method, view.path)
            return Refuse(InternalError(), fields, peer, started, route)

    # --- explaining a refusal (deny lines only) and a decision (explain only) ----------------

    def refusal_facts(self, exc: Refusal, policy: AuthPolicy, credential: Credential,
                      info: TokenInfo | None, peer: PeerCertificate | None,
                      memo: ConnectionMemo | None = None) -> dict[str, object]:
        """A deny line's facts: the token's safe summary (token_summary.py) and, for a
        refusal about a value, what was expected instead. The summary is remembered for the
        connection: a client refused again with the same token is not decoded again."""
        if memo is not None and memo.summary is not None and memo.summary[0] is credential \
                and memo.summary[1] is info:
            out = dict(memo.summary[2])
        else:
            out = token_summary(credential.token, info)
            if memo is not None:
                memo.summary = (credential, info, dict(out))
        reason = exc.reason
        provider = self.config.providers.get(credential.verifier.name)
        if reason == "wrong_issuer" and provider is not None:
            out["expected_iss"] = provider.issuer
        elif reason == "wrong_audience" and provider is not None:
            out["expected_aud"] = list(provider.audiences)
        elif reason == "alg_not_allowed" and isinstance(provider, JwtProvider):
            out["expected_alg"] = list(provider.algorithms)
        elif reason == "wrong_typ" and isinstance(provider, JwtProvider):
            out["expected_typ"] = ["at+jwt"] if provider.require_typ_at_jwt else \
                ["at+jwt", "jwt", "(none)"]
        elif reason == "unknown_key" and isinstance(credential.verifier, JwtVerifier):
            keys = credential.verifier.keys.current
            if keys is not None:        # (kid, alg) pairs of the provider's key set
                out["expected_kid"] = sorted(f"{kid} ({alg})" for kid, alg in keys.by_kid)[:16]
        elif reason == "insufficient_scope":
            out["expected_scope"] = list(policy.scopes)
            if info is not None:
                out["token_scope"] = sorted(info.scopes)[:16]
        elif reason in ("binding_mismatch", "binding_missing", "binding_unsupported",
                        "no_client_cert"):
            out["expected_thumbprint"] = peer.thumbprint if peer is not None else "(none)"
        elif reason == "dpop_jkt_mismatch" and isinstance(exc, DpopRefusal):
            out["expected_jkt"] = info.cnf_jkt if info is not None else None
            out["dpop_proof_jkt"] = exc.proof_jkt
        return out

    def _trace_route(self, trace: list[Check], route: Route, peer: PeerCertificate | None) -> None:
        auth = route.auth
        note(trace, "route", "pass", route=route.name,
             auth=("token" if isinstance(auth, AuthPolicy) else
                   "mtls_client" if isinstance(auth, AuthMtlsClient) else "none"),
             providers=list(auth.providers) if isinstance(auth, AuthPolicy) else None,
             upstream=route.upstream_url or self.default_upstream)
        note(trace, "certificate", "info",
             thumbprint=peer.thumbprint if peer else None, subject=peer.subject if peer else None)

    @staticmethod
    def _trace_constraint(trace: list[Check], policy: AuthPolicy, info: TokenInfo,
                          peer: PeerCertificate | None) -> None:
        note(trace, "sender_constraint", "pass", constraint=policy.sender_constraint,
             binding=policy.binding, token_x5t_s256=info.cnf_x5t_s256,
             certificate_x5t_s256=peer.thumbprint if peer else None, token_jkt=info.cnf_jkt)

    # --- the steps ------------------------------------------------------------------------------

    def credential(self, view: RequestView, policy: AuthPolicy) -> Credential | None:
        """The request's access token (RFC 6750 ``Bearer``), None without one; raises for a
        malformed or ambiguous one. Remembered per connection with its verifier."""
        memo = view.memo
        values = view.authorization
        if memo.credential is not None and memo.owner is self and len(values) == 1 \
                and values[0] == memo.authorization and memo.providers == policy.providers \
                and not view.token_in_query and (memo.credential.scheme == "Bearer"
                                                 or policy.sender_constraint != "mtls"):
            return memo.credential
        scheme = "Bearer"
        if policy.sender_constraint == "mtls":
            token = bearer_from(values, view.token_in_query)
        else:
            scheme, token = self._dpop_credential(policy, values, view.token_in_query)
        if token is None:
            return None
        digest = token_digest(token)
        credential = Credential(scheme, token, digest, token_hash(token, digest),
                                pick_verifier(self.verifiers, policy.providers, token))
        # a new credential: everything known about the previous one is forgotten
        memo.owner, memo.authorization, memo.providers = self, values[0], policy.providers
        memo.credential, memo.entry = credential, None
        return credential

    @staticmethod
    def _cached(verifier: Verifier, memo: ConnectionMemo, digest: bytes) -> TokenInfo | None:
        """The verified-token cache's verdict (may raise a Refusal); None: ask verify()."""
        if memo.entry is not None:
            info = verifier.reuse(memo.entry, digest)
            if info is not None:
                return info
        memo.entry = entry = verifier.cached_entry(digest)
        return None if entry is None else verifier.reuse(entry, digest)

    async def sender_constraint(self, policy: AuthPolicy, info: TokenInfo,
                                peer: PeerCertificate | None, view: RequestView,
                                credential: Credential) -> str | None:
        """May this sender use this token? Raise a Refusal if not.

        ``mtls``: RFC 8705 certificate binding (``cnf.x5t#S256``), as ``binding`` says; a
        DPoP-bound token (``cnf.jkt``) is never taken as a bearer token, ``binding: off`` too.
        ``dpop``: the token must be bound to a DPoP key (``cnf.jkt``), sent with the DPoP
        scheme and one valid, fresh proof by that key (RFC 9449 sections 4.3, 7).
        ``mtls_or_dpop``: the token's ``cnf`` decides; a token bound both ways is checked
        both ways. A DPoP-bound token sent as Bearer is refused (section 7.2).

        Returns a fresh nonce to send (``DPoP-Nonce``, RFC 9449 section 8.2) when the proof's
        was issued in a window the nonce issuer has since left, else None."""
        constraint = policy.sender_constraint
        if constraint == "mtls":
            check_binding(policy.binding, info, peer)     # (off: never a DPoP-bound token)
            return None
        if info.cnf_jkt is None:
            if constraint == "mtls_or_dpop" and info.cnf_x5t_s256 is not None \
                    and credential.scheme == "Bearer":
                check_binding("required", info, peer)
                return None
            if constraint == "mtls_or_dpop" and not info.has_cnf:
                raise InvalidToken("binding_missing", "token is not bound to a client "
                                   "certificate or a DPoP key")
            raise dpop_refusal("dpop_binding_missing")
        if credential.scheme != "DPoP":
            raise dpop_refusal("dpop_bearer_downgrade")
        if constraint == "mtls_or_dpop" and info.cnf_x5t_s256 is not None:
            check_binding("required", info, peer)
        assert self.dpop is not None        # built whenever a route accepts DPoP
        proof = await self.dpop.check(view.dpop, ProofRequest(
            view.method, view.target, view.host, view.scheme, credential.token,
            credential.digest), expected_jkt=info.cnf_jkt, nonce_required=policy.dpop_nonce)
        if view.trace is not None:
            note(view.trace, "dpop_proof", "pass", proof_jkt=proof.jkt, token_jkt=info.cnf_jkt,
                 method=view.method, target=view.target, host=view.host)
        return proof.next_nonce

    @staticmethod
    def _dpop_credential(policy: AuthPolicy, values: tuple[str, ...],
                         in_query: bool) -> tuple[str, str | None]:
        """``(scheme, token)`` on a route that accepts DPoP: the ``DPoP`` scheme, or Bearer
        where certificate-bound tokens are accepted too (mtls_or_dpop)."""
        parsed = authorization_scheme(values[0]) if len(values) == 1 else None
        if parsed is None or parsed[0] == "bearer":
            token = bearer_from(values, in_query)
            if token is not None and policy.sender_constraint == "dpop":
                raise dpop_refusal("dpop_bearer_downgrade")   # (before any verification)
            return "Bearer", token
        if in_query:
            raise InvalidRequest("multiple_tokens", "more than one access token in the request")
        if not parsed[1]:
            raise InvalidRequest("malformed_authorization", "malformed DPoP credentials")
        return "DPoP", parsed[1]

    def _challenge(self, exc: Refusal, policy: AuthPolicy, view: RequestView) -> None:
        """A refusal on a route that accepts DPoP challenges for DPoP (RFC 9449 s7.1): the
        error goes in the challenge of the scheme the client used."""
        if exc.status not in (400, 401, 403) or self.dpop is None:
            return
        values = view.authorization
        used = authorization_scheme(values[0]) if len(values) == 1 else None
        nonce = exc.nonce if isinstance(exc, DpopRefusal) else None
        exc.challenge = AuthChallenge(
            dpop_algs=self.dpop.algorithms, bearer=policy.sender_constraint == "mtls_or_dpop",
            error_in="bearer" if used is not None and used[0] == "bearer"
            and policy.sender_constraint == "mtls_or_dpop" else "dpop",
            nonce=nonce)

    async def close(self) -> None:
        """Release what this generation holds (the DPoP replay store's connections)."""
        if self.dpop is not None:
            await self.dpop.store.close()

    @staticmethod
    def authorize(policy: AuthPolicy, info: TokenInfo) -> None:
        missing = [s for s in policy.scopes if s not in info.scopes]
        if missing:
            raise InsufficientScope("insufficient_scope", "token lacks a required scope",
                                    " ".join(policy.scopes))

    def identity_headers(self, route: Route, info: TokenInfo | None,
                         peer: PeerCertificate | None,
                         memo: ConnectionMemo) -> Mapping[str, str]:
        """What the upstream is told about the caller (the same mapping while the route,
        verdict and certificate are the same: transports may key their own caches on it)."""
        if memo.identity is not None and memo.route is route and memo.info is info \
                and memo.peer is peer:
            return memo.identity
        out: dict[str, str] = {}
        if info is not None:
            ids = self._identity
            for header, value in ((ids.subject, info.subject), (ids.client_id, info.client_id),
                                  (ids.scope, " ".join(sorted(info.scopes))),
                                  (ids.thumbprint, peer.thumbprint if peer else None),
                                  (ids.provider, info.provider)):
                if header and value:
                    out[header] = value
        self._with_client_cert(route, out, peer)
        if any("\r" in v or "\n" in v or "\0" in v for v in out.values()):
            # (a claim no header can carry; aiohttp's client refuses it too)
            raise InternalError("internal_error", "identity header value not representable")
        memo.route, memo.info, memo.peer, memo.identity = route, info, peer, out
        return out

    @staticmethod
    def _with_client_cert(route: Route, identity: dict[str, str],
                          peer: PeerCertificate | None) -> dict[str, str]:
        if route.forward_client_cert and peer is not None and peer.der:
            identity["Client-Cert"] = encode_client_cert(peer.der)
        return identity

    # --- what happened --------------------------------------------------------------------------

    def render(self, refusal: Refusal, route: Route | None = None) -> Rendered:
        """What the client is told (the same on every transport); ``route``: the route the
        request matched, whose RFC 9728 document a challenge names."""
        metadata = self.resource_metadata
        return render(refusal, self.realm, metadata(route) if metadata is not None else None)

    def record(self, decision: Decision, reason: str, status: int) -> None:
        """The decision log line and the request metrics: one place, same facts."""
        self.record_fields(decision.fields, reason, status, allowed=decision.allowed,
                           peer=decision.peer, started=decision.started)

    def record_fields(self, fields: dict[str, object], reason: str, status: int, *,
                      allowed: bool, peer: PeerCertificate | None, started: float) -> None:
        """:meth:`record` for an answer made without a decision (the metadata document)."""
        elapsed = time.perf_counter() - started
        verdict = "allow" if allowed else "deny"
        route = str(fields.get("route", "-"))   # "-": no route matched
        if reason.startswith("upstream_"):
            self.metrics.upstream_errors.labels(route, reason).inc()
        self.metrics.request(route, verdict, reason, status, elapsed)
        line: dict[str, object] = {"decision": verdict, "reason": reason, "status": status}
        if peer is not None:
            line["client_thumbprint"], line["client_subject"] = peer.thumbprint, peer.subject
        line["latency_ms"] = round(elapsed * 1000, 3)
        line.update(fields)
        log_fields(line)

    def upstream_answered(self, route: Route, seconds: float) -> None:
        """Seconds until the upstream's answer head arrived."""
        self.metrics.observe(self.metrics.upstream_seconds, route.name, seconds)
