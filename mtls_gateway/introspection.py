"""Opaque tokens: RFC 7662 introspection with a bounded, safe cache.

* The cache is keyed by SHA-256 of the token; the token is never stored or logged.
* Active answers live ``min(ttl, exp - now)``, inactive ones ``negative_ttl``;
  errors and timeouts are never cached.
* Every hit is re-checked (``exp``, ``nbf``, ``iss``, ``aud``) against the clock;
  scope and certificate binding are checked by the gateway on every request, so a
  token cached after use over certificate X still fails over certificate Y.
* Single flight: concurrent requests with one uncached token share one call.
* Fail closed and fast: any doubt about the answer is 503, never a pass; after
  ``failure_threshold`` consecutive failures the endpoint rests for
  ``failure_cooldown`` and uncached tokens get 503 at once.
* When the authorization server rejects the gateway's own credentials the client
  gets 503 (it is the gateway's fault, not the client's) and the log says so.
* Only outages (timeouts, refused connections, 5xx, rejected gateway credentials,
  401/403/404/405: ``introspection_misconfigured``) count towards the breaker; an answer
  about one token does not, so no client can switch introspection off for everyone:
  a 400 ``unsupported_token_type`` is 401 ``token_unknown``, any other 400 is 401
  ``token_malformed`` (the server refused to introspect that string).
* An answer that is not RFC 7662 (not JSON, ``active`` not a boolean...) is 401
  ``token_inactive`` for that token, logged as a bad answer and not cached; only when
  ``failure_threshold`` calls in a row get one (the endpoint answers every token that way)
  is it an outage: 503 ``introspection_bad_response``, counted by the breaker.
* The gateway's own pool is not the endpoint: at most ``max_connections`` calls are in
  flight, the others wait (at most ``max_waiting`` of them, for at most ``queue_timeout``),
  and ``timeout`` starts only once a call has its connection. A call that cannot get one is
  shed with 503 ``introspection_overloaded`` and never counts towards the breaker.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
from cachetools import TLRUCache

from . import trace
from .bodies import read_capped
from .config import IntrospectionProvider
from .errors import DependencyDown, InvalidToken
from .metrics import Metrics
from .strict_json import loads_object, numeric_date
from .tokeninfo import TokenInfo, token_info_from_claims

__all__ = ["IntrospectionStats", "IntrospectionVerifier"]

log = logging.getLogger("mtls_gateway.introspection")

_MAX_RESPONSE_BYTES = 64 * 1024


@dataclass
class IntrospectionStats:
    """Counters for logs and metrics."""

    hits: int = 0
    misses: int = 0
    coalesced: int = 0
    calls: int = 0
    failures: int = 0
    short_circuited: int = 0


@dataclass(slots=True)
class _Answer:
    """A cached introspection answer; ``ttl`` is seconds from when it was stored;
    ``reason``: the refusal when not active; ``info``: the verdict made of it, once (the
    same object on every use, so the per-connection caches keyed on it keep hitting)."""

    active: bool
    claims: dict[str, Any]
    ttl: float
    reason: str = "token_inactive"
    info: TokenInfo | None = None


class _BadAnswer(ValueError):
    """The endpoint answered, but not as RFC 7662 says."""


#: Reasons that are not the endpoint's failure: they never count towards the breaker.
_NOT_FAILURES = frozenset({"introspection_refused", "introspection_overloaded"})


class IntrospectionVerifier:
    """Verifies opaque tokens with one RFC 7662 endpoint."""

    def __init__(self, provider: IntrospectionProvider, metrics: Metrics | None = None) -> None:
        self.provider = provider
        self.metrics = metrics
        self._hit_counter = metrics.introspection_cache.labels(provider.name, "hit") \
            if metrics else None
        self.name = provider.name
        self.stats = IntrospectionStats()
        self._cache: TLRUCache[bytes, _Answer] = TLRUCache(
            maxsize=provider.cache.maxsize, ttu=lambda _k, v, now: now + v.ttl,
            timer=time.monotonic)
        self._inflight: dict[bytes, asyncio.Task[_Answer]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._consecutive_failures = 0
        self._bad_streak = 0            # calls in a row answered with a non-RFC 7662 answer
        self._open_until = 0.0
        self._slots = asyncio.Semaphore(provider.max_connections)
        self._waiting = 0

    @property
    def ready(self) -> bool:
        return True  # nothing to preload; an unreachable endpoint shows as 503s, not unreadiness

    def claims_token(self, token: str) -> bool:
        return True  # the catch-all of a provider chain

    async def start(self) -> None:
        p = self.provider
        ctx = ssl.create_default_context(cafile=str(p.ca_file) if p.ca_file else None)
        if p.auth_method == "tls_client_auth":
            assert p.client_cert_file is not None and p.client_key_file is not None
            ctx.load_cert_chain(p.client_cert_file, p.client_key_file)
        self._session = aiohttp.ClientSession(
            # no waiting inside aiohttp: _slot() admits at most max_connections calls
            connector=aiohttp.TCPConnector(ssl=ctx, limit=p.max_connections),
            timeout=aiohttp.ClientTimeout(total=p.timeout),
            headers={"Accept": "application/json"},
        )

    async def close(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._session is not None:
            await self._session.close()

    def cached_entry(self, digest: bytes) -> _Answer | None:
        return self._cache.get(digest)

    def reuse(self, entry: object, digest: bytes) -> TokenInfo | None:
        if self._cache.get(digest) is not entry:
            return None                 # expired from the cache (its ttl), or replaced
        assert isinstance(entry, _Answer)
        self._hit()
        return self._check(entry)

    def cached(self, token: str, digest: bytes) -> TokenInfo | None:
        answer = self._cache.get(digest)
        if answer is None:
            return None
        self._hit()
        return self._check(answer)

    async def verify(self, token: str, digest: bytes) -> TokenInfo:
        key = digest
        answer = self._cache.get(key)
        if answer is not None:
            self._hit()
        else:
            answer = await self._introspect_once(key, token)
        return self._check(answer, trace.current())   # (steps: None but under ``explain``)

    def _hit(self) -> None:
        self.stats.hits += 1
        if self._hit_counter is not None:      # (counted once a second, not per request)
            self.metrics.add(self._hit_counter)  # type: ignore[union-attr]

    # --- one call per token at a time ----------------------------------------------------------

    async def _introspect_once(self, key: bytes, token: str) -> _Answer:
        task = self._inflight.get(key)
        if task is not None:
            self.stats.coalesced += 1
            self._count("coalesced")
        else:
            self.stats.misses += 1
            self._count("miss")
            if time.monotonic() < self._open_until:
                self.stats.short_circuited += 1
                self._count("short_circuited")
                raise DependencyDown("introspection_unavailable",
                                     "token introspection is unavailable")
            task = asyncio.create_task(self._call(key, token))
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        return await asyncio.shield(task)

    async def _call(self, key: bytes, token: str) -> _Answer:
        started = time.perf_counter()
        try:
            async with self._slot():
                self.stats.calls += 1
                answer = await self._post(token)
        except DependencyDown as exc:
            if exc.reason not in _NOT_FAILURES:
                self._failed()
            self._observe(exc.reason, started)
            raise
        except _BadAnswer as exc:
            return self._bad_answer(exc, started)
        self._observe("active" if answer.active else "inactive", started)
        self._consecutive_failures = 0
        self._bad_streak = 0
        if answer.ttl > 0:
            self._cache[key] = answer
        return answer

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """One of the pool's ``max_connections``; waiting for it is the gateway's own limit,
        shed (``introspection_overloaded``) beyond ``max_waiting`` or ``queue_timeout``."""
        p = self.provider
        if self._slots.locked() and self._waiting >= p.max_waiting:
            log.warning("introspection for provider %s: %d calls already wait for one of its "
                        "%d connections; shedding", self.name, self._waiting, p.max_connections)
            raise DependencyDown("introspection_overloaded", "the gateway is overloaded")
        self._waiting += 1
        try:
            async with asyncio.timeout(p.queue_timeout):
                await self._slots.acquire()
        except TimeoutError as exc:
            log.warning("introspection for provider %s: no free connection within %.1fs (%d "
                        "in flight); shedding", self.name, p.queue_timeout, p.max_connections)
            raise DependencyDown("introspection_overloaded",
                                 "the gateway is overloaded") from exc
        finally:
            self._waiting -= 1
        try:
            yield
        finally:
            self._slots.release()

    def _bad_answer(self, exc: _BadAnswer, started: float) -> _Answer:
        """A non-RFC 7662 answer: this token is refused (not cached); an endpoint that
        answers every token that way is down."""
        self._bad_streak += 1
        self._observe("bad_answer", started)
        log.error("introspection endpoint of provider %s sent an answer that is not RFC 7662 "
                  "(%s); %d in a row", self.name, exc, self._bad_streak)
        if self._bad_streak >= self.provider.failure_threshold:
            self._consecutive_failures = max(self._consecutive_failures, self._bad_streak - 1)
            self._failed()
            raise DependencyDown("introspection_bad_response",
                                 "token introspection is unavailable") from exc
        return _Answer(False, {}, 0.0)

    def _count(self, outcome: str) -> None:
        if self.metrics:
            self.metrics.introspection_cache.labels(self.name, outcome).inc()

    def _observe(self, result: str, started: float) -> None:
        if self.metrics:
            self.metrics.introspection_calls.labels(self.name, result).inc()
            self.metrics.introspection_seconds.labels(self.name).observe(
                time.perf_counter() - started)

    def _failed(self) -> None:
        self.stats.failures += 1
        self._consecutive_failures += 1
        if self._consecutive_failures >= self.provider.failure_threshold:
            self._open_until = time.monotonic() + self.provider.failure_cooldown
            log.warning("introspection endpoint of provider %s failed %d times in a row; "
                        "not calling it for %.1fs", self.name, self._consecutive_failures,
                        self.provider.failure_cooldown)

    async def _post(self, token: str) -> _Answer:
        assert self._session is not None, "IntrospectionVerifier.start() was not awaited"
        p = self.provider
        form = {"token": token, "token_type_hint": "access_token"}
        headers: dict[str, str] = {}
        if p.auth_method == "client_secret_basic":
            assert p.client_secret is not None
            pair = f"{quote(p.client_id, safe='')}:{quote(p.client_secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        elif p.auth_method == "client_secret_post":
            assert p.client_secret is not None
            form.update(client_id=p.client_id, client_secret=p.client_secret)
        else:
            form["client_id"] = p.client_id
        try:
            async with self._session.post(p.endpoint, data=form, headers=headers,
                                          allow_redirects=False) as resp:
                status = resp.status
                content_type = resp.content_type
                body = await read_capped(resp.content, _MAX_RESPONSE_BYTES)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.warning("introspection call of provider %s failed: %s", self.name,
                        type(exc).__name__)
            raise DependencyDown("introspection_unavailable",
                                 "token introspection is unavailable") from exc
        if status in (401, 403, 404, 405):
            log.error("introspection endpoint of provider %s answered HTTP %d: the gateway is "
                      "misconfigured (%s)", self.name, status,
                      f"client_id {p.client_id!r}, auth_method {p.auth_method}"
                      if status in (401, 403) else f"is {p.endpoint} the introspection endpoint?")
            raise DependencyDown("introspection_misconfigured",
                                 "token introspection is unavailable")
        if status == 400:
            # An answer about this string, not an outage: a client sending odd tokens must
            # never open the breaker. Some servers (node-oidc-provider for JWTs) refuse to
            # introspect a kind of token instead of saying active: false.
            if _oauth_error(body) == "unsupported_token_type":
                return _Answer(False, {}, p.cache.negative_ttl, "token_unknown")
            return _Answer(False, {}, p.cache.negative_ttl, "token_malformed")
        if 400 <= status < 500:
            # A complaint about this one request: 503, but a client must not be able to open
            # the breaker for everyone by sending odd tokens.
            log.warning("introspection endpoint of provider %s refused a request: HTTP %d %s",
                        self.name, status, _oauth_error(body) or "")
            raise DependencyDown("introspection_refused", "token introspection is unavailable")
        if status != 200:
            log.warning("introspection endpoint of provider %s answered HTTP %d",
                        self.name, status)
            raise DependencyDown("introspection_unavailable", "token introspection is unavailable")
        return self._parse(body, content_type)

    def _parse(self, body: bytes, content_type: str = "application/json") -> _Answer:
        try:
            if len(body) > _MAX_RESPONSE_BYTES:
                raise ValueError("response too large")
            main, _, sub = content_type.lower().partition("/")
            if main != "application" or not (sub == "json" or sub.endswith("+json")):
                raise ValueError(f"content type {content_type[:60]!r} is not JSON")
            claims = loads_object(body)   # strict: no duplicates, NaN or deep nesting
            if not isinstance(claims.get("active"), bool):
                raise ValueError('no boolean "active" member')
            bad = [n for n in ("exp", "nbf", "iat") if n in claims and claims[n] is not None
                   and not numeric_date(claims[n])]
            if claims["active"] and bad:
                raise ValueError(f"{bad[0]} is not a NumericDate")
        except ValueError as exc:
            raise _BadAnswer(str(exc)) from exc
        if not claims["active"]:
            return _Answer(False, {}, self.provider.cache.negative_ttl)
        ttl = self.provider.cache.ttl
        exp = _number(claims.get("exp"))
        if exp is not None:
            ttl = min(ttl, exp - time.time())
        return _Answer(True, claims, ttl)

    # --- checks made on every use, cached or not ---------------------------------------------

    def _check(self, answer: _Answer, steps: list[trace.Check] | None = None) -> TokenInfo:
        """The verdict on ``answer`` now (the checks of :data:`_CHECKS`, in that order);
        ``steps``: ``explain``'s list, told what each check found."""
        p = self.provider
        trace.note(steps, "introspection", "pass" if answer.active else "fail",
                   active=answer.active, endpoint=p.endpoint)
        if not answer.active:
            raise InvalidToken(answer.reason, _DESCRIPTIONS.get(answer.reason, "token is not "
                                                                               "active"))
        claims, now = answer.claims, time.time()
        exp, nbf = _number(claims.get("exp")), _number(claims.get("nbf"))
        failed = (exp is not None and now > exp + p.leeway,
                  nbf is not None and now + p.leeway < nbf,
                  p.issuer is not None and claims.get("iss") != p.issuer,
                  bool(p.audiences) and not self._audience_ok(claims.get("aud")))
        if steps is not None:
            self._note(steps, claims, int(now), failed)
        if any(failed):
            _step, reason, description = _CHECKS[failed.index(True)]
            raise InvalidToken(reason, description)
        if answer.info is None:
            answer.info = token_info_from_claims(self.name, claims)
        return answer.info

    def _audience_ok(self, aud: object) -> bool:
        auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        return bool(set(self.provider.audiences) & {a for a in auds if isinstance(a, str)})

    def _note(self, steps: list[trace.Check], claims: dict[str, Any], now: int,
              failed: tuple[bool, ...]) -> None:
        """``explain``: what each of :meth:`_check`'s checks compared and found (those after
        the first failure: not checked)."""
        p = self.provider
        values = ({"exp": claims.get("exp"), "now": now, "leeway": p.leeway},
                  {"nbf": claims.get("nbf"), "now": now, "leeway": p.leeway},
                  {"token": claims.get("iss"), "expected": p.issuer},
                  {"token": claims.get("aud"), "expected": list(p.audiences)})
        first = failed.index(True) if any(failed) else len(failed)
        for i, ((step, _, _), compared) in enumerate(zip(_CHECKS, values, strict=True)):
            verdict = "pass" if i < first else "fail" if i == first else "not checked"
            steps.append(trace.Check(step, verdict, compared))


#: What :meth:`IntrospectionVerifier._check` checks on every use, in order: (step, reason
#: code, description).
_CHECKS = (("exp", "token_expired", "token has expired"),
           ("nbf", "token_not_yet_valid", "token is not yet valid"),
           ("iss", "wrong_issuer", "token issuer is not accepted"),
           ("aud", "wrong_audience", "token audience is not accepted"))
_DESCRIPTIONS = {"token_unknown": "the authorization server does not know this token",
                 "token_malformed": "the authorization server refused to introspect the token"}


def _oauth_error(body: bytes) -> str | None:
    """The ``error`` code of an OAuth error response body, if it is one."""
    try:
        doc = loads_object(body)
    except ValueError:
        return None
    error = doc.get("error") if isinstance(doc, dict) else None
    return error if isinstance(error, str) else None


def _number(value: object) -> float | None:
    """A JSON number as float; None for anything else (booleans included)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None
