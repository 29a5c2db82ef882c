"""The gateway of one configuration generation: the aiohttp request path and the fast lane.

Every auth step lives in :mod:`mtls_gateway.pipeline` (route -> peer certificate -> token
-> verify -> sender constraint -> authorize -> identity headers). This module builds it
once per configuration, describes an aiohttp request to it, and carries out its decision:
forward (:mod:`mtls_gateway.proxy`) or refuse (:mod:`mtls_gateway.refusal`). Plain
requests may take the fast lane (:mod:`mtls_gateway.fastlane`), which calls the same
pipeline. What stays here is transport: request framing (before any decision), the RFC 9728
metadata document (answered by the gateway, no auth), reading a token endpoint's body (the
pipeline asks for it) and the AS-metadata rewrite (a different way to forward).

Every outcome, pass or refusal, ends in exactly one decision log line with a stable reason
code. Refusals are RFC 6750 responses and never reach the upstream.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Mapping

from aiohttp import HttpVersion10, HttpVersion11, web
from yarl import URL

from .aiohttp_compat import answer_in_http11
from .client_cert import UNTRUSTED_HEADER, TlsCertificates, build_certificate_source
from .client_registry import ClientRegistry
from .config import AuthMtlsClient, GatewayConfig, Provider, Route
from .errors import BodyTooLarge, InternalError, Refusal, RequestTimeout, UpstreamFailed
from .fastlane import Lane, LaneTarget, UpstreamPool
from .framing import check_framing
from .introspection import IntrospectionVerifier
from .jwt_verifier import JwtVerifier
from .metadata import MetadataEndpoint
from .metrics import Metrics
from .pipeline import Allow, ConnectionMemo, Pipeline, Refuse, RequestView
from .providers import Verifier
from .proxy import ABORTED, HOP_BY_HOP, UPSTREAM_ERROR, UPSTREAM_SECONDS, Forwarder
from .refusal import Rendered
from .token_endpoint import TokenEndpoint, read_form
from .upstream_tls import UpstreamTargets

__all__ = ["Gateway", "build_verifier", "refusal_response"]

log = logging.getLogger("mtls_gateway.gateway")


def build_verifier(provider: Provider, metrics: Metrics | None = None) -> Verifier:
    if provider.kind == "jwt":
        return JwtVerifier(provider, metrics=metrics)
    return IntrospectionVerifier(provider, metrics)


def refusal_response(rendered: Rendered) -> web.Response:
    """A rendered refusal (:func:`mtls_gateway.refusal.render`) as aiohttp's response."""
    return web.Response(status=rendered.status, reason=rendered.phrase, body=rendered.body,
                        headers=rendered.headers)


def _target(url: str) -> LaneTarget | None:
    """A plain-HTTP upstream as the fast lane writes to it; None: not for the lane."""
    parsed = URL(url.rstrip("/"))
    if parsed.scheme != "http" or parsed.raw_host is None or parsed.port is None \
            or parsed.raw_query_string or parsed.raw_fragment:
        return None
    host = parsed.host_port_subcomponent or ""
    return LaneTarget((parsed.raw_host, parsed.port), parsed.raw_path.rstrip("/").encode(),
                      host.encode("ascii"))


class Gateway:
    """Routes, verifiers, the pipeline and the forwarder built once from a config."""

    def __init__(self, config: GatewayConfig, metrics: Metrics | None = None, *,
                 verifiers: Mapping[str, Verifier] | None = None) -> None:
        """``verifiers``: already started verifiers handed over by a reload (reload_carry.py);
        this gateway owns them now, and builds and starts the others itself."""
        self.config = config
        self.metrics = metrics or Metrics()
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
        self.pipeline = Pipeline(
            config, verifiers=self.verifiers, token_endpoints=self.token_endpoints,
            metrics=self.metrics,
            resource_metadata=self.metadata.url_for if self.metadata is not None else None)
        client_headers = frozenset(r.auth.client_header.lower() for r in config.routes
                                   if isinstance(r.auth, AuthMtlsClient) and r.auth.client_header)
        self.forwarder = Forwarder(config.upstream,
                                   also_strip=self.certificates.strip | client_headers,
                                   limits=config.limits)
        self.upstreams = UpstreamTargets(config)    # TLS contexts: once per generation
        self.lane = self._build_lane(config) if config.fast_lane and isinstance(
            self.certificates, TlsCertificates) and config.listen.tls else None
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def _build_lane(self, config: GatewayConfig) -> Lane:
        """The fast lane's per-generation state: built once, read on every lane request."""
        targets = {}
        for route in config.routes:
            target = _target(self.upstreams.of(route).url)
            if target is not None and not isinstance(route.auth, AuthMtlsClient):
                targets[id(route)] = target
        excluded = frozenset() if self.metadata is None else (
            self.metadata.rewrite_paths | self.metadata.paths)
        return Lane(pool=UpstreamPool(config.upstream.max_connections,
                                      config.upstream.connect_timeout),
                    max_headers=config.limits.max_headers,
                    max_line=config.limits.max_header_size,
                    read_timeout=config.upstream.read_timeout, targets=targets,
                    strip=frozenset(n.encode() for n in self.forwarder.strip | HOP_BY_HOP),
                    excluded_paths=excluded)

    @property
    def ready(self) -> bool:
        """Every provider usable (each JWKS loaded at least once)."""
        return all(v.ready for v in self.verifiers.values())

    def upstream_failed(self, upstream: str, cause: str) -> None:
        """A fast lane request's upstream failed: the same rate-limited WARNING as here."""
        self.forwarder.warn(upstream, cause)

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
        await self.pipeline.close()

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

    def view(self, request: web.Request) -> RequestView:
        """The pipeline's view of an aiohttp request (the connection's memo when it has one)."""
        headers = request.headers
        memo = getattr(request.protocol, "memo", None)
        return RequestView(
            method=request.method, target=request.raw_path, path=request.path,
            host=headers.get("Host"), authorization=tuple(headers.getall("Authorization", ())),
            dpop=tuple(headers.getall("DPoP", ())),
            token_in_query="access_token" in request.query, scheme=request.scheme,
            remote=request.remote or "",
            memo=memo if isinstance(memo, ConnectionMemo) else ConnectionMemo(),
            peer=functools.partial(self.certificates.peer, request),
            read_form=functools.partial(read_form, request))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.metadata is not None and self.metadata.serves(request):
            return self._serve_metadata(self.metadata, request)
        started = time.perf_counter()
        decision: Allow | Refuse | None
        try:
            check_framing(request, self.config.limits)     # transport: before any decision
            decision = await self.pipeline.decide(self.view(request))
        except Exception as exc:
            if not isinstance(exc, Refusal):    # a bug must fail closed, logged, never forwarded
                log.exception("internal error while handling %s %s", request.method,
                              request.path)
                exc = InternalError()
            decision = Refuse(exc, {"method": request.method, "path": request.path,
                                    "remote": request.remote}, None, started)
        assert decision is not None         # (no ``serves`` filter on this path)
        if request.get(UNTRUSTED_HEADER):
            decision.fields["untrusted_cert_header"] = True
        if isinstance(decision, Refuse):
            refused = self._refused(request, decision.refusal, decision.route)
            self.pipeline.record(decision, decision.refusal.reason, refused.status)
            return refused
        reason = decision.reason
        response: web.StreamResponse
        try:
            response = await self._forward(request, decision)
            if response.get(ABORTED):
                reason = "upstream_aborted"
                decision.fields["upstream_error"] = response.get(UPSTREAM_ERROR)
        except Refusal as exc:       # the upstream failed, or the client's body did
            response = self._refused(request, exc, decision.route)
            reason = exc.reason
            if isinstance(exc, UpstreamFailed) and exc.cause:
                decision.fields["upstream_error"] = exc.cause
        except Exception:
            log.exception("internal error while forwarding %s %s", request.method,
                          request.path)
            response = self._refused(request, InternalError(), decision.route)
            reason = "internal_error"
        self.pipeline.record(decision, reason, response.status)
        return response

    async def _forward(self, request: web.Request, decision: Allow) -> web.StreamResponse:
        response: web.StreamResponse
        up = self.upstreams.of(decision.route)
        if self.metadata is not None and self.metadata.rewrites(request):
            response = await self.metadata.rewritten(self.forwarder, request, up.url,
                                                     decision.identity, up.context,
                                                     up.server_name)
        else:
            response = await self.forwarder.forward(request, up.url, decision.identity,
                                                    body_bytes=decision.body,
                                                    context=up.context,
                                                    server_name=up.server_name,
                                                    answer_headers=decision.response_headers)
        self.pipeline.upstream_answered(decision.route, response[UPSTREAM_SECONDS])
        return response

    def _refused(self, request: web.Request, exc: Refusal,
                 route: Route | None = None) -> web.Response:
        response = refusal_response(self.pipeline.render(exc, route))
        if isinstance(exc, BodyTooLarge | RequestTimeout):
            response.force_close()  # the rest of the body is not worth reading
        if request.version not in (HttpVersion10, HttpVersion11):
            # aiohttp answers in the request's version: say "HTTP/1.1 400", not "HTTP/2.0"
            answer_in_http11(request)
            response.force_close()
        return response

    def _serve_metadata(self, endpoint: MetadataEndpoint,
                        request: web.Request) -> web.StreamResponse:
        """RFC 9728 protected resource metadata: public, answered by the gateway itself."""
        started = time.perf_counter()
        response = endpoint.document_response(request.path)
        self.pipeline.record_fields(
            {"method": request.method, "path": request.path, "remote": request.remote,
             "route": "metadata"}, "metadata", response.status, allowed=True, peer=None,
            started=started)
        return response
