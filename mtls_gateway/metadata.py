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
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from .config import AsMetadataRewrite, AuthPolicy, GatewayConfig, MetadataConfig
from .proxy import UPSTREAM_SECONDS, Forwarder

__all__ = [
    "WELL_KNOWN",
    "MetadataEndpoint",
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


def protected_resource_document(config: GatewayConfig) -> dict[str, Any]:
    """The RFC 9728 section 2 document for ``config.metadata``."""
    meta = config.metadata
    assert meta is not None
    policies = [r.auth for r in config.routes if isinstance(r.auth, AuthPolicy)]
    bound = any(p.binding != "off" and p.sender_constraint != "dpop" for p in policies)
    doc: dict[str, Any] = {"resource": meta.resource}
    if meta.authorization_servers:
        doc["authorization_servers"] = list(meta.authorization_servers)
    if meta.scopes_supported:
        doc["scopes_supported"] = list(meta.scopes_supported)
    doc["bearer_methods_supported"] = ["header"]   # the only method the gateway accepts
    doc["tls_client_certificate_bound_access_tokens"] = bound
    doc.update(_dpop_members(config, policies))
    if meta.resource_name:
        doc["resource_name"] = meta.resource_name
    if meta.resource_documentation:
        doc["resource_documentation"] = meta.resource_documentation
    return doc


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
    """The resource metadata document (prebuilt) and the AS-metadata rewrite."""

    def __init__(self, config: GatewayConfig) -> None:
        meta: MetadataConfig | None = config.metadata
        assert meta is not None
        self.config = meta
        self.path = metadata_path(meta.resource)
        self.url = _metadata_url(meta.resource)
        self._body = json.dumps(protected_resource_document(config)).encode()
        self.rewrite_paths = frozenset(meta.as_metadata.paths if meta.as_metadata else ())

    def serves(self, request: web.Request) -> bool:
        return request.path == self.path and request.method in ("GET", "HEAD")

    def document_response(self) -> web.Response:
        return web.Response(body=self._body, content_type="application/json",
                            headers={"Cache-Control": "max-age=300"})

    def rewrites(self, request: web.Request) -> bool:
        return request.method == "GET" and request.path in self.rewrite_paths

    async def rewritten(self, forwarder: Forwarder, request: web.Request, base_url: str,
                        identity: Mapping[str, str]) -> web.Response:
        """Fetch the AS document through the forwarder and answer with the rewritten one."""
        started = time.perf_counter()
        status, headers, body = await forwarder.fetch(request, base_url, identity,
                                                      max_bytes=_MAX_AS_METADATA_BYTES)
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
