"""Local verification of JWT access tokens (RFC 9068, RFC 8725).

One :class:`JwtVerifier` per provider, built at configuration time. The token
never chooses how it is verified: ``alg`` must be on the provider's allowlist
(asymmetric only), the key comes from the provider's JWKS by ``kid``, and
``jku``/``x5u``/``jwk``/``x5c`` header parameters are ignored. ``crit`` is
refused because the gateway understands no JWS extensions.

Checks PyJWT does not make (RFC 8725, RFC 9068), all before any signature work:
a JWE (five segments) is refused without decryption (``token_encrypted``);
each of the three segments must be canonical unpadded base64url (RFC 7515
section 2: no ``=``, no ``+``/``/``, no white space, unused trailing bits zero),
else ``token_malformed``: PyJWT's decoder accepts all of those, so one token had
several accepted spellings, each with its own cache entry and log hash;
``cty`` (nested tokens), ``zip`` and ``b64`` are refused (``header_unsupported``);
``typ`` must be an access-token type (``at+jwt``, or also ``JWT``/absent unless
``require_typ_at_jwt``); header and payload are strict JSON (no duplicate
members, no NaN/Infinity, bounded nesting); ``exp``/``nbf``/``iat`` must be
JSON numbers (PyJWT accepts ``"exp": "9999999999"`` and crashes on
``Infinity``); ``iss`` must be a string and ``aud`` a string or list of strings.

A token that verified is remembered (bounded, keyed by its SHA-256, never the
token itself) until its ``exp``, so a client reusing its token does not pay for
the signature again; each hit re-checks ``exp``/``nbf`` against the clock, and
the entry is void as soon as the provider's key set changes (rotation, removal).
Binding and scope are checked by the gateway on every request, cached or not.
"""

from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass
from typing import Any

import jwt
from cachetools import TLRUCache
from jwt.types import Options

from . import trace
from .config import JwtProvider
from .errors import InvalidToken
from .jwks import JwksSource, KeySet
from .metrics import Metrics
from .strict_json import loads_object, numeric_date
from .tokeninfo import TokenInfo, token_info_from_claims

__all__ = ["JwtVerifier", "canonical_jws", "unverified_issuer"]

_AT_JWT_TYPES = ("at+jwt", "application/at+jwt")
#: typ values accepted unless require_typ_at_jwt: RFC 9068 types, plain JWT, or none at all.
_ACCESS_TOKEN_TYPES = (*_AT_JWT_TYPES, "jwt", "application/jwt", None)
#: A token is carried in one header line (limits.max_header_size); kids are names.
_MAX_TOKEN_CHARS = 64 * 1024
_MAX_KID_CHARS = 256
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")

# pyjwt's exceptions, translated once into stable reason codes (most specific first).
_PYJWT_REASONS: tuple[tuple[type[jwt.PyJWTError], str, str], ...] = (
    (jwt.ExpiredSignatureError, "token_expired", "token has expired"),
    (jwt.ImmatureSignatureError, "token_not_yet_valid", "token is not yet valid"),
    (jwt.InvalidIssuerError, "wrong_issuer", "token issuer is not accepted"),
    (jwt.InvalidAudienceError, "wrong_audience", "token audience is not accepted"),
    (jwt.MissingRequiredClaimError, "missing_claim", "token lacks a required claim"),
    (jwt.InvalidSignatureError, "bad_signature", "token signature is invalid"),
    (jwt.InvalidAlgorithmError, "alg_not_allowed", "token algorithm is not allowed"),
    (jwt.DecodeError, "token_malformed", "token is malformed"),
    (jwt.InvalidTokenError, "token_invalid", "token is invalid"),
)


@dataclass(frozen=True, slots=True)
class _Verified:
    info: TokenInfo
    keys: KeySet            # the key set the signature was checked with
    not_before: float | None
    expires: float          # exp + leeway, POSIX seconds


def canonical_jws(token: str) -> bool:
    """Is ``token`` three segments of canonical unpadded base64url (RFC 7515 section 2)?

    Canonical: the alphabet ``A-Z a-z 0-9 - _`` only, no padding, a length that a
    whole number of bytes can have, and zero bits after the last byte, so that the
    segment is exactly what encoding its bytes gives back.
    """
    parts = token.split(".")
    if len(parts) != 3 or len(token) > _MAX_TOKEN_CHARS:
        return False
    for part in parts:
        if not _BASE64URL.fullmatch(part) or len(part) % 4 == 1:
            return False
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != part:
            return False
    return True


def _segment(token: str, index: int) -> dict[str, Any] | None:
    """JSON object in segment ``index`` of a compact JWS, unverified; None if not one."""
    parts = token.split(".")
    if len(parts) != 3 or len(token) > _MAX_TOKEN_CHARS:
        return None
    try:
        return loads_object(base64.urlsafe_b64decode(
            parts[index] + "=" * (-len(parts[index]) % 4)))
    except ValueError:   # binascii.Error and UnicodeDecodeError are ValueErrors
        return None


def _check_header(header: dict[str, Any], allowed: tuple[str, ...], typ_at_jwt: bool) -> str:
    """The header's ``alg`` if the header is acceptable; else :class:`InvalidToken`."""
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in allowed:
        raise InvalidToken("alg_not_allowed", "token algorithm is not allowed")
    if "crit" in header:
        raise InvalidToken("crit_unsupported", "token has critical header parameters")
    if any(name in header for name in ("cty", "zip", "b64")):
        raise InvalidToken("header_unsupported", "token header parameter is not supported")
    typ = header.get("typ")
    typ = typ.lower() if isinstance(typ, str) else typ
    if typ not in (_AT_JWT_TYPES if typ_at_jwt else _ACCESS_TOKEN_TYPES):
        raise InvalidToken("wrong_typ", "token is not an at+jwt access token"
                           if typ_at_jwt else "token type is not an access token")
    kid = header.get("kid")
    if "kid" in header and (not isinstance(kid, str) or not 0 < len(kid) <= _MAX_KID_CHARS):
        raise InvalidToken("token_malformed", "token kid is malformed")
    return alg


def _check_claim_types(claims: dict[str, Any]) -> None:
    """Refuse claims whose JSON type PyJWT would coerce or choke on."""
    for name in ("exp", "nbf", "iat"):
        if name in claims and not numeric_date(claims[name]):
            raise InvalidToken("token_malformed", f"token claim {name} is not a NumericDate")
    if "iss" in claims and not isinstance(claims["iss"], str):
        raise InvalidToken("token_malformed", "token claim iss is not a string")
    aud = claims.get("aud")
    if "aud" in claims and not (isinstance(aud, str) or (
            isinstance(aud, list) and all(isinstance(a, str) for a in aud))):
        raise InvalidToken("token_malformed", "token claim aud is malformed")


def unverified_issuer(token: str) -> str | None:
    """``iss`` of a compact JWS without verifying it (for routing a token to its provider)."""
    iss = (_segment(token, 1) or {}).get("iss")
    return iss if isinstance(iss, str) else None


class JwtVerifier:
    """Verifies JWT access tokens of one issuer."""

    def __init__(self, provider: JwtProvider, keys: JwksSource | None = None,
                 metrics: Metrics | None = None) -> None:
        self.provider = provider
        self.name = provider.name
        self.keys = keys or JwksSource(provider, metrics)
        self.metrics = metrics
        self.verifications = 0      # signatures checked
        self.cache_hits = 0
        self._jwt = jwt.PyJWT(options={"enforce_minimum_key_length": True})
        self._require = sorted({"exp", "iss", "aud", *provider.required_claims})
        # Every check PyJWT has, stated rather than left to its version's defaults.
        self._options: Options = {
            "verify_signature": True, "verify_exp": True, "verify_nbf": True,
            "verify_iat": True, "verify_aud": True, "verify_iss": True, "verify_sub": True,
            "verify_jti": True, "require": self._require}
        self._verified: TLRUCache[bytes, _Verified] | None = None
        self._hit_counter = metrics.jwt_cache.labels(self.name, "hit") if metrics else None
        if provider.verify_cache_size > 0:
            self._verified = TLRUCache(
                maxsize=provider.verify_cache_size,
                ttu=lambda _k, v, _now: time.monotonic() + max(0.0, v.expires - time.time()),
                timer=time.monotonic)

    @property
    def ready(self) -> bool:
        return self.keys.ready

    async def start(self) -> None:
        await self.keys.start()

    async def close(self) -> None:
        await self.keys.close()

    def claims_token(self, token: str) -> bool:
        """Whether this provider is the one to ask: a JWT naming our issuer."""
        return unverified_issuer(token) == self.provider.issuer

    def cached(self, token: str, digest: bytes) -> TokenInfo | None:
        hit = self.cached_entry(digest)
        return None if hit is None else self.reuse(hit, digest)

    def cached_entry(self, digest: bytes) -> _Verified | None:
        return self._verified.get(digest) if self._verified is not None else None

    def reuse(self, entry: object, digest: bytes) -> TokenInfo | None:
        hit = entry
        assert isinstance(hit, _Verified)
        if hit.keys is not self.keys.current:
            return None                 # verified with a key set since replaced: again
        self.cache_hits += 1
        if self._hit_counter is not None:      # (counted once a second, not per request)
            self.metrics.add(self._hit_counter)  # type: ignore[union-attr]
        now = time.time()
        if now > hit.expires:
            raise InvalidToken("token_expired", "token has expired")
        if hit.not_before is not None and now + self.provider.leeway < hit.not_before:
            raise InvalidToken("token_not_yet_valid", "token is not yet valid")
        return hit.info

    async def verify(self, token: str, digest: bytes) -> TokenInfo:
        if self._verified is None:
            return await self._verify(token)
        info = self.cached(token, digest)
        if info is not None:
            return info
        info, claims, keys = await self._verify_claims(token)
        nbf = claims.get("nbf")
        self._verified[digest] = _Verified(
            info, keys, float(nbf) if isinstance(nbf, int | float) else None,
            float(claims["exp"]) + self.provider.leeway)
        return info

    async def _verify(self, token: str) -> TokenInfo:
        return (await self._verify_claims(token))[0]

    async def _verify_claims(self, token: str) -> tuple[TokenInfo, dict[str, Any], KeySet]:
        if token.count(".") == 4:
            raise InvalidToken("token_encrypted", "encrypted tokens (JWE) are not accepted")
        if not canonical_jws(token):
            raise InvalidToken("token_malformed", "token is not three segments of canonical "
                               "unpadded base64url (RFC 7515 section 2)")
        header = _segment(token, 0)
        if header is None:
            raise InvalidToken("token_malformed", "token is not a valid JWT")
        steps = trace.current()          # None but under ``explain`` (trace.py)
        alg = _check_header(header, self.provider.algorithms, self.provider.require_typ_at_jwt)
        kid = header.get("kid")
        trace.note(steps, "header", "pass", alg=alg, allowed=list(self.provider.algorithms),
                   typ=header.get("typ"), kid=kid)
        payload = _segment(token, 1)
        if payload is None:
            raise InvalidToken("token_malformed", "token payload is not a JSON object")
        _check_claim_types(payload)
        keys, candidates = await self.keys.keys_for(kid, alg)
        trace.note(steps, "key", "pass", kid=kid, alg=alg, candidates=len(candidates))
        self.verifications += 1
        if self.metrics and self._verified is not None:
            self.metrics.jwt_cache.labels(self.name, "miss").inc()
        try:
            claims = self._decode(token, alg, candidates)
            if claims.get("iss") != self.provider.issuer:   # exact, whatever PyJWT's does
                raise InvalidToken("wrong_issuer", "token issuer is not accepted")
        except InvalidToken as exc:
            if steps is not None:
                self._trace_claims(steps, payload, alg, kid, exc.reason)
            raise
        if steps is not None:
            self._trace_claims(steps, payload, alg, kid, None)
        return token_info_from_claims(self.name, claims), claims, keys

    def _trace_claims(self, steps: list[trace.Check], claims: dict[str, Any], alg: str,
                      kid: object, failed: str | None) -> None:
        """``explain``: the signature and the claim checks PyJWT made in one call; the one
        that failed (``failed``: its reason) and the values each compared."""
        p, now = self.provider, time.time()
        checks: tuple[tuple[str, str, dict[str, object]], ...] = (
            ("signature", "bad_signature", {"alg": alg, "kid": kid}),
            ("exp", "token_expired", {"exp": claims.get("exp"), "now": int(now),
                                      "leeway": p.leeway}),
            ("nbf", "token_not_yet_valid", {"nbf": claims.get("nbf"), "now": int(now),
                                            "leeway": p.leeway}),
            ("iss", "wrong_issuer", {"token": claims.get("iss"), "expected": p.issuer}),
            ("aud", "wrong_audience", {"token": claims.get("aud"),
                                       "expected": list(p.audiences)}),
            ("required_claims", "missing_claim", {
                "required": self._require,
                "missing": [c for c in self._require if c not in claims]}),
        )
        for step, reason, values in checks:
            verdict = "pass" if failed is None else "fail" if failed == reason else (
                "pass" if step == "signature" and failed != "token_malformed"
                else "not checked")
            steps.append(trace.Check(step, verdict, values))

    def _decode(self, token: str, alg: str, keys: tuple[jwt.PyJWK, ...]) -> dict[str, Any]:
        last: jwt.PyJWTError | None = None
        for key in keys:
            try:
                return self._jwt.decode(
                    token, key=key, algorithms=[alg],
                    audience=list(self.provider.audiences), issuer=self.provider.issuer,
                    leeway=self.provider.leeway, options=self._options,
                )
            except jwt.InvalidSignatureError as exc:
                last = exc  # a kid-less token: try the next key for this alg
            except jwt.PyJWTError as exc:
                last = exc
                break
            except (ValueError, TypeError, OverflowError) as exc:  # PyJWT let a shape through
                raise InvalidToken("token_malformed", "token is malformed") from exc
        assert last is not None
        for kind, reason, description in _PYJWT_REASONS:
            if isinstance(last, kind):
                raise InvalidToken(reason, description) from last
        raise InvalidToken("token_invalid", "token is invalid") from last
