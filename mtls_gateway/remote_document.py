"""One remote JSON document (a JWK Set), fetched the same careful way wherever it is needed.

Two parts of the gateway fetch documents from URLs an operator configured: a JWT provider's
``jwks_uri`` (:mod:`mtls_gateway.jwks`) and a client registry's ``jwks_uri`` of registered
self-signed certificates (:mod:`mtls_gateway.client_registry`). Both get the same rules here,
written once:

* TLS verified against the system store or the configured ``ca_file``;
* only the configured URL: redirects are never followed (a 3xx is a failure);
* the answer must be ``200`` with a JSON media type (``application/json`` or
  ``application/*+json``), at most ``max_bytes`` (512 KiB), strictly parsed
  (:mod:`mtls_gateway.strict_json`: duplicate members are an error);
* one timeout for the whole fetch;
* :func:`keep_refreshed`: refetch every interval; after a failure retry sooner, with a
  back-off that doubles from 1 s up to the interval; an early refetch on demand.

Keeping the last good document is the caller's part: a failed fetch raises
:class:`FetchFailed` and changes nothing, so whatever the caller made of its last good
document stays in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from .bodies import read_capped
from .strict_json import loads_object

__all__ = ["MAX_DOCUMENT_BYTES", "FetchFailed", "RemoteDocument", "is_json", "keep_refreshed"]

MAX_DOCUMENT_BYTES = 512 * 1024
_ACCEPT = "application/jwk-set+json, application/json"


class FetchFailed(Exception):
    """The document could not be fetched or is not acceptable; the message says why."""


def is_json(content_type: str) -> bool:
    """``application/json``, ``application/jwk-set+json`` and other ``+json`` types."""
    main, _, sub = content_type.lower().partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


class RemoteDocument:
    """The JSON object at ``url``; :meth:`fetch` gets it now (one HTTP session, opened lazily,
    shared by every fetch of this source)."""

    def __init__(self, url: str, *, ca_file: Path | None, timeout: float,
                 max_bytes: int = MAX_DOCUMENT_BYTES) -> None:
        self.url = url
        self._ca_file = ca_file
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            context = ssl.create_default_context(
                cafile=str(self._ca_file) if self._ca_file else None)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context, limit=4),
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                headers={"Accept": _ACCEPT})
        return self._session

    async def fetch(self) -> dict[str, Any]:
        """The document, or :class:`FetchFailed` (network, TLS, status, type, size, JSON)."""
        try:
            async with self._open().get(self.url, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise FetchFailed(f"HTTP {resp.status}")    # a redirect too
                if not is_json(resp.content_type):
                    raise FetchFailed(f"content type {resp.content_type[:60]!r} is not JSON")
                body = await read_capped(resp.content, self._max_bytes)
                if len(body) > self._max_bytes:
                    raise FetchFailed(f"document larger than {self._max_bytes} bytes")
            return loads_object(body)
        except FetchFailed:
            raise
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
            raise FetchFailed(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def keep_refreshed(refresh: Callable[[], Awaitable[bool]], interval: float, *,
                         ok: bool, wake: asyncio.Event | None = None,
                         sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
    """Call ``refresh`` (True: it worked) every ``interval`` seconds, forever; while it fails,
    after 1, 2, 4... seconds (never longer than ``interval``). ``wake`` set: refresh now.
    ``ok``: whether the fetch made before this loop started worked. ``sleep``: how to wait
    when there is no ``wake`` (tests count the delays)."""
    backoff = 1.0
    while True:
        if ok:
            delay, backoff = interval, 1.0
        else:
            delay, backoff = backoff, min(backoff * 2, interval)
        if wake is None:
            await sleep(delay)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), delay)
            wake.clear()
        ok = await refresh()
