"""DPoP (RFC 9449) at the resource: proof checks, nonces, the replay store and the challenge.

A DPoP-bound token is worthless without a fresh proof signed by the key its ``cnf.jkt``
names. :class:`DpopVerifier` checks one proof against one request in RFC 9449 section 4.3
order, cheapest first, so that a forged or stale proof costs no signature work and an
invalid proof never reaches the replay store:

1. exactly one ``DPoP`` header, a compact JWS of three canonical base64url segments;
2. header: ``typ`` ``dpop+jwt``, ``alg`` on the allowlist (asymmetric only), ``jwk`` a
   public key of a type that ``alg`` uses (private members refused), no ``crit``;
3. claims: ``jti``, ``htm``, ``htu``, ``iat`` present and well typed; ``htm`` equals the
   method; ``htu`` equals the URI the client addressed, query and fragment ignored, after
   RFC 3986 section 6.2.2/6.2.3 normalisation; ``nonce`` when the route asks for one;
   ``iat`` inside ``[now - iat_max_age, now + iat_max_skew]``; ``ath`` equals the
   base64url SHA-256 of the access token;
4. the signature, by the proof's own key, on every proof (the parsed key is cached by
   its RFC 7638 thumbprint, the checked header by its exact segment: caching the key is
   safe because the signature it checks is verified every time; ECDSA goes straight to
   ``cryptography``, the others through pyjwt's algorithm objects built at import);
5. the thumbprint equals the token's ``cnf.jkt``;
6. ``(jkt, jti)`` has not been seen within the acceptance window (the replay store).

Nonces (section 9) are stateless: an HMAC of the time window under a secret that every
replica shares, accepted for the current and the previous window, so replicas need no
shared state for them. Reason codes, statuses and challenges are in :data:`DPOP_REASONS`.
The module is transport-neutral: it sees a method, a request target, a Host and header
values, never an aiohttp object.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import functools
import hashlib
import hmac
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Protocol

from cachetools import LRUCache
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from jwt.algorithms import Algorithm, get_default_algorithms
from jwt.exceptions import InvalidKeyError

from .config import ASYMMETRIC_ALGORITHMS, DpopConfig
from .errors import DependencyDown, Refusal
from .reasons import REASONS, Reason
from .strict_json import loads_object, numeric_date

__all__ = [
    "DPOP_REASONS",
    "DpopInvalidToken",
    "DpopReason",
    "DpopRefusal",
    "DpopStoreDown",
    "DpopVerifier",
    "InvalidDpopProof",
    "MemoryReplayStore",
    "NonceIssuer",
    "ProofRequest",
    "RedisReplayStore",
    "ReplayStore",
    "ReplayStoreUnavailable",
    "UseDpopNonce",
    "VerifiedProof",
    "access_token_hash",
    "authorization_scheme",
    "dpop_refusal",
    "jwk_thumbprint",
    "normalize_origin",
    "normalize_path",
    "normalize_uri",
    "replay_store_for",
]


# --- reasons and refusals ----------------------------------------------------------------

#: One reason code's status, OAuth ``error`` and description (the registry's type).
DpopReason = Reason

#: Every DPoP reason code (RFC 9449 section 7.1 challenges, 12.2 error codes): the
#: ``dpop_`` part of the one registry, :data:`mtls_gateway.reasons.REASONS`.
DPOP_REASONS: Mapping[str, Reason] = MappingProxyType(
    {code: reason for code, reason in REASONS.items() if code.startswith("dpop_")})


class DpopRefusal(Refusal):
    """A refusal answered with a ``WWW-Authenticate: DPoP`` challenge (section 7.1).

    ``nonce`` is sent as ``DPoP-Nonce`` (sections 8 and 9).
    """

    status = 401
    error: ClassVar[str | None] = "invalid_dpop_proof"

    def __init__(self, reason: str, description: str = "", *, nonce: str | None = None) -> None:
        super().__init__(reason, description or DPOP_REASONS[reason].description)
        self.nonce = nonce
        #: dpop_jkt_mismatch: the proof key's thumbprint, for the deny line
        self.proof_jkt: str | None = None


class InvalidDpopProof(DpopRefusal):
    error = "invalid_dpop_proof"


class DpopInvalidToken(DpopRefusal):
    error = "invalid_token"


class UseDpopNonce(DpopRefusal):
    error = "use_dpop_nonce"


class DpopStoreDown(DependencyDown):
    """The shared replay store did not answer: fail closed (503), never skip the check."""


_BY_ERROR: Mapping[str | None, type[Refusal]] = {
    "invalid_dpop_proof": InvalidDpopProof,
    "invalid_token": DpopInvalidToken,
    "use_dpop_nonce": UseDpopNonce,
}


def dpop_refusal(reason: str, *, nonce: str | None = None) -> Refusal:
    """The refusal for ``reason`` (a :data:`DPOP_REASONS` key), of the matching class."""
    entry = DPOP_REASONS[reason]
    if entry.status == 503:
        return DpopStoreDown(reason, entry.description)
    cls = _BY_ERROR[entry.error]
    assert issubclass(cls, DpopRefusal)
    return cls(reason, entry.description, nonce=nonce)


# --- the Authorization header ------------------------------------------------------------

_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def authorization_scheme(value: str) -> tuple[str, str] | None:
    """``("bearer" | "dpop", token)`` of one Authorization value; None for other schemes.

    The scheme is case-insensitive (RFC 9110 section 11.1). A malformed token yields
    ``(scheme, "")``: the caller reports malformed credentials as it does for Bearer.
    """
    scheme, _, rest = value.strip(" ").partition(" ")
    lowered = scheme.lower()
    if lowered not in ("bearer", "dpop"):
        return None
    token = rest.strip(" ")
    return lowered, token if _TOKEN68.fullmatch(token) else ""


# --- URIs (RFC 3986 section 6.2.2 and 6.2.3) ---------------------------------------------

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):(?://([^/?#]*))?([^?#]*)(?:\?[^#]*)?(?:#.*)?$")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
#: Characters RFC 3986 allows in a URI at all (reserved, unreserved, and '%').
_URI_CHARS = re.compile(r"^[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*$")
_DEFAULT_PORTS = {"http": "80", "https": "443"}
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::([0-9]*))?$")


def _pct_normalize(text: str) -> str:
    """Percent-encodings upper case; encoded unreserved characters decoded (s6.2.2.1-2)."""
    def one(m: re.Match[str]) -> str:
        byte = int(m.group(1), 16)
        return chr(byte) if byte in _UNRESERVED else "%" + m.group(1).upper()
    return _PCT.sub(one, text) if "%" in text else text


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4."""
    if "." not in path:
        return path
    out: list[str] = []
    for segment in path.split("/")[1:] if path.startswith("/") else path.split("/"):
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    trailing = path.endswith(("/.", "/..")) or path in (".", "..")
    result = "/" + "/".join(out) if path.startswith("/") else "/".join(out)
    return result + "/" if trailing and not result.endswith("/") else result


@functools.lru_cache(maxsize=512)
def normalize_origin(scheme: str, authority: str) -> str | None:
    """``scheme://host[:port]`` normalised (lower case, default port dropped), or None."""
    scheme = scheme.lower()
    m = _HOST.match(authority)
    if scheme not in _DEFAULT_PORTS or "@" in authority or m is None or not m.group(1):
        return None
    host, port = _pct_normalize(m.group(1)).lower(), m.group(2)
    if port:
        port = str(int(port))
        if port == _DEFAULT_PORTS[scheme]:
            port = None
    return f"{scheme}://{host}:{port}" if port else f"{scheme}://{host}"


@functools.lru_cache(maxsize=512)
def normalize_path(path: str) -> str:
    """A path normalised as RFC 3986 section 6.2.2 and 6.2.3 say (empty path is ``/``)."""
    return _remove_dot_segments(_pct_normalize(path)) or "/"


@functools.lru_cache(maxsize=512)
def normalize_uri(uri: str) -> tuple[str, str] | None:
    """``(origin, path)`` of an absolute http(s) URI without query and fragment, or None."""
    if len(uri) > 8192 or not _URI_CHARS.match(uri):
        return None
    m = _URI.match(uri)
    if m is None or m.group(2) is None:
        return None
    origin = normalize_origin(m.group(1), m.group(2))
    if origin is None:
        return None
    return origin, normalize_path(m.group(3))


# --- keys --------------------------------------------------------------------------------

#: RFC 7638 section 3.2: the required members of each key type, in lexicographic order.
_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"),
                       "OKP": ("crv", "kty", "x")}
#: Members only a private (or symmetric) key has: a proof carrying one is refused.
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "k", "oth")
#: Which key an algorithm uses: (kty, allowed crv values or None for RSA).
_KEY_FOR_ALG: Mapping[str, tuple[str, tuple[str, ...] | None]] = {
    **{a: ("RSA", None) for a in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    "ES256": ("EC", ("P-256",)), "ES384": ("EC", ("P-384",)), "ES512": ("EC", ("P-521",)),
    "EdDSA": ("OKP", ("Ed25519", "Ed448")),
}
_MIN_RSA_BITS = 2048
#: pyjwt's algorithm objects, built once at import.
_ALGORITHMS: Mapping[str, Algorithm] = {
    name: alg for name, alg in get_default_algorithms().items() if name in ASYMMETRIC_ALGORITHMS
}
#: ECDSA without pyjwt's per-call wrapping: (bytes of r and of s, the ECDSA object).
_ECDSA: Mapping[str, tuple[int, ec.ECDSA]] = {
    "ES256": (32, ec.ECDSA(hashes.SHA256())), "ES384": (48, ec.ECDSA(hashes.SHA384())),
    "ES512": (66, ec.ECDSA(hashes.SHA512())),
}


def _signature_valid(alg: str, key: Any, signing_input: bytes, signature: bytes) -> bool:
    """Whether ``signature`` (JWS form: raw ``r || s`` for ECDSA) is ``key``'s over the input.

    ECDSA calls ``cryptography`` directly (the JWS ``r || s`` re-encoded as DER, which is what
    pyjwt's ECAlgorithm.verify does, minus its per-call objects); the key's curve is the
    algorithm's, checked with the header. Everything else goes through pyjwt.
    """
    ecdsa = _ECDSA.get(alg)
    if ecdsa is None:
        return bool(_ALGORITHMS[alg].verify(signing_input, key, signature))
    size, algorithm = ecdsa
    if len(signature) != 2 * size:
        return False
    der = encode_dss_signature(int.from_bytes(signature[:size], "big"),
                               int.from_bytes(signature[size:], "big"))
    try:
        key.verify(der, signing_input, algorithm)
    except InvalidSignature:
        return False
    return True


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint; ValueError if a required member is missing or not text."""
    members = _THUMBPRINT_MEMBERS.get(jwk.get("kty"))  # type: ignore[arg-type]
    if members is None:
        raise ValueError("unsupported key type")
    if not all(isinstance(jwk.get(m), str) and jwk[m] for m in members):
        raise ValueError("key lacks a required member")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"),
                           ensure_ascii=False)
    return _b64(hashlib.sha256(canonical.encode("utf-8")).digest())


def access_token_hash(token: str) -> str:
    """``ath``: base64url SHA-256 of the access token's ASCII (RFC 9449 section 4.2)."""
    return _b64(hashlib.sha256(token.encode("ascii")).digest())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


_B64URL = re.compile(r"^[A-Za-z0-9_-]+$")


_B64_VALUE = {c: i for i, c in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")}
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_PADDING = ("", "", "==", "=")


def _b64decode(segment: str) -> bytes:
    """Strict base64url without padding; non-canonical encodings refused (ValueError)."""
    rest = len(segment) % 4
    if rest == 1 or not _B64URL.match(segment):
        raise ValueError("not base64url")
    # the unused low bits of the last character must be zero (RFC 4648 section 3.5)
    if rest and _B64_VALUE[segment[-1]] & (0x0F if rest == 2 else 0x03):
        raise ValueError("non-canonical base64url")
    try:       # (the alphabet is checked above: one C call from here)
        return binascii.a2b_base64((segment + _PADDING[rest]).encode("ascii")
                                   .translate(_URLSAFE_TO_STANDARD))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc


# --- nonces (section 9) ------------------------------------------------------------------

class NonceIssuer:
    """Stateless nonces: HMAC-SHA256 of the time window under a shared secret.

    A nonce is valid for the window it was issued in and the next one, so a client always
    has at least ``lifetime`` seconds to use it. Every replica with the same secret issues
    and accepts the same nonces: no shared store is needed.
    """

    def __init__(self, secret: bytes, lifetime: float,
                 clock: Callable[[], float] = time.time) -> None:
        if len(secret) < 32:
            raise ValueError("the nonce secret must be at least 32 bytes")
        self._secret, self._lifetime = secret, lifetime
        self.clock = clock                   # the time source (seconds; tests set their own)
        self._memo: dict[int, str] = {}

    def _for(self, window: int) -> str:
        nonce = self._memo.get(window)
        if nonce is None:
            mac = hmac.new(self._secret, b"dpop-nonce\x00" + window.to_bytes(8, "big", signed=True),
                           hashlib.sha256).digest()
            nonce = _b64(mac)
            if len(self._memo) > 4:
                self._memo.clear()
            self._memo[window] = nonce
        return nonce

    def _window(self) -> int:
        return math.floor(self.clock() / self._lifetime)

    def current(self) -> str:
        """The nonce to hand out now (``DPoP-Nonce``)."""
        return self._for(self._window())

    def check(self, nonce: str) -> bool | None:
        """True: current; False: previous window (still accepted; hand out a new one);
        None: unknown or expired."""
        window = self._window()
        if hmac.compare_digest(nonce.encode(), self._for(window).encode()):
            return True
        if hmac.compare_digest(nonce.encode(), self._for(window - 1).encode()):
            return False
        return None


# --- replay stores -----------------------------------------------------------------------

class ReplayStoreUnavailable(Exception):
    """The replay store cannot say whether a proof is new (down, slow, or full)."""


class ReplayStore(Protocol):
    async def first_use(self, key: bytes, ttl: float) -> bool:
        """Record ``key`` for ``ttl`` seconds; False if it was already recorded.

        Raises :class:`ReplayStoreUnavailable` when it cannot tell.
        """

    async def close(self) -> None: ...


class MemoryReplayStore:
    """One replica: a bounded in-process store of the keys seen within the window.

    When it is full of entries that are still inside the window it refuses to forget one
    (that would let the forgotten proof be replayed) and reports itself unavailable.

    Every entry lives ``ttl`` seconds (the store's, for all keys), so entries expire in the
    order they were made: a dict of expiry times and a FIFO of ``(expiry, key)`` forget the
    expired ones from the front, with no per-entry objects for the garbage collector to walk
    (a busy replica holds hundreds of thousands).
    """

    def __init__(self, maxsize: int, ttl: float, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.maxsize, self._ttl, self._clock = maxsize, ttl, clock
        self._expires: dict[bytes, float] = {}
        self._order: collections.deque[tuple[float, bytes]] = collections.deque()

    async def first_use(self, key: bytes, ttl: float) -> bool:
        now = self._clock()
        expires = self._expires
        seen = expires.get(key)
        if seen is not None and now < seen:
            return False
        order = self._order
        while order and order[0][0] <= now:      # out of the window: forgotten
            when, old = order.popleft()
            if expires.get(old) == when:         # (not since seen again)
                del expires[old]
        if len(expires) >= self.maxsize:
            raise ReplayStoreUnavailable("the in-process replay cache is full")
        expires[key] = when = now + self._ttl
        order.append((when, key))
        return True

    async def close(self) -> None:
        """Nothing to release: the cache outlives a reload (see :func:`replay_store_for`)."""


class RedisReplayStore:
    """Several replicas: ``SET key 1 NX PX ttl`` in one shared Redis.

    No retries and a short timeout: a store that does not answer at once makes the
    request fail closed (503) rather than wait or skip the check.
    """

    _PREFIX = b"mtls-gateway:dpop:"

    def __init__(self, url: str, *, timeout: float, password: str | None = None) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self._timeout = timeout
        self._client = Redis.from_url(url, password=password, socket_timeout=timeout,
                                      socket_connect_timeout=timeout,
                                      retry=Retry(NoBackoff(), 0), health_check_interval=0)

    async def first_use(self, key: bytes, ttl: float) -> bool:
        # The command runs in a task of its own, bounded by a loop timer rather than
        # asyncio.timeout: the fast lane starts a decision outside any task (it finishes most
        # without one), and redis-py's own timeouts need one.
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._set(key, ttl))
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        timer = loop.call_later(self._timeout * 2, expire)
        try:
            return await task
        except asyncio.CancelledError:
            if expired:
                raise ReplayStoreUnavailable("redis: timeout") from None
            raise
        finally:
            timer.cancel()

    async def _set(self, key: bytes, ttl: float) -> bool:
        from redis.exceptions import RedisError

        try:
            created = await self._client.set(self._PREFIX + key, b"1", nx=True,
                                             px=max(1, math.ceil(ttl * 1000)))
        except (RedisError, OSError) as exc:
            raise ReplayStoreUnavailable(f"redis: {type(exc).__name__}") from exc
        return bool(created)

    async def close(self) -> None:
        await self._client.aclose()


#: In-process stores by (size, window): a reload must not forget the proofs already seen
#: (a fresh cache would accept every proof of the last window once more).
_MEMORY_STORES: dict[tuple[int, float], MemoryReplayStore] = {}


def replay_store_for(config: DpopConfig, clock: Callable[[], float] | None = None
                     ) -> ReplayStore:
    """The store ``config.replay_store`` names (``memory`` or a redis URL).

    The memory store is shared by every configuration generation of this process with
    the same size and window (``clock`` given: a private one, for tests).
    """
    window = config.iat_max_age + config.iat_max_skew
    if config.replay_store == "memory":
        if clock is not None:
            return MemoryReplayStore(config.replay_cache_size, window, clock)
        key = (config.replay_cache_size, window)
        store = _MEMORY_STORES.get(key)
        if store is None:
            store = _MEMORY_STORES[key] = MemoryReplayStore(config.replay_cache_size, window)
        return store
    return RedisReplayStore(config.replay_store, timeout=config.replay_store_timeout,
                            password=config.replay_store_password)


# --- the verifier ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ProofRequest:
    """What of a request a proof is checked against: transport-neutral."""

    method: str
    target: str               # the request-target as received (origin- or absolute-form)
    host: str | None          # the Host header (None: absent)
    scheme: str               # the listener's scheme: "https" (or "http" without TLS)
    access_token: str
    #: SHA-256 of the token when the caller has it already (the pipeline does): ``ath``
    #: is its base64url, so the token is not hashed twice.
    token_sha256: bytes | None = None


@dataclass(frozen=True, slots=True)
class VerifiedProof:
    jkt: str                  # RFC 7638 thumbprint of the proof's key
    jti: str
    iat: float
    next_nonce: str | None    # a fresh nonce to send (the proof used the previous one)


class DpopVerifier:
    """Checks proofs for one configuration; built once, shared by every request."""

    def __init__(self, config: DpopConfig, *, store: ReplayStore | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] | None = None) -> None:
        self.config = config
        self.algorithms = tuple(a for a in config.algorithms if a in _ALGORITHMS)
        self._allowed = frozenset(self.algorithms)
        self._clock = clock
        self._window = config.iat_max_age + config.iat_max_skew
        self.store = store if store is not None else replay_store_for(config, monotonic)
        self.nonces = (NonceIssuer(config.nonce_secret, config.nonce_lifetime, clock)
                       if config.nonce_secret else None)
        origins = [normalize_origin(*_split_origin(o)) for o in config.external_origins]
        self._origins = frozenset(o for o in origins if o)
        self._keys: LRUCache[str, Any] = LRUCache(maxsize=1024)
        self._headers: LRUCache[str, tuple[str, str, Any]] = LRUCache(maxsize=1024)
        #: the last access token's ath: a client sends the same token with every proof
        self._ath: tuple[bytes, str] = (b"", "")
        #: whether an htu names a request (a pure function of these four strings): a client
        #: names the same URI on every call, so the RFC 3986 work runs once per URI
        self._htu_matches = functools.lru_cache(maxsize=256)(self._htu_names)

    def _fail(self, reason: str, nonce: bool = False) -> Refusal:
        return dpop_refusal(reason, nonce=self.nonces.current() if nonce and self.nonces
                            else None)

    async def check(self, values: Sequence[str], request: ProofRequest, *,
                    expected_jkt: str | None, nonce_required: bool) -> VerifiedProof:
        """Every check of a proof sent with a DPoP-bound token, the replay store last.

        Raises a :class:`DpopRefusal` (401) or :class:`DpopStoreDown` (503).
        """
        proof = self.verify(values, request, nonce_required=nonce_required)
        if expected_jkt is None:
            raise self._fail("dpop_binding_missing")
        if not hmac.compare_digest(proof.jkt.encode(), expected_jkt.encode()):
            refusal = self._fail("dpop_jkt_mismatch")
            if isinstance(refusal, DpopRefusal):
                refusal.proof_jkt = proof.jkt
            raise refusal
        key = hashlib.sha256(f"{proof.jkt}\x00{proof.jti}".encode()).digest()
        try:
            fresh = await self.store.first_use(key, self._window)
        except ReplayStoreUnavailable as exc:
            raise self._fail("dpop_replay_store_unavailable") from exc
        if not fresh:
            raise self._fail("dpop_replayed")
        return proof

    def verify(self, values: Sequence[str], request: ProofRequest, *,
               nonce_required: bool) -> VerifiedProof:
        """The stateless checks of section 4.3 (everything but key binding and replay)."""
        if not values:
            raise self._fail("dpop_proof_missing")
        if len(values) != 1 or len(values[0]) > self.config.max_proof_size:
            raise self._fail("dpop_proof_invalid")
        parts = values[0].strip(" \t").split(".")
        if len(parts) != 3:
            raise self._fail("dpop_proof_invalid")
        # A client sends the same header (typ, alg, its jwk) on every proof: the checked
        # header and its parsed key are remembered by the exact segment.
        known = self._headers.get(parts[0])
        try:
            header = loads_object(_b64decode(parts[0])) if known is None else None
            claims = loads_object(_b64decode(parts[1]))
            signature = _b64decode(parts[2])
        except (ValueError, UnicodeDecodeError) as exc:
            raise self._fail("dpop_proof_invalid") from exc
        if known is None:
            assert header is not None
            alg, jwk, jkt = self._header(header)
            self._claims(claims, request, nonce_required)
            key = self._key(jkt, alg, jwk)
            self._headers[parts[0]] = (alg, jkt, key)
        else:
            alg, jkt, key = known
            self._claims(claims, request, nonce_required)
        signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
        if not _signature_valid(alg, key, signing_input, signature):
            raise self._fail("dpop_proof_invalid")
        # RFC 9449 s8.2: on a route that uses nonces, a proof carrying last window's nonce
        # (still accepted) is answered with the current one, so the client switches before
        # its nonce expires
        next_nonce = None
        if nonce_required and self.nonces is not None and \
                self.nonces.check(claims["nonce"]) is False:
            next_nonce = self.nonces.current()
        return VerifiedProof(jkt, claims["jti"], float(claims["iat"]), next_nonce)

    def _header(self, header: Mapping[str, Any]) -> tuple[str, Mapping[str, Any], str]:
        typ, alg, jwk = header.get("typ"), header.get("alg"), header.get("jwk")
        if not isinstance(typ, str) or typ.lower() != "dpop+jwt" or "crit" in header:
            raise self._fail("dpop_proof_invalid")
        if not isinstance(alg, str) or alg not in self._allowed:
            raise self._fail("dpop_alg_not_allowed")
        if not isinstance(jwk, dict) or any(m in jwk for m in _PRIVATE_MEMBERS):
            raise self._fail("dpop_proof_invalid")
        kty, curves = _KEY_FOR_ALG[alg]
        if jwk.get("kty") != kty or (curves is not None and jwk.get("crv") not in curves):
            raise self._fail("dpop_proof_invalid")
        try:
            jkt = jwk_thumbprint(jwk)
        except ValueError as exc:
            raise self._fail("dpop_proof_invalid") from exc
        return alg, jwk, jkt

    def _key(self, jkt: str, alg: str, jwk: Mapping[str, Any]) -> Any:
        """The public key object, parsed once per thumbprint (the members that make it)."""
        key = self._keys.get(jkt)
        if key is None:
            try:
                key = _ALGORITHMS[alg].from_jwk(dict(jwk))
            except (InvalidKeyError, ValueError, TypeError, KeyError) as exc:
                raise self._fail("dpop_proof_invalid") from exc
            if jwk["kty"] == "RSA" and key.key_size < _MIN_RSA_BITS:
                raise self._fail("dpop_proof_invalid")
            self._keys[jkt] = key
        return key

    def _claims(self, claims: Mapping[str, Any], request: ProofRequest,
                nonce_required: bool) -> None:
        jti, htm, htu, iat = claims.get("jti"), claims.get("htm"), claims.get("htu"), \
            claims.get("iat")
        if not (isinstance(jti, str) and 0 < len(jti) <= 512 and isinstance(htm, str)
                and isinstance(htu, str) and numeric_date(iat)):
            raise self._fail("dpop_proof_invalid")
        if htm != request.method:
            raise self._fail("dpop_htm_mismatch")
        if not self._htu_matches(htu, request.target, request.host, request.scheme):
            raise self._fail("dpop_htu_mismatch")
        nonce = claims.get("nonce")
        if nonce is not None and not isinstance(nonce, str):
            raise self._fail("dpop_proof_invalid")
        if nonce_required:
            if self.nonces is None:      # config_load refuses this; fail closed regardless
                raise self._fail("dpop_nonce_required")
            if nonce is None or self.nonces.check(nonce) is None:
                raise self._fail("dpop_nonce_required", nonce=True)
        now = self._clock()
        assert isinstance(iat, int | float)
        if iat < now - self.config.iat_max_age:
            raise self._fail("dpop_proof_expired", nonce=nonce_required)
        if iat > now + self.config.iat_max_skew:
            raise self._fail("dpop_iat_in_future", nonce=nonce_required)
        ath = claims.get("ath")
        digest = request.token_sha256
        if digest is None:
            expected = access_token_hash(request.access_token)
        elif digest == self._ath[0]:
            expected = self._ath[1]
        else:
            expected = _b64(digest)
            self._ath = (digest, expected)
        if not isinstance(ath, str) or not hmac.compare_digest(ath.encode(), expected.encode()):
            raise self._fail("dpop_ath_mismatch")

    def _htu_names(self, htu: str, target: str, host: str | None, scheme: str) -> bool:
        """Whether ``htu`` names the request (target, Host, the listener's scheme)."""
        claimed = normalize_uri(htu)
        if claimed is None:
            return False
        origin, path = claimed
        if target.startswith("/"):
            expected_path = normalize_path(target.split("?", 1)[0].split("#", 1)[0])
            if self._origins:
                expected_origin = origin if origin in self._origins else None
            else:
                expected_origin = normalize_origin(scheme, host) if host else None
        else:                            # absolute-form: the client named the origin
            absolute = normalize_uri(target)
            if absolute is None:
                return False
            expected_origin, expected_path = absolute
            if self._origins and expected_origin not in self._origins:
                return False
        return expected_origin is not None and origin == expected_origin \
            and path == expected_path


def _split_origin(origin: str) -> tuple[str, str]:
    scheme, _, rest = origin.partition("://")
    return scheme, rest.rstrip("/")
