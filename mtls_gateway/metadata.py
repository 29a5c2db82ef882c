"""Discovery documents: RFC 9728 protected resource metadata, and RFC 8705 s5 for the AS.

The protected resource metadata document is built once from the configuration and
served at the well-known URI formed from ``metadata.resource`` (RFC 9728 section 3.1:
``/.well-known/oauth-protected-resource`` inserted between host and path). Its absolute
URL goes into every Bearer challenge as ``resource_metadata`` (section 5.1); it comes
from the configured resource identifier, never from the request's Host header.

Optionally, an authorization server's own metadata (RFC 8414 / OpenID discovery)
fetched through the gateway is rewritten on the way back: ``mtls_endpoint_aliases``
(RFC 8705 section 5) gains the configured gateway URLs and
``tls_client_certificate_bound_access_tokens`` becomes true, so that clients find the
gateway's mutual-TLS token endpoint. Anything that is not a 200 JSON object passes
through unchanged.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from .config import AsMetadataRewrite, AuthPolicy, GatewayConfig, MetadataConfig, Route
from .proxy import UPSTREAM_SECONDS, Forwarder

__all__ = [
    "WELL_KNOWN",
    "MetadataEndpoint",
    "guarding_routes",
    "metadata_path",
    "protected_resource_document",
    "rewrite_as_metadata",
]

WELL_KNOWN = "/.well-known/oauth-protected-resource"
_MAX_AS_METADATA_BYTES = 256 * 1024


def metadata_path(resource: str) -> str:
    """RFC 9728 section 3.1: the well-known path for a resource identifier."""
    path = urlsplit(resource).path.rstrip("/")
    return WELL_KNOWN + path


def _metadata_url(resource: str) -> str:
    parts = urlsplit(resource)
    return f"{parts.scheme}://{parts.netloc}{metadata_path(resource)}"


def protected_resource_document(config: GatewayConfig,
                                resource: str | None = None) -> dict[str, Any]:
    """The RFC 9728 section 2 document for ``resource``: a route's own (``routes[].resource``,
    describing the routes that name it) or, by default, ``metadata.resource`` (describing the
    token routes without a resource of their own)."""
    meta = config.metadata
    assert meta is not None
    guarded = guarding_routes(config, resource)
    policies = [r.auth for r in guarded if isinstance(r.auth, AuthPolicy)]
    bound = any(p.binding != "off" and p.sender_constraint != "dpop" for p in policies)
    doc: dict[str, Any] = {"resource": resource or meta.resource}
    servers = list(meta.authorization_servers)
    scopes = list(meta.scopes_supported)
    if resource is not None:
        issuers = {p.issuer for a in policies for name in a.providers
                   if (p := config.providers.get(name)) is not None and p.issuer}
        servers = [s for s in servers if s in issuers] or servers
        scopes = sorted({s for a in policies for s in a.scopes})
    if servers:
        doc["authorization_servers"] = servers
    if scopes:
        doc["scopes_supported"] = scopes
    doc["bearer_methods_supported"] = ["header"]   # the only method the gateway accepts
    doc["tls_client_certificate_bound_access_tokens"] = bound
    doc.update(_dpop_members(config, policies))
    if meta.resource_name:
        doc["resource_name"] = meta.resource_name
    if meta.resource_documentation:
        doc["resource_documentation"] = meta.resource_documentation
    return doc


def guarding_routes(config: GatewayConfig, resource: str | None) -> list[Route]:
    """The routes a resource's document speaks for: those naming it, or (None) the rest."""
    if resource is None:
        return [r for r in config.routes if r.resource is None]
    return [r for r in config.routes if r.resource == resource]


def _dpop_members(config: GatewayConfig, policies: list[AuthPolicy]) -> dict[str, Any]:
    """RFC 9728 section 2: DPoP members, only when some route accepts DPoP.

    ``dpop_bound_access_tokens_required`` is true only when every token route demands DPoP.
    """
    dpop = [p for p in policies if p.sender_constraint != "mtls"]
    if not dpop:
        return {}
    return {
        "dpop_signing_alg_values_supported": list(config.dpop.algorithms),
        "dpop_bound_access_tokens_required": len(dpop) == len(policies)
        and all(p.sender_constraint == "dpop" for p in dpop),
    }


def rewrite_as_metadata(doc: Mapping[str, Any], rewrite: AsMetadataRewrite) -> dict[str, Any]:
    """Add the gateway's mTLS endpoint aliases (RFC 8705 section 5) to an AS document."""
    out = dict(doc)
    aliases = out.get("mtls_endpoint_aliases")
    merged = dict(aliases) if isinstance(aliases, dict) else {}
    merged.update(rewrite.mtls_endpoint_aliases)
    if merged:
        out["mtls_endpoint_aliases"] = merged
    out["tls_client_certificate_bound_access_tokens"] = True
    return out


class MetadataEndpoint:
    """The resource metadata documents (prebuilt) and the AS-metadata rewrite.

    One document for ``metadata.resource`` and one per distinct ``routes[].resource``
    (RFC 9728 section 3.1: the well-known prefix inserted before the resource's path), so
    that a client that follows a route's challenge asks its authorization server for a
    token with that route's audience.
    """

    def __init__(self, config: GatewayConfig) -> None:
        meta: MetadataConfig | None = config.metadata
        assert meta is not None
        self.config = meta
        self.path = metadata_path(meta.resource)
        self.url = _metadata_url(meta.resource)
        self._bodies = {self.path: json.dumps(protected_resource_document(config)).encode()}
        self._urls: dict[int, str] = {}
        for route in config.routes:
            if route.resource is not None:
                path = metadata_path(route.resource)
                if path not in self._bodies:
                    self._bodies[path] = json.dumps(
                        protected_resource_document(config, route.resource)).encode()
                self._urls[id(route)] = _metadata_url(route.resource)
        self.paths = frozenset(self._bodies)
        self.rewrite_paths = frozenset(meta.as_metadata.paths if meta.as_metadata else ())

    def url_for(self, route: Route | None) -> str:
        """The ``resource_metadata`` URL for a refusal on ``route`` (None: no route)."""
        return self._urls.get(id(route), self.url) if route is not None else self.url

    def serves(self, request: web.Request) -> bool:
        return request.path in self._bodies and request.method in ("GET", "HEAD")

    def document_response(self, path: str | None = None) -> web.Response:
        return web.Response(body=self._bodies[path or self.path],
                            content_type="application/json",
                            headers={"Cache-Control": "max-age=300"})

    def rewrites(self, request: web.Request) -> bool:
        return request.method == "GET" and request.path in self.rewrite_paths

    async def rewritten(self, forwarder: Forwarder, request: web.Request, base_url: str,
                        identity: Mapping[str, str], context: ssl.SSLContext | None = None,
                        server_name: str | None = None) -> web.Response:
        """Fetch the AS document through the forwarder and answer with the rewritten one."""
        started = time.perf_counter()
        status, headers, body = await forwarder.fetch(request, base_url, identity,
                                                      max_bytes=_MAX_AS_METADATA_BYTES,
                                                      context=context, server_name=server_name)
        elapsed = time.perf_counter() - started
        doc: Any = None
        if status == 200:
            try:
                doc = json.loads(body)
            except ValueError:
                doc = None
        if isinstance(doc, dict):
            assert self.config.as_metadata is not None
            out = rewrite_as_metadata(doc, self.config.as_metadata)
            keep = {k: v for k, v in headers.items() if k.lower() == "cache-control"}
            response = web.Response(body=json.dumps(out).encode(),
                                    content_type="application/json", headers=keep)
        else:
            passed = {k: v for k, v in headers.items()
                      if k.lower() not in ("content-length", "content-encoding")}
            response = web.Response(status=status, body=body, headers=passed)
        response[UPSTREAM_SECONDS] = elapsed
        return response
