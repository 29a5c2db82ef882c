"""Streaming the request to the upstream and the response back.

Bodies are never buffered whole. The gateway is the TLS terminator and the only
source of identity, so every inbound header that could claim identity or
forwarding facts (``X-Forwarded-*``, ``Forwarded``, client-certificate headers,
and the configured identity header names) is removed before ours are added.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict
from yarl import URL

from .aiohttp_compat import fail_body_on_connection_loss
from .config import LimitsConfig, UpstreamConfig
from .errors import BodyTooLarge, Refusal, RequestTimeout, UpstreamFailed, UpstreamTimeout

__all__ = ["ABORTED", "HOP_BY_HOP", "UPSTREAM_SECONDS", "Forwarder", "strip_hop_by_hop"]

#: Set on a response whose upstream broke off after the headers were sent.
ABORTED = web.ResponseKey("upstream_aborted", bool)
#: Seconds until the upstream's response headers arrived.
UPSTREAM_SECONDS = web.ResponseKey("upstream_seconds", float)

log = logging.getLogger("mtls_gateway.proxy")

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection",
})
#: Never accepted from a client: only the gateway may state these (RFC 9440, XFCC, RFC 7239).
_ALWAYS_STRIPPED = frozenset({
    "forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
    "x-forwarded-port", "x-real-ip", "x-forwarded-client-cert", "client-cert",
    "client-cert-chain", "ssl-client-cert", "x-ssl-client-cert", "host", "expect",
})
_CHUNK = 64 * 1024


class _HeadersWithBody(web.StreamResponse):
    """A streamed response whose headers leave with the first body bytes (or at the end):
    one TLS record and one write instead of two for a small answer. Used only when the
    upstream announced a Content-Length of at most one chunk, so nothing waits on it."""

    _send_headers_immediately = False


def strip_hop_by_hop(headers: Mapping[str, str] | CIMultiDict[str],
                     extra: frozenset[str] = frozenset()) -> CIMultiDict[str]:
    """Copy ``headers`` without hop-by-hop headers, those named in Connection, and ``extra``."""
    named = {t.strip().lower() for v in _getall(headers, "Connection") for t in v.split(",")}
    drop = HOP_BY_HOP | named | extra
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


def _getall(headers: Mapping[str, str] | CIMultiDict[str], name: str) -> list[str]:
    return [v for k, v in headers.items() if k.lower() == name.lower()]


class Forwarder:
    """Upstream connection pool and the forwarding of one request."""

    def __init__(self, upstream: UpstreamConfig, *,
                 also_strip: frozenset[str] = frozenset(),
                 limits: LimitsConfig | None = None) -> None:
        self.config = upstream
        self.limits = limits or LimitsConfig()
        self._strip = (_ALWAYS_STRIPPED | {n.lower() for n in upstream.identity_headers.names()}
                       | also_strip)
        if not upstream.pass_authorization:
            self._strip |= {"authorization"}
        self._session: aiohttp.ClientSession | None = None

    @property
    def strip(self) -> frozenset[str]:
        """Inbound header names (lower case) never forwarded, besides hop-by-hop ones."""
        return frozenset(self._strip)

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
        headers = strip_hop_by_hop(request.headers, self._strip)
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
                    *, max_bytes: int) -> tuple[int, CIMultiDict[str], bytes]:
        """Like :meth:`forward`, but the answer is read whole (at most ``max_bytes``, else
        502) and returned, uncompressed, for the gateway to change (metadata documents)."""
        assert self._session is not None, "Forwarder.start() was not awaited"
        target = URL(base_url.rstrip("/") + request.raw_path, encoded=True)
        headers = self.upstream_headers(request, identity)
        headers["Accept-Encoding"] = "identity"
        try:
            async with self._session.request(request.method, target, headers=headers,
                                              allow_redirects=False) as upstream:
                chunks, size = [], 0
                async for chunk in upstream.content.iter_chunked(_CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise UpstreamFailed("upstream_unavailable", "upstream answer too large")
                    chunks.append(chunk)
                return upstream.status, strip_hop_by_hop(upstream.headers), b"".join(chunks)
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout("upstream_timeout", "upstream did not answer in time") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamFailed("upstream_unavailable", "upstream is unavailable") from exc

    async def forward(self, request: web.Request, base_url: str,
                      identity: Mapping[str, str], *, body_bytes: bytes | None = None,
                      ) -> web.StreamResponse:
        """Send the request upstream and stream the answer back; 502/504 on failure.

        ``body_bytes``: the request body, already read by the gateway (token endpoint).
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
            )
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout("upstream_timeout", "upstream did not answer in time") from exc
        except (aiohttp.ClientError, OSError) as exc:
            # The client's own fault while its body streamed (too large, too slow) is its
            # refusal; the upstream request was aborted, never completed with a short body.
            if isinstance(exc.__cause__, Refusal):
                raise exc.__cause__ from exc
            raise UpstreamFailed("upstream_unavailable", "upstream is unavailable") from exc
        async with upstream:
            small = upstream.content_length is not None and upstream.content_length <= _CHUNK
            response = (_HeadersWithBody if small else web.StreamResponse)(
                status=upstream.status, reason=upstream.reason)
            response[UPSTREAM_SECONDS] = time.perf_counter() - started
            response.headers.extend(strip_hop_by_hop(upstream.headers))
            await response.prepare(request)
            undo = fail_body_on_connection_loss(upstream)
            try:
                async for chunk in upstream.content.iter_chunked(_CHUNK):
                    await response.write(chunk)
            except (TimeoutError, aiohttp.ClientError, HttpProcessingError, OSError) as exc:
                # Headers are gone already: the only honest signal left is a cut connection.
                log.warning("upstream broke off mid-response: %s", type(exc).__name__)
                response[ABORTED] = True
                if request.transport is not None:
                    request.transport.close()
                return response
            finally:
                undo()
            await response.write_eof()
            return response
