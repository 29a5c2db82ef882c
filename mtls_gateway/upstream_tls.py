"""TLS to ``https://`` upstreams, and what an upstream failure was.

The client contexts are built once per configuration generation (like mitmproxy's and
Envoy's upstream TLS contexts), one per distinct :class:`UpstreamTls`, never per request:
each route knows its :class:`UpstreamTarget` (base URL, context, server name) from the start.
A plain ``http://`` upstream has no context and stays on the fast lane.

:func:`upstream_error` names the cause of a failed upstream request in a few safe words
(connection refused, TLS verification failed and why, timeout, reset, ...): it goes into the
decision line as ``upstream_error`` and into a rate-limited WARNING.
"""

from __future__ import annotations

import errno
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from .config import GatewayConfig, Route, UpstreamTls

__all__ = ["UpstreamTarget", "UpstreamTargets", "client_context", "upstream_error"]


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """Where a route's requests go: base URL, and for https its TLS context and name."""

    url: str
    context: ssl.SSLContext | None = None     # None: plain http
    server_name: str | None = None            # None: the URL's host


def client_context(tls: UpstreamTls) -> ssl.SSLContext:
    """A verifying client context (TLS 1.2+) for ``tls`` (blocking file reads: build once).

    Raises ``ssl.SSLError`` or ``OSError`` on unusable files (config_load checks them first).
    """
    ctx = ssl.create_default_context(
        cafile=str(tls.ca_file) if tls.ca_file is not None else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.client_cert_file is not None and tls.client_key_file is not None:
        ctx.load_cert_chain(tls.client_cert_file, tls.client_key_file)
    return ctx


class UpstreamTargets:
    """Every route's :class:`UpstreamTarget`, contexts shared between equal settings."""

    def __init__(self, config: GatewayConfig) -> None:
        self._contexts: dict[UpstreamTls, ssl.SSLContext] = {}
        self.default = self._target(config.upstream.url, config.upstream.tls)
        self._routes = {
            id(r): self._target(r.upstream_url, r.upstream_tls or UpstreamTls())
            if r.upstream_url is not None else self.default for r in config.routes}

    def _target(self, url: str, tls: UpstreamTls) -> UpstreamTarget:
        if urlsplit(url).scheme != "https":
            return UpstreamTarget(url)
        key = UpstreamTls(tls.ca_file, tls.client_cert_file, tls.client_key_file)
        if key not in self._contexts:
            self._contexts[key] = client_context(key)
        return UpstreamTarget(url, self._contexts[key], tls.server_name)

    @property
    def contexts(self) -> tuple[ssl.SSLContext, ...]:
        return tuple(self._contexts.values())

    def of(self, route: Route) -> UpstreamTarget:
        return self._routes.get(id(route), self.default)

    def all(self) -> Iterable[UpstreamTarget]:
        return (self.default, *self._routes.values())


def _tls_reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    text = str(reason) if reason else str(exc)
    return text.lower().replace("_", " ")


def upstream_error(exc: BaseException) -> str:
    """A short, safe description of why the upstream request failed."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cert_error = exc.certificate_error
        detail = getattr(cert_error, "verify_message", None) or str(cert_error)
        return f"tls_verify_failed: {detail}"
    if isinstance(exc, aiohttp.ClientConnectorSSLError | aiohttp.ClientSSLError):
        cause = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
        return f"tls_error: {_tls_reason(cause)}"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "dns_failed"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "connect_timeout"
    if isinstance(exc, aiohttp.SocketTimeoutError | TimeoutError):
        return "read_timeout"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "disconnected: the upstream closed the connection without an answer"
    if isinstance(exc, ssl.SSLError):
        return f"tls_error: {_tls_reason(exc)}"
    os_error = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
    code = getattr(os_error, "errno", None)
    if isinstance(os_error, ConnectionRefusedError) or code == errno.ECONNREFUSED:
        return "connection_refused"
    if isinstance(os_error, ConnectionResetError) or code == errno.ECONNRESET:
        return "connection_reset"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "bad_response: the upstream's answer could not be read"
    if isinstance(exc, aiohttp.ClientResponseError):
        return "bad_response: the upstream's answer is not valid HTTP"
    if code is not None:
        return f"os_error: {errno.errorcode.get(code, str(code)).lower()}"
    return type(exc).__name__
