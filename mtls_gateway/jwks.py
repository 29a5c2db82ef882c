"""A provider's signing keys: fetched asynchronously, refreshed in the background.

Rules that keep an attacker from steering key handling (RFC 8725):

* keys are looked up by ``(kid, alg)`` where ``alg`` must be in the provider's
  allowlist and fit the key type; symmetric (``oct``) keys are never loaded;
* an unknown ``kid`` triggers at most one refetch per ``jwks_refetch_cooldown``
  (a flood of random kids costs one request, not thousands), and concurrent
  triggers share that one request;
* a failed or empty refresh keeps the last good key set; with no key set at all
  the caller gets :class:`DependencyDown` (503), never a pass;
* only the configured ``jwks_uri`` is fetched, by :mod:`mtls_gateway.remote_document`
  (redirects not followed, JSON only, at most 512 KiB, strictly parsed; the client
  registries fetch their ``jwks_uri`` the same way), and at most 100 keys are taken;
* a key that is broken, private (``d``, ``k``...), not for verification
  (``use``/``key_ops``), too weak, or a duplicate of an earlier ``(kid, alg)`` is
  skipped and logged; the others stay usable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import jwt

from .config import JwtProvider
from .errors import DependencyDown, InvalidToken
from .keyset import KeySet
from .metrics import Metrics
from .remote_document import FetchFailed, RemoteDocument, keep_refreshed

__all__ = ["JwksSource", "KeySet"]

log = logging.getLogger("mtls_gateway.jwks")



@dataclass
class JwksStats:
    """Counters for logs and metrics."""

    fetches: int = 0
    failures: int = 0
    kid_refetches: int = 0
    last_success: float | None = None     # POSIX time of the last good fetch
    last_fetch_ok: bool = False
    last_error: str | None = None


class JwksSource:
    """Keys of one JWT provider; static (inline JWKS) or fetched from ``jwks_uri``."""

    def __init__(self, provider: JwtProvider, metrics: Metrics | None = None) -> None:
        self.provider = provider
        self.metrics = metrics
        self.stats = JwksStats()
        self._keys: KeySet | None = None
        self._document = RemoteDocument(
            provider.jwks_uri, ca_file=provider.jwks_ca_file, timeout=provider.jwks_timeout
        ) if provider.jwks_uri is not None else None
        self._inflight: asyncio.Task[None] | None = None
        self._last_on_demand = -float("inf")
        self._refresher: asyncio.Task[None] | None = None
        if provider.jwks is not None:
            self._keys = KeySet.from_document(provider.jwks, provider.algorithms)

    @property
    def ready(self) -> bool:
        """True once a key set has been loaded (readiness)."""
        return self._keys is not None

    @property
    def current(self) -> KeySet | None:
        """The key set in use; replaced (a new object) only when the JWKS document changes."""
        return self._keys

    async def start(self) -> None:
        """Open the HTTP session, make a first fetch, and start background refresh."""
        if self._document is None:
            return
        await self._refresh_shared()
        self._refresher = asyncio.create_task(
            keep_refreshed(self._refresh_ok, self.provider.jwks_refresh_interval,
                           ok=self.stats.last_fetch_ok),
            name=f"jwks-refresh-{self.provider.name}")

    async def close(self) -> None:
        for task in (self._refresher, self._inflight):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._document is not None:
            await self._document.close()

    async def keys_for(self, kid: str | None, alg: str) -> tuple[KeySet, tuple[jwt.PyJWK, ...]]:
        """Candidate keys for a token header (and the key set they belong to), refetching
        (rate-limited) on an unknown kid."""
        keys = self._keys
        if keys is not None and (found := keys.lookup(kid, alg)):
            return keys, found
        if self.provider.jwks_uri is not None and self._may_fetch_on_demand():
            if keys is not None:
                self.stats.kid_refetches += 1
            await self._refresh_shared()
            keys = self._keys
            if keys is not None and (found := keys.lookup(kid, alg)):
                return keys, found
        if keys is None:
            raise DependencyDown("jwks_unavailable", "signing keys are not available")
        raise InvalidToken("unknown_key", "no signing key matches the token")

    def _may_fetch_on_demand(self) -> bool:
        if self._inflight is not None:
            return True  # joining a fetch already under way costs nothing
        now = time.monotonic()
        if now - self._last_on_demand < self.provider.jwks_refetch_cooldown:
            return False
        self._last_on_demand = now
        return True

    async def _refresh_shared(self) -> None:
        """Single flight: all callers await one fetch; a failure leaves the old keys."""
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._fetch())
            self._inflight.add_done_callback(self._clear_inflight)
        await asyncio.shield(self._inflight)

    def _clear_inflight(self, _task: asyncio.Task[None]) -> None:
        self._inflight = None

    async def _refresh_ok(self) -> bool:
        await self._refresh_shared()
        return self.stats.last_fetch_ok

    async def _fetch(self) -> None:
        assert self._document is not None
        self.stats.fetches += 1
        try:
            keys = KeySet.from_document(await self._document.fetch(), self.provider.algorithms)
        except (FetchFailed, ValueError) as exc:
            self.stats.failures += 1
            self.stats.last_fetch_ok = False
            if self.metrics:
                self.metrics.jwks_fetches.labels(self.provider.name, "failure").inc()
            self.stats.last_error = str(exc) if isinstance(exc, FetchFailed) \
                else f"{type(exc).__name__}: {exc}"
            log.warning("JWKS fetch for provider %s failed (keeping %s): %s",
                        self.provider.name, "last good keys" if self._keys else "no keys",
                        self.stats.last_error)
            return
        if keys != self._keys:  # an unchanged document keeps the same KeySet (and its caches)
            log.info("JWKS for provider %s loaded: kids=%s", self.provider.name,
                     sorted(keys.kids))
            self._keys = keys
        if self.metrics:
            self.metrics.jwks_fetches.labels(self.provider.name, "success").inc()
        self.stats.last_success = time.time()
        self.stats.last_fetch_ok = True
