"""Streaming the request to the upstream and the response back.

Bodies are never buffered whole. The gateway is the TLS terminator and the only
source of identity, so every inbound header that could claim identity or
forwarding facts is removed before ours are added: :data:`STRIPPED_NAMES` and
every name starting with one of :data:`STRIPPED_PREFIXES` (the whole
``X-Forwarded-`` family, the identity and client-certificate headers of common
auth proxies, web servers and load balancers), the configured identity header
names, ``upstream.strip_headers``, and the headers of the certificate source.
Names are compared case-insensitively and with ``_`` read as ``-`` (CGI/WSGI
servers turn both into ``HTTP_REMOTE_USER``). The list is in
docs/self-signed-clients.md ("Headers the upstream never receives from a client").
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict
from yarl import URL

from .aiohttp_compat import fail_body_on_connection_loss
from .answer import HOP_BY_HOP_BYTES
from .config import LimitsConfig, UpstreamConfig
from .errors import BodyTooLarge, Refusal, RequestTimeout, UpstreamFailed, upstream_refusal
from .upstream_tls import upstream_error

__all__ = ["ABORTED", "HOP_BY_HOP", "STRIPPED_NAMES", "STRIPPED_PREFIXES", "UPSTREAM_ERROR",
           "UPSTREAM_SECONDS", "Forwarder", "strip_hop_by_hop"]

#: Set on a response whose upstream broke off after the headers were sent.
ABORTED = web.ResponseKey("upstream_aborted", bool)
#: Seconds until the upstream's response headers arrived.
UPSTREAM_SECONDS = web.ResponseKey("upstream_seconds", float)
#: Why the upstream broke off (with ABORTED), for the decision line.
UPSTREAM_ERROR = web.ResponseKey("upstream_error", str)
#: Seconds between two WARNING lines for the same kind of upstream failure and upstream.
WARN_INTERVAL = 10.0

log = logging.getLogger("mtls_gateway.proxy")

#: Hop-by-hop fields (RFC 9110 section 7.6.1), never relayed: answer.HOP_BY_HOP_BYTES as text.
HOP_BY_HOP = frozenset(name.decode() for name in HOP_BY_HOP_BYTES)
#: Never accepted from a client: only the gateway may state these. Exact names (lower case).
STRIPPED_NAMES = frozenset({
    "host", "expect",
    # forwarding facts (RFC 7239) and client addresses
    "forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
    "x-forwarded-port", "x-real-ip", "x-client-ip", "true-client-ip", "x-cluster-client-ip",
    "cf-connecting-ip", "fastly-client-ip",
    # client certificates: RFC 9440, Envoy XFCC, nginx/HAProxy/Apache, Azure App Service
    "client-cert", "client-cert-chain", "x-forwarded-client-cert", "x-client-cert",
    "x-client-cert-chain", "x-client-verify", "x-client-dn", "x-client-s-dn", "x-client-i-dn",
    "x-arr-clientcert",
    # user identity: Apache/Authelia/oauth2-proxy nginx examples
    "remote-user", "x-remote-user", "x-user", "x-email", "x-anonymous-consumer",
    # another path or method than the one the route was chosen for (IIS, Symfony, Rails...)
    "x-original-url", "x-rewrite-url", "x-original-uri", "x-original-method",
    "x-http-method-override", "x-http-method", "x-method-override",
})
#: Open-ended families: every name starting with one of these (lower case).
STRIPPED_PREFIXES: tuple[str, ...] = (
    "x-forwarded-",            # X-Forwarded-User/-Email/-Groups/-Access-Token (oauth2-proxy),
                               # -Tls-Client-Cert(-Info) (Traefik), -Prefix, -Uri, -Port ...
    "x-auth-request-",         # oauth2-proxy --set-xauthrequest
    "remote-",                 # Authelia: Remote-User, -Groups, -Email, -Name
    "x-remote-",               # Kubernetes front proxy: X-Remote-User, -Group, -Extra-*
    "x-ssl-", "ssl-client-",   # nginx/HAProxy examples: X-SSL-Client-Cert, -Verify, -S-DN ...
    "x-amzn-mtls-", "x-amzn-oidc-", "x-amzn-tls-",     # AWS ALB mutual TLS and authentication
    "cloudfront-viewer-cert-",                          # CloudFront viewer mTLS
    "x-ms-client-principal", "x-ms-token-",             # Azure App Service authentication
    "x-goog-authenticated-", "x-goog-iap-",             # Google Cloud IAP
    "cf-access-",                                       # Cloudflare Access
    "x-authentik-", "x-pomerium-", "tailscale-user-",   # authentik, Pomerium, Tailscale
    "x-consumer-", "x-credential-", "x-authenticated-", # Kong
    "x-envoy-",                                         # Envoy trust markers (x-envoy-internal)
)
_CHUNK = 64 * 1024


class _HeadersWithBody(web.StreamResponse):
    """A streamed response whose headers leave with the first body bytes (or at the end):
    one TLS record and one write instead of two for a small answer. Used only when the
    upstream announced a Content-Length of at most one chunk, so nothing waits on it."""

    _send_headers_immediately = False


def strip_hop_by_hop(headers: Mapping[str, str] | CIMultiDict[str],
                     extra: frozenset[str] = frozenset(),
                     also: Callable[[str], bool] | None = None) -> CIMultiDict[str]:
    """Copy ``headers`` without hop-by-hop headers, those named in Connection, ``extra``
    and those ``also`` says (one pass)."""
    getall = getattr(headers, "getall", None)
    connection = getall("Connection", ()) if getall is not None else \
        [v for k, v in headers.items() if k.lower() == "connection"]
    named = {t.strip().lower() for v in connection for t in v.split(",")}
    drop = HOP_BY_HOP | named | extra
    return CIMultiDict((k, v) for k, v in headers.items()
                       if k.lower() not in drop and (also is None or not also(k)))


def _spelled(name: str) -> str:
    return name.lower().replace("_", "-")


class Forwarder:
    """Upstream connection pool and the forwarding of one request."""

    def __init__(self, upstream: UpstreamConfig, *,
                 also_strip: frozenset[str] = frozenset(),
                 limits: LimitsConfig | None = None) -> None:
        self.config = upstream
        self.limits = limits or LimitsConfig()
        self._strip = frozenset(_spelled(n) for n in (
            STRIPPED_NAMES | set(upstream.identity_headers.names()) | set(also_strip)
            | set(upstream.strip_headers)
            | (set() if upstream.pass_authorization else {"authorization"})))
        self._session: aiohttp.ClientSession | None = None
        self._warned: dict[tuple[str, str], float] = {}
        self._quiet: dict[tuple[str, str], int] = {}

    def warn(self, upstream: str, cause: str) -> None:
        """A WARNING for a failed upstream request: at most one per kind of cause and
        upstream every WARN_INTERVAL seconds, with the number of those left out."""
        key = (cause.partition(":")[0], upstream)
        now = time.monotonic()
        if now < self._warned.get(key, float("-inf")):
            self._quiet[key] = self._quiet.get(key, 0) + 1
            return
        self._warned[key] = now + WARN_INTERVAL
        quiet = self._quiet.pop(key, 0)
        log.warning("upstream %s failed: %s%s", upstream, cause,
                    f" ({quiet} more like it in the last {WARN_INTERVAL:.0f}s)" if quiet else "")

    def _failed(self, exc: BaseException, base_url: str, *, timeout: bool = False
                ) -> UpstreamFailed:
        """The refusal for a failed upstream request, its cause logged (rate-limited)."""
        cause = upstream_error(exc)
        self.warn(base_url, cause)
        return upstream_refusal(cause, timeout=timeout)

    @property
    def strip(self) -> frozenset[str]:
        """Exact inbound header names (lower case) never forwarded, besides hop-by-hop ones
        and the :data:`STRIPPED_PREFIXES` families (see :meth:`strips`)."""
        return self._strip

    def strips(self, name: str) -> bool:
        """Is the inbound header ``name`` removed before forwarding?"""
        spelled = _spelled(name)
        return spelled in self._strip or spelled.startswith(STRIPPED_PREFIXES)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.config.max_connections,
                                           enable_cleanup_closed=True),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout,
                                          sock_read=self.config.read_timeout),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def upstream_headers(self, request: web.Request,
                         identity: Mapping[str, str]) -> CIMultiDict[str]:
        headers = strip_hop_by_hop(request.headers, also=self.strips)
        headers.extend(identity)
        headers["X-Forwarded-For"] = request.remote or ""
        headers["X-Forwarded-Proto"] = request.scheme
        if request.host:
            headers["X-Forwarded-Host"] = request.host
        return headers

    async def _body(self, request: web.Request) -> AsyncIterator[bytes]:
        """The request body, chunk by chunk, within ``max_body_size`` and ``body_timeout``.

        Raising here makes aiohttp abort the upstream request mid-body (no final chunk, or
        fewer bytes than Content-Length), so the upstream never sees a complete-looking body.
        """
        limit, timeout = self.limits.max_body_size, self.limits.body_timeout
        sent = 0
        while True:
            try:
                chunk = await asyncio.wait_for(request.content.readany(), timeout)
            except TimeoutError as exc:
                raise RequestTimeout("body_timeout", "request body was not sent in time") \
                    from exc
            if not chunk:
                return
            sent += len(chunk)
            if sent > limit:
                raise BodyTooLarge("body_too_large", "request body is too large")
            yield chunk

    async def fetch(self, request: web.Request, base_url: str, identity: Mapping[str, str],
                    *, max_bytes: int, context: ssl.SSLContext | None = None,
                    server_name: str | None = None) -> tuple[int, CIMultiDict[str], bytes]:
        """Like :meth:`forward`, but the answer is read whole (at most ``max_bytes``, else
        502) and returned, uncompressed, for the gateway to change (metadata documents)."""
        assert self._session is not None, "Forwarder.start() was not awaited"
        target = URL(base_url.rstrip("/") + request.raw_path, encoded=True)
        headers = self.upstream_headers(request, identity)
        headers["Accept-Encoding"] = "identity"
        try:
            async with self._session.request(request.method, target, headers=headers,
                                              allow_redirects=False,
                                              ssl=True if context is None else context,
                                              server_hostname=server_name) as upstream:
                chunks, size = [], 0
                async for chunk in upstream.content.iter_chunked(_CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise UpstreamFailed("upstream_unavailable", "upstream answer too large")
                    chunks.append(chunk)
                return upstream.status, strip_hop_by_hop(upstream.headers), b"".join(chunks)
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise self._failed(exc, base_url, timeout=True) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise self._failed(exc, base_url) from exc

    async def forward(self, request: web.Request, base_url: str,
                      identity: Mapping[str, str], *, body_bytes: bytes | None = None,
                      context: ssl.SSLContext | None = None, server_name: str | None = None,
                      answer_headers: Mapping[str, str] | None = None,
                      ) -> web.StreamResponse:
        """Send the request upstream and stream the answer back; 502/504 on failure.

        ``body_bytes``: the request body, already read by the gateway (token endpoint).
        ``context``/``server_name``: TLS to an https upstream (upstream_tls.py; None: the
        system trust store and the URL's host). ``answer_headers``: added to the answer after
        the upstream's (the decision's own, e.g. a fresh ``DPoP-Nonce``).
        """
        assert self._session is not None, "Forwarder.start() was not awaited"
        target = URL(base_url.rstrip("/") + request.raw_path, encoded=True)
        body: bytes | AsyncIterator[bytes] | None = (
            body_bytes if body_bytes is not None
            else self._body(request) if request.body_exists else None)
        started = time.perf_counter()
        try:
            upstream = await self._session.request(
                request.method, target, headers=self.upstream_headers(request, identity),
                data=body, allow_redirects=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type", "Accept"),
                ssl=True if context is None else context, server_hostname=server_name,
            )
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise self._failed(exc, base_url, timeout=True) from exc
        except (aiohttp.ClientError, OSError) as exc:
            # The client's own fault while its body streamed (too large, too slow) is its
            # refusal; the upstream request was aborted, never completed with a short body.
            if isinstance(exc.__cause__, Refusal):
                raise exc.__cause__ from exc
            raise self._failed(exc, base_url) from exc
        async with upstream:
            small = upstream.content_length is not None and upstream.content_length <= _CHUNK
            response = (_HeadersWithBody if small else web.StreamResponse)(
                status=upstream.status, reason=upstream.reason)
            response[UPSTREAM_SECONDS] = time.perf_counter() - started
            response.headers.extend(strip_hop_by_hop(upstream.headers))
            if answer_headers:
                response.headers.extend(answer_headers)
            await response.prepare(request)
            undo = fail_body_on_connection_loss(upstream)
            try:
                async for chunk in upstream.content.iter_chunked(_CHUNK):
                    await response.write(chunk)
            except (TimeoutError, aiohttp.ClientError, HttpProcessingError, OSError) as exc:
                # Headers are gone already: the only honest signal left is a cut connection.
                log.warning("upstream broke off mid-response: %s", type(exc).__name__)
                response[ABORTED] = True
                response[UPSTREAM_ERROR] = upstream_error(exc)
                if request.transport is not None:
                    request.transport.close()
                return response
            finally:
                undo()
            await response.write_eof()
            return response
