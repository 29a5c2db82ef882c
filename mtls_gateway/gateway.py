"""The request path, top to bottom in one place.

route -> peer certificate -> token -> verify -> binding -> authorize -> forward

Every outcome, pass or refusal, ends in exactly one decision log line with a
stable reason code. Refusals are RFC 6750 responses and never reach the upstream.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from .bearer import bearer_token
from .binding import check_binding
from .cert_headers import encode_client_cert
from .client_cert import UNTRUSTED_HEADER, build_certificate_source
from .config import AuthPolicy, GatewayConfig, Provider
from .decision_log import log_decision, token_digest, token_hash
from .errors import (
    InsufficientScope,
    InvalidRequest,
    InvalidToken,
    NoToken,
    Refusal,
)
from .introspection import IntrospectionVerifier
from .jwt_verifier import JwtVerifier
from .metrics import Metrics
from .providers import Verifier, pick_verifier
from .proxy import ABORTED, UPSTREAM_SECONDS, Forwarder
from .routing import Router
from .tls import PeerCertificate
from .tokeninfo import TokenInfo

__all__ = ["Gateway", "build_verifier", "refusal_response"]

log = logging.getLogger("mtls_gateway.gateway")


def build_verifier(provider: Provider, metrics: Metrics | None = None) -> Verifier:
    if provider.kind == "jwt":
        return JwtVerifier(provider, metrics=metrics)
    return IntrospectionVerifier(provider, metrics)


def _quote(value: str) -> str:
    return value.replace("\\", "").replace('"', "'")


def refusal_response(exc: Refusal, realm: str) -> web.Response:
    """The client's answer to a refusal: RFC 6750 challenge for token problems."""
    headers: dict[str, str] = {"Cache-Control": "no-store"}
    if isinstance(exc, NoToken | InvalidToken | InsufficientScope | InvalidRequest):
        params = [f'realm="{_quote(realm)}"']
        if exc.error:
            params.append(f'error="{exc.error}"')
            if exc.description:
                params.append(f'error_description="{_quote(exc.description)}"')
        if isinstance(exc, InsufficientScope):
            params.append(f'scope="{_quote(exc.scope)}"')
        headers["WWW-Authenticate"] = "Bearer " + ", ".join(params)
    body: dict[str, str] = {"error": exc.error or _GENERIC_ERRORS.get(exc.status, "refused"),
                            "reason": exc.reason}
    if exc.description:
        body["error_description"] = exc.description
    return web.json_response(body, status=exc.status, headers=headers)


_GENERIC_ERRORS = {401: "unauthorized", 404: "not_found", 502: "bad_gateway",
                   503: "temporarily_unavailable", 504: "gateway_timeout"}


class Gateway:
    """Routes, verifiers and forwarder built once from a :class:`GatewayConfig`."""

    def __init__(self, config: GatewayConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.router = Router(config.routes)
        self.verifiers: dict[str, Verifier] = {
            name: build_verifier(p, self.metrics) for name, p in config.providers.items()}
        self.certificates = build_certificate_source(config.listen)
        self.forwarder = Forwarder(config.upstream, also_strip=self.certificates.strip)
        self._identity = config.upstream.identity_headers
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def ready(self) -> bool:
        """Every provider usable (each JWKS loaded at least once)."""
        return all(v.ready for v in self.verifiers.values())

    async def retire(self, grace: float) -> None:
        """After a reload: let requests that started here finish (up to ``grace``), then close."""
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            log.warning("closing replaced configuration with %d requests still running",
                        self._in_flight)
        await self.close()

    async def start(self) -> None:
        await self.forwarder.start()
        for verifier in self.verifiers.values():
            await verifier.start()

    async def close(self) -> None:
        for verifier in self.verifiers.values():
            await verifier.close()
        await self.forwarder.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self._in_flight += 1
        self._idle.clear()
        try:
            return await self._handle(request)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        fields: dict[str, object] = {"method": request.method, "path": request.path,
                                     "remote": request.remote}
        peer: PeerCertificate | None = None
        authorized = False
        try:
            route = self.router.match(request.method, request.path, request.raw_path)
            fields["route"] = route.name
            peer = self.certificates.peer(request)
            identity: dict[str, str] = {}
            if isinstance(route.auth, AuthPolicy):
                token = bearer_token(request.headers, request.query)
                if token is None:
                    raise NoToken()
                digest = token_digest(token)
                fields["token_hash"] = token_hash(token, digest)
                if route.auth.binding == "required" and peer is None:
                    raise InvalidToken("no_client_cert", "a client certificate is required")
                verifier = pick_verifier(self.verifiers, route.auth.providers, token)
                fields["provider"] = verifier.name
                info = await verifier.verify(token, digest)
                check_binding(route.auth.binding, info, peer)
                self._authorize(route.auth, info)
                identity = self._identity_headers(info, peer)
                reason = "allowed"
            else:
                reason = "public_route"
            if route.forward_client_cert and peer is not None and peer.der:
                identity["Client-Cert"] = encode_client_cert(peer.der)
            authorized = True
            response = await self.forwarder.forward(
                request, route.upstream_url or self.config.upstream.url, identity)
            self.metrics.upstream_seconds.labels(route.name).observe(response[UPSTREAM_SECONDS])
            if response.get(ABORTED):
                reason = "upstream_aborted"
        except Refusal as exc:
            response = refusal_response(exc, self.config.realm)
            reason = exc.reason
        except Exception:  # a bug must fail closed, logged, and never reach the upstream
            log.exception("internal error while handling %s %s", request.method, request.path)
            response = web.json_response({"error": "internal_error", "reason": "internal_error"},
                                         status=500, headers={"Cache-Control": "no-store"})
            reason = "internal_error"
        if request.get(UNTRUSTED_HEADER):
            fields["untrusted_cert_header"] = True
        if reason.startswith("upstream_"):
            self.metrics.upstream_errors.labels(str(fields.get("route", "-")), reason).inc()
        self._record(fields, authorized, reason, response.status, peer, started)
        return response

    @staticmethod
    def _authorize(policy: AuthPolicy, info: TokenInfo) -> None:
        missing = [s for s in policy.scopes if s not in info.scopes]
        if missing:
            raise InsufficientScope("insufficient_scope", "token lacks a required scope",
                                    " ".join(policy.scopes))

    def _identity_headers(self, info: TokenInfo, peer: PeerCertificate | None) -> dict[str, str]:
        ids, out = self._identity, {}
        for header, value in ((ids.subject, info.subject), (ids.client_id, info.client_id),
                              (ids.scope, " ".join(sorted(info.scopes))),
                              (ids.thumbprint, peer.thumbprint if peer else None),
                              (ids.provider, info.provider)):
            if header and value:
                out[header] = value
        return out

    def _record(self, fields: dict[str, object], authorized: bool, reason: str, status: int,
                peer: PeerCertificate | None, started: float) -> None:
        """The decision log line and the request metrics: one place, same facts."""
        elapsed = time.perf_counter() - started
        decision = "allow" if authorized else "deny"
        route = str(fields.get("route", "-"))   # "-": no route matched
        self.metrics.requests.labels(route, decision, reason, str(status)).inc()
        self.metrics.request_seconds.labels(route).observe(elapsed)
        log_decision(
            decision=decision, reason=reason, status=status,
            client_thumbprint=peer.thumbprint if peer else None,
            client_subject=peer.subject if peer else None,
            latency_ms=round(elapsed * 1000, 3),
            **fields,
        )
