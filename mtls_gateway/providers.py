"""Token verifiers by name, and how a route's provider list picks one.

Each verifier is built once from configuration. For a route naming several
providers, the first one that *claims* the token verifies it (a JWT provider
claims JWTs that name its issuer; introspection claims anything); when none
claims it, the last provider in the list verifies it and so gives its specific
error (wrong issuer, malformed, inactive...). A token is never tried against
several verifiers in turn, so one bad token costs one verification.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from .tokeninfo import TokenInfo

__all__ = ["Verifier", "pick_verifier"]


class Verifier(Protocol):
    name: str

    def claims_token(self, token: str) -> bool:
        """Cheap check (no I/O, no crypto): is this token for me?"""
        ...

    def cached(self, token: str, digest: bytes) -> TokenInfo | None:
        """The verdict from the cache, checks on every use applied (raise as :meth:`verify`
        would); None when only :meth:`verify` can tell (no I/O, no crypto here)."""
        ...

    def cached_entry(self, digest: bytes) -> object | None:
        """The cache entry for a token (its ``digest``), for :meth:`reuse`; None: not cached."""
        ...

    def reuse(self, entry: object, digest: bytes) -> TokenInfo | None:
        """The verdict of an entry from :meth:`cached_entry`, the checks on every use made
        now (raise as :meth:`verify` would); None: the entry no longer counts (verify)."""
        ...

    async def verify(self, token: str, digest: bytes) -> TokenInfo:
        """Verify or raise a :class:`~mtls_gateway.errors.Refusal`; ``digest`` is the
        token's SHA-256 (:func:`~mtls_gateway.decision_log.token_digest`), the cache key."""
        ...

    @property
    def ready(self) -> bool:
        """Whether the verifier can work (keys loaded at least once)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def pick_verifier(verifiers: Mapping[str, Verifier], names: Sequence[str],
                  token: str) -> Verifier:
    if len(names) == 1:     # the only candidate: no need to peek into the token
        return verifiers[names[0]]
    for name in names:
        verifier = verifiers[name]
        if verifier.claims_token(token):
            return verifier
    return verifiers[names[-1]]
