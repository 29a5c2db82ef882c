"""A JWK Set as usable verification keys: pure parsing (config validation uses it too).

Rules that keep an attacker from steering key handling (RFC 8725): keys are indexed by
``(kid, alg)`` where ``alg`` must be in the provider's allowlist and fit the key type;
symmetric and private keys, keys not for verification, weak keys and a second key with an
already seen ``(kid, alg)`` are skipped (and logged); the others stay usable.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt

__all__ = ["KeySet"]

log = logging.getLogger("mtls_gateway.jwks")   # (the key source's log: where operators look)

_MAX_JWKS_KEYS = 100
#: Members only a private or symmetric key has: such a JWK is never published for verification.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_ALGS_FOR_KEY = {
    "RSA": ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
    "EC:P-256": ("ES256",), "EC:P-384": ("ES384",), "EC:P-521": ("ES512",),
    "OKP:Ed25519": ("EdDSA",), "OKP:Ed448": ("EdDSA",),
}


@dataclass(frozen=True, eq=False)
class KeySet:
    """Immutable snapshot of usable keys, indexed by ``(kid, alg)`` and by ``alg``.

    Two key sets are equal when they come from the same JWKS document and algorithms.
    """

    by_kid: Mapping[tuple[str, str], jwt.PyJWK]
    by_alg: Mapping[str, tuple[jwt.PyJWK, ...]]
    kids: frozenset[str]
    source: str = ""   # canonical JSON of the document and the allowed algorithms

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KeySet) and other.source == self.source

    def __hash__(self) -> int:
        return hash(self.source)

    @classmethod
    def from_document(cls, doc: Any, algorithms: tuple[str, ...]) -> KeySet:
        """Keep each key usable with an allowed algorithm; skip (and log) the rest."""
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise ValueError('JWKS is not an object with a "keys" list')
        if len(doc["keys"]) > _MAX_JWKS_KEYS:
            raise ValueError(f"JWKS has more than {_MAX_JWKS_KEYS} keys")
        by_kid: dict[tuple[str, str], jwt.PyJWK] = {}
        by_alg: dict[str, list[jwt.PyJWK]] = {}
        for jwk in doc["keys"]:
            if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
                continue
            kid = jwk.get("kid")
            key_ops = jwk.get("key_ops")
            if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
                continue
            if _PRIVATE_MEMBERS & jwk.keys():
                log.warning("skipping JWKS key kid=%r: it holds private or symmetric key "
                            "material, which is never published for verification", kid)
                continue
            kty = jwk.get("kty")
            family = f"{kty}:{jwk.get('crv')}" if kty in ("EC", "OKP") else kty
            candidates = _ALGS_FOR_KEY.get(str(family), ())
            if "alg" in jwk:  # one key, one algorithm
                candidates = tuple(a for a in candidates if a == jwk["alg"])
            for alg in (a for a in candidates if a in algorithms):
                try:
                    key = jwt.PyJWK(jwk, algorithm=alg)
                    weak = key.Algorithm.check_key_length(key.key)
                except (jwt.PyJWTError, ValueError, TypeError, KeyError,
                        AttributeError) as exc:
                    log.warning("skipping unusable JWKS key kid=%r: %s", kid,
                                type(exc).__name__)
                    break
                if weak:  # e.g. RSA under 2048 bits (NIST SP 800-131A)
                    log.warning("skipping weak JWKS key kid=%r: %s", kid, weak)
                    break
                if isinstance(kid, str):
                    if (kid, alg) in by_kid:
                        log.warning("skipping JWKS key kid=%r: an earlier key has this kid",
                                    kid)
                        break
                    by_kid[(kid, alg)] = key
                by_alg.setdefault(alg, []).append(key)
        if not by_alg:
            raise ValueError("JWKS has no key usable with the allowed algorithms")
        return cls(by_kid, {a: tuple(k) for a, k in by_alg.items()},
                   frozenset(kid for kid, _ in by_kid),
                   json.dumps([doc, algorithms], sort_keys=True))

    def lookup(self, kid: str | None, alg: str) -> tuple[jwt.PyJWK, ...]:
        """Keys to try: the one with this kid, or (no kid in the token) every key for alg."""
        if kid is None:
            return self.by_alg.get(alg, ())
        key = self.by_kid.get((kid, alg))
        return (key,) if key is not None else ()
