"""The request path, top to bottom in one place.

route -> peer certificate -> token -> verify -> binding -> authorize -> forward

Every outcome, pass or refusal, ends in exactly one decision log line with a
stable reason code. Refusals are RFC 6750 responses and never reach the upstream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import HttpVersion10, HttpVersion11, web
from aiohttp.http import SERVER_SOFTWARE
from yarl import URL

from .bearer import bearer_token
from .binding import check_binding
from .cert_headers import encode_client_cert
from .client_cert import UNTRUSTED_HEADER, TlsCertificates, build_certificate_source
from .client_registry import ClientRegistry
from .config import AuthMtlsClient, AuthNone, AuthPolicy, GatewayConfig, Provider, Route
from .decision_log import log_decision, token_digest, token_hash
from .errors import (
    BodyTooLarge,
    InsufficientScope,
    InvalidRequest,
    InvalidToken,
    NoToken,
    Refusal,
    RequestTimeout,
    TokenEndpointRefusal,
    UpstreamFailed,
)
from .fastlane import PlainRequest, TokenMemo, UpstreamPool, http_date
from .framing import check_framing
from .introspection import IntrospectionVerifier
from .jwt_verifier import JwtVerifier
from .metadata import MetadataEndpoint
from .metrics import Metrics
from .providers import Verifier, pick_verifier
from .proxy import ABORTED, HOP_BY_HOP, UPSTREAM_ERROR, UPSTREAM_SECONDS, Forwarder
from .routing import Router
from .tls import PeerCertificate, peer_certificate
from .token_endpoint import TokenEndpoint, token_refusal_response
from .tokeninfo import TokenInfo
from .upstream_tls import UpstreamTargets

__all__ = ["Admission", "Gateway", "Lane", "build_verifier", "refusal_response"]

log = logging.getLogger("mtls_gateway.gateway")



def build_verifier(provider: Provider, metrics: Metrics | None = None) -> Verifier:
    if provider.kind == "jwt":
        return JwtVerifier(provider, metrics=metrics)
    return IntrospectionVerifier(provider, metrics)


def _quote(value: str) -> str:
    return value.replace("\\", "").replace('"', "'")


def refusal_response(exc: Refusal, realm: str,
                     resource_metadata: str | None = None) -> web.Response:
    """The client's answer to a refusal: RFC 6750 challenge for token problems (naming the
    RFC 9728 metadata URL when configured); RFC 6749 s5.2 errors at token endpoints."""
    if isinstance(exc, TokenEndpointRefusal):
        return token_refusal_response(exc, _quote(realm))
    headers: dict[str, str] = {"Cache-Control": "no-store"}
    if isinstance(exc, NoToken | InvalidToken | InsufficientScope | InvalidRequest):
        params = [f'realm="{_quote(realm)}"']
        if exc.error:
            params.append(f'error="{exc.error}"')
            if exc.description:
                params.append(f'error_description="{_quote(exc.description)}"')
        if isinstance(exc, InsufficientScope):
            params.append(f'scope="{_quote(exc.scope)}"')
        if resource_metadata:
            params.append(f'resource_metadata="{_quote(resource_metadata)}"')
        headers["WWW-Authenticate"] = "Bearer " + ", ".join(params)
    body: dict[str, str] = {"error": exc.error or _GENERIC_ERRORS.get(exc.status, "refused"),
                            "reason": exc.reason}
    if exc.description:
        body["error_description"] = exc.description
    return web.json_response(body, status=exc.status, headers=headers)


_LANE_CAUSES = {"upstream_timeout": "timeout", "upstream_unavailable": "unreachable_or_bad_answer",
                "upstream_aborted": "broke_off_mid_response"}

_GENERIC_ERRORS = {401: "unauthorized", 404: "not_found", 408: "request_timeout",
                   413: "request_too_large", 502: "bad_gateway",
                   503: "temporarily_unavailable", 504: "gateway_timeout"}


@dataclass(frozen=True, slots=True)
class _Target:
    """A plain-HTTP upstream as the fast lane writes to it."""

    address: tuple[str, int]
    base_path: bytes            # prefix of every forwarded target ("" for the root)
    host_header: bytes          # what aiohttp's client would send as Host


@dataclass(slots=True)
class Lane:
    """The fast lane's settings and upstream pool (:mod:`mtls_gateway.fastlane`)."""

    pool: UpstreamPool
    max_headers: int
    max_line: int
    read_timeout: float
    targets: dict[int, _Target]          # id(route) -> target; absent: not for the lane
    strip: frozenset[bytes]              # inbound headers never forwarded, hop-by-hop included


@dataclass(slots=True)
class Admission:
    """A plain request the gateway let into the fast lane, waiting for its token's verdict."""

    route: Route
    fields: dict[str, object]
    peer: PeerCertificate | None
    started: float
    upstream: tuple[str, int]
    reason: str
    memo: TokenMemo
    verifier: Verifier | None = None             # None: auth none, nothing to verify
    token: str = ""
    digest: bytes = b""

    def cached(self) -> TokenInfo | None:
        """The verified-token cache's verdict (may raise a Refusal); None: ask verify()."""
        verifier, memo = self.verifier, self.memo
        if verifier is None:
            return None
        if memo.entry is not None:
            info = verifier.reuse(memo.entry, self.digest)
            if info is not None:
                return info
        memo.entry = entry = verifier.cached_entry(self.digest)
        return None if entry is None else verifier.reuse(entry, self.digest)

    async def verify(self) -> TokenInfo:
        assert self.verifier is not None
        return await self.verifier.verify(self.token, self.digest)


def _target(url: str) -> _Target | None:
    parsed = URL(url.rstrip("/"))
    if parsed.scheme != "http" or parsed.raw_host is None or parsed.port is None \
            or parsed.raw_query_string or parsed.raw_fragment:
        return None
    host = parsed.host_port_subcomponent or ""
    return _Target((parsed.raw_host, parsed.port), parsed.raw_path.rstrip("/").encode(),
                   host.encode("ascii"))


class Gateway:
    """Routes, verifiers and forwarder built once from a :class:`GatewayConfig`."""

    def __init__(self, config: GatewayConfig, metrics: Metrics | None = None, *,
                 verifiers: Mapping[str, Verifier] | None = None) -> None:
        """``verifiers``: already started verifiers handed over by a reload (reload_carry.py);
        this gateway owns them now, and builds and starts the others itself."""
        self.config = config
        self.metrics = metrics or Metrics()
        self.router = Router(config.routes)
        given = verifiers or {}
        self.verifiers: dict[str, Verifier] = {
            name: given.get(name) or build_verifier(p, self.metrics)
            for name, p in config.providers.items()}
        self._to_start = [v for n, v in self.verifiers.items() if n not in given]
        self.owned: set[str] = set(self.verifiers)   # closed by close(); see release()
        self.certificates = build_certificate_source(config.listen)
        # Token endpoints (auth: mtls_client) and RFC 9728 metadata: see token_endpoint.py,
        # metadata.py.
        self.registries = {name: ClientRegistry(r) for name, r in config.client_registries.items()}
        self.token_endpoints = {id(r): TokenEndpoint(r.auth, self.registries[r.auth.registry])
                                for r in config.routes if isinstance(r.auth, AuthMtlsClient)}
        self.metadata = MetadataEndpoint(config) if config.metadata is not None else None
        self._metadata_url = self.metadata.url if self.metadata is not None else None
        client_headers = frozenset(r.auth.client_header.lower() for r in config.routes
                                   if isinstance(r.auth, AuthMtlsClient) and r.auth.client_header)
        self.forwarder = Forwarder(config.upstream,
                                   also_strip=self.certificates.strip | client_headers,
                                   limits=config.limits)
        self._identity = config.upstream.identity_headers
        self.upstreams = UpstreamTargets(config)    # TLS contexts: once per generation
        self.lane = self._build_lane(config) if config.fast_lane and isinstance(
            self.certificates, TlsCertificates) and config.listen.tls else None
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def _build_lane(self, config: GatewayConfig) -> Lane:
        targets = {}
        # A route with its own RFC 9728 resource stays off the lane: the lane's refusals are
        # answered by refusal_bytes, which does not know the route's resource_metadata URL.
        own = self.metadata.routes_with_own_resource if self.metadata else frozenset()
        for route in config.routes:
            target = _target(route.upstream_url or config.upstream.url)
            if target is not None and not isinstance(route.auth, AuthMtlsClient) \
                    and id(route) not in own:
                targets[id(route)] = target
        return Lane(pool=UpstreamPool(config.upstream.max_connections,
                                      config.upstream.connect_timeout),
                    max_headers=config.limits.max_headers,
                    max_line=config.limits.max_header_size,
                    read_timeout=config.upstream.read_timeout, targets=targets,
                    strip=frozenset(n.encode() for n in self.forwarder.strip | HOP_BY_HOP))

    @property
    def ready(self) -> bool:
        """Every provider usable (each JWKS loaded at least once)."""
        return all(v.ready for v in self.verifiers.values())

    def release(self, names: set[str]) -> None:
        """These verifiers (or their key sets) now belong to the next gateway: never close them."""
        self.owned -= names

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
        for verifier in self._to_start:
            await verifier.start()
        for registry in self.registries.values():
            await registry.start()

    async def close(self) -> None:
        if self.lane is not None:
            self.lane.pool.close()
        for name, verifier in self.verifiers.items():
            if name in self.owned:
                await verifier.close()
        for registry in self.registries.values():
            await registry.close()
        await self.forwarder.close()

    def begin(self) -> None:
        self._in_flight += 1
        self._idle.clear()

    def end(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.begin()
        try:
            return await self._handle(request)
        finally:
            self.end()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        fields: dict[str, object] = {"method": request.method, "path": request.path,
                                     "remote": request.remote}
        peer: PeerCertificate | None = None
        authorized = False
        if self.metadata is not None and self.metadata.serves(request):
            return self._serve_metadata(self.metadata, fields, started, request.path)
        body: bytes | None = None   # set when the gateway read the body (token endpoint)
        matched: Route | None = None    # for the challenge's resource_metadata (RFC 9728)
        try:
            check_framing(request, self.config.limits)
            route = matched = self.router.match(request.method, request.path, request.raw_path)
            fields["route"] = route.name
            peer = self.certificates.peer(request)
            identity: dict[str, str] = {}
            if isinstance(route.auth, AuthMtlsClient):   # a token endpoint (RFC 8705 s2)
                client = await self.token_endpoints[id(route)].authenticate(request, peer)
                fields["client_id"] = client.client_id
                identity, body = client.upstream_headers, client.body
                reason = "client_authenticated"
            elif isinstance(route.auth, AuthPolicy):
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
            elif isinstance(route.auth, AuthNone):
                reason = "public_route"
            else:   # an auth type without its branch must fail closed, never become public
                raise TypeError(f"no request path for {type(route.auth).__name__}")
            if route.forward_client_cert and peer is not None and peer.der:
                identity["Client-Cert"] = encode_client_cert(peer.der)
            authorized = True
            up = self.upstreams.of(route)
            response: web.StreamResponse
            if self.metadata is not None and self.metadata.rewrites(request):
                response = await self.metadata.rewritten(self.forwarder, request, up.url,
                                                         identity, up.context, up.server_name)
            else:
                response = await self.forwarder.forward(request, up.url, identity,
                                                        body_bytes=body, context=up.context,
                                                        server_name=up.server_name)
            self.metrics.observe(self.metrics.upstream_seconds, route.name,
                                 response[UPSTREAM_SECONDS])
            if response.get(ABORTED):
                reason = "upstream_aborted"
                fields["upstream_error"] = response.get(UPSTREAM_ERROR)
        except Refusal as exc:
            response = refusal_response(exc, self.config.realm,
                                        self.metadata.url_for(matched) if self.metadata
                                        else self._metadata_url)
            reason = exc.reason
            if isinstance(exc, UpstreamFailed) and exc.cause:
                fields["upstream_error"] = exc.cause
            if isinstance(exc, BodyTooLarge | RequestTimeout):
                response.force_close()  # the rest of the body is not worth reading
            if request.version not in (HttpVersion10, HttpVersion11):
                # aiohttp answers in the request's version: say "HTTP/1.1 400", not "HTTP/2.0"
                request._cache["version"] = HttpVersion11   # (a reify cache)
                response.force_close()
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

    # --- the same steps for the fast lane's plain requests (fastlane.py) -------------------------
    # Only a request that will pass is served there: every refusal returns None here and the
    # request takes _handle above, which answers it exactly as it answers any other.

    def admit(self, request: PlainRequest, transport: Any, remote: str,
              memo: TokenMemo) -> Admission | None:
        """route -> peer certificate -> token, for a plain request; None: _handle decides."""
        started = time.perf_counter()
        lane = self.lane
        if lane is None or (self.metadata is not None and (
                request.path in self.metadata.paths
                or request.path in self.metadata.rewrite_paths)):
            return None
        try:
            route = self.router.match(request.method, request.path, request.raw_path)
        except Refusal:
            return None
        target = lane.targets.get(id(route))
        if target is None:
            return None
        fields: dict[str, object] = {"method": request.method, "path": request.path,
                                     "remote": remote, "route": route.name}
        peer = peer_certificate(transport)
        auth = route.auth
        if isinstance(auth, AuthNone):
            return Admission(route, fields, peer, started, target.address, "public_route",
                             memo)
        if not isinstance(auth, AuthPolicy) or request.authorization is None \
                or (auth.binding == "required" and peer is None):
            return None
        if memo.gateway is not self or memo.authorization != request.authorization \
                or memo.providers != auth.providers:
            try:
                token = bearer_token({"Authorization": request.authorization}, {})
            except Refusal:
                return None
            if token is None:
                return None
            digest = token_digest(token)
            memo.remember(self, request.authorization, auth.providers,
                          pick_verifier(self.verifiers, auth.providers, token), token, digest,
                          token_hash(token, digest))
        fields["token_hash"] = memo.token_hash
        fields["provider"] = memo.verifier.name
        return Admission(route, fields, peer, started, target.address, "allowed", memo,
                         memo.verifier, memo.token, memo.digest)

    def upstream_request(self, admission: Admission, request: PlainRequest,
                         info: TokenInfo | None, remote: str) -> bytes | None:
        """binding -> authorize (raising a Refusal) -> the upstream's request head; None:
        _handle decides."""
        route, peer, memo = admission.route, admission.peer, admission.memo
        if isinstance(route.auth, AuthPolicy):
            if info is None:
                return None
            check_binding(route.auth.binding, info, peer)
            self._authorize(route.auth, info)
        if memo.identity is None or memo.route is not route or memo.info is not info:
            identity = self._identity_headers(info, peer) if info is not None else {}
            if route.forward_client_cert and peer is not None and peer.der:
                identity["Client-Cert"] = encode_client_cert(peer.der)
            lines: list[bytes] = []
            for name, text in (*identity.items(), ("X-Forwarded-For", remote),
                               ("X-Forwarded-Proto", "https")):
                if "\r" in text or "\n" in text:
                    return None         # aiohttp's client refuses these: let it say so
                lines += (name.encode(), b": ", text.encode(), b"\r\n")
            memo.route, memo.info, memo.identity = route, info, b"".join(lines)
        lane = self.lane
        assert lane is not None
        target = lane.targets[id(route)]
        drop = lane.strip | request.connection if request.connection else lane.strip
        out = [request.method.encode(), b" ", target.base_path, request.target,
               b" HTTP/1.1\r\nHost: ", target.host_header, b"\r\n"]
        for raw, lower, value in request.headers:
            if lower not in drop:
                out += (raw, b": ", value, b"\r\n")
        # (the Host value passed parse_plain: printable ASCII, so no CR or LF)
        out += (memo.identity, b"X-Forwarded-Host: ", request.host.encode(), b"\r\n\r\n")
        return b"".join(out)

    def upstream_answered(self, admission: Admission, seconds: float) -> None:
        self.metrics.observe(self.metrics.upstream_seconds, admission.route.name, seconds)

    def upstream_error(self, admission: Admission, reason: str) -> None:
        self.metrics.upstream_errors.labels(admission.route.name, reason).inc()
        # The lane does not pass its exception here: a coarse cause, never none at all.
        cause = _LANE_CAUSES.get(reason, reason)
        admission.fields.setdefault("upstream_error", cause)
        host, port = admission.upstream
        self.forwarder.warn(f"http://{host}:{port}", cause)

    def record_plain(self, admission: Admission, reason: str, status: int, *,
                     allowed: bool) -> None:
        self._record(admission.fields, allowed, reason, status, admission.peer,
                     admission.started)

    def refusal_bytes(self, exc: Refusal, *, close: bool) -> bytes:
        """The answer :func:`refusal_response` gives, as bytes for a transport."""
        response = refusal_response(exc, self.config.realm, self._metadata_url)
        body = response.body
        assert isinstance(body, bytes)
        head = [f"HTTP/1.1 {response.status} {response.reason}"]
        head += [f"{k}: {v}" for k, v in response.headers.items() if k != "Content-Length"]
        head += [f"Content-Length: {len(body)}", f"Date: {http_date().decode()}",
                 f"Server: {SERVER_SOFTWARE}"]
        if close:
            head.append("Connection: close")
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body

    def _serve_metadata(self, endpoint: MetadataEndpoint, fields: dict[str, object],
                        started: float, path: str) -> web.StreamResponse:
        """RFC 9728 protected resource metadata: public, answered by the gateway itself."""
        fields["route"] = "metadata"
        response = endpoint.document_response(path)
        self._record(fields, True, "metadata", response.status, None, started)
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
        self.metrics.request(route, decision, reason, status, elapsed)
        log_decision(
            decision=decision, reason=reason, status=status,
            client_thumbprint=peer.thumbprint if peer else None,
            client_subject=peer.subject if peer else None,
            latency_ms=round(elapsed * 1000, 3),
            **fields,
        )
