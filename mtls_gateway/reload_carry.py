"""What a reload keeps from the running gateway: the state that still holds.

A reload must never make an outage worse. The verifier of a provider whose definition did
not change is handed over whole (its last good key set, verified-token cache, introspection
cache and breaker); a JWT provider whose key source did not change (but, say, its audiences
did) keeps its key set and gets new checks and an empty verified-token cache. Everything else
is built anew. "Did not change" covers the files a provider reads too (CA bundles, client
certificate and key): a rotated file means a new verifier, even under the same path.

Ownership moves with the verifier: the new :class:`~mtls_gateway.gateway.Gateway` closes it
one day, the old one (retiring) must not (:meth:`Gateway.release`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .config import GatewayConfig, IntrospectionProvider, JwtProvider, Provider
from .gateway import Gateway
from .jwt_verifier import JwtVerifier
from .metrics import Metrics
from .providers import Verifier

__all__ = ["Carried", "carry_over", "files_digest", "provider_files_digest"]

#: The fields of a JWT provider that decide which keys it has (see jwks.py).
_KEY_SOURCE_FIELDS = ("jwks_uri", "jwks", "jwks_ca_file", "algorithms", "jwks_timeout",
                      "jwks_refresh_interval", "jwks_refetch_cooldown")


def _files(provider: Provider) -> tuple[Path, ...]:
    if isinstance(provider, JwtProvider):
        paths: tuple[Path | None, ...] = (provider.jwks_ca_file,)
    else:
        paths = (provider.ca_file, provider.client_cert_file, provider.client_key_file)
    return tuple(p for p in paths if p is not None)


def files_digest(paths: Iterable[Path]) -> bytes:
    """Digest of the names and contents of ``paths`` (an unreadable one by its errno):
    what the config watcher and :func:`provider_files_digest` compare (blocking: run in a
    thread)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path).encode() + b"\0")
        try:
            digest.update(path.read_bytes())
        except OSError as exc:
            digest.update(f"unreadable:{exc.errno}".encode())
    return digest.digest()


def provider_files_digest(providers: Mapping[str, Provider]) -> dict[str, bytes]:
    """Per provider, a digest of the files it reads (blocking: run in a thread)."""
    return {name: files_digest(_files(provider)) for name, provider in providers.items()}


def _same_key_source(before: JwtProvider, after: JwtProvider) -> bool:
    return all(getattr(before, f) == getattr(after, f) for f in _KEY_SOURCE_FIELDS)


@dataclass
class Carried:
    """The outcome of :func:`carry_over`, by provider name."""

    verifiers: dict[str, Verifier] = field(default_factory=dict)   # for Gateway(verifiers=)
    kept: list[str] = field(default_factory=list)        # whole verifier: keys, caches, breaker
    keys_only: list[str] = field(default_factory=list)   # a JWT provider's key set
    fresh: list[str] = field(default_factory=list)       # built and started anew

    @property
    def handed_over(self) -> set[str]:
        return set(self.kept) | set(self.keys_only)


def carry_over(old: Gateway, config: GatewayConfig, metrics: Metrics,
               old_files: Mapping[str, bytes], new_files: Mapping[str, bytes]) -> Carried:
    """Which of ``old``'s verifiers the gateway for ``config`` takes over (nothing is started
    or closed here). ``*_files``: :func:`provider_files_digest` of each config."""
    carried = Carried()
    for name, provider in config.providers.items():
        before = old.config.providers.get(name)
        verifier = old.verifiers.get(name)
        files_same = old_files.get(name) == new_files.get(name)
        if before is None or verifier is None or name not in old.owned or not files_same:
            carried.fresh.append(name)
        elif before == provider:
            carried.verifiers[name] = verifier
            carried.kept.append(name)
        elif isinstance(before, JwtProvider) and isinstance(provider, JwtProvider) \
                and isinstance(verifier, JwtVerifier) and _same_key_source(before, provider):
            carried.verifiers[name] = JwtVerifier(provider, keys=verifier.keys, metrics=metrics)
            carried.keys_only.append(name)
        else:
            assert isinstance(provider, JwtProvider | IntrospectionProvider)
            carried.fresh.append(name)
    return carried
