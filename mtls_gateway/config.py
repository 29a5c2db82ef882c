"""Configuration types: what a loaded, valid ``gateway.yaml`` means.

These are plain frozen dataclasses with no parsing or validation logic; that
lives in :mod:`mtls_gateway.config_load`, which is the only way to build them
from YAML. Durations are seconds (float); paths are absolute.
The commented ``gateway.yaml`` at the top of the repository documents every
field and its default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "AdminConfig",
    "AuthNone",
    "AuthPolicy",
    "Binding",
    "CacheConfig",
    "ClientAuthMethod",
    "GatewayConfig",
    "IdentityHeaders",
    "IntrospectionProvider",
    "JwtProvider",
    "ListenConfig",
    "LoggingConfig",
    "PathMatch",
    "Provider",
    "Route",
    "UpstreamConfig",
]

#: Signature algorithms a provider may allow. Never HMAC, never ``none`` (RFC 8725, RFC 9068).
ASYMMETRIC_ALGORITHMS: tuple[str, ...] = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)

Binding = Literal["required", "optional", "off"]
ClientAuthMethod = Literal["client_secret_basic", "client_secret_post", "tls_client_auth"]


@dataclass(frozen=True)
class ListenConfig:
    host: str
    port: int
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None              # None only with client_ca "any"
    client_cert: Literal["required", "optional"]
    min_tls_version: Literal["1.2", "1.3"]
    max_tls_version: Literal["1.2", "1.3"]
    # "pki": client certificates must chain to client_ca_file (CPython ssl).
    # "any": any issuer, self-signed too (pyOpenSSL, mtls_gateway.tls_any); binding only.
    client_ca: Literal["pki", "any"] = "pki"
    client_cert_validity: Literal["enforce", "ignore"] = "enforce"   # "any" only


@dataclass(frozen=True)
class AdminConfig:
    enabled: bool
    host: str
    port: int


@dataclass(frozen=True)
class JwtProvider:
    """A locally verified JWT issuer (RFC 9068 access tokens)."""

    name: str
    issuer: str
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...]
    jwks_uri: str | None
    jwks: dict[str, Any] | None          # inline or loaded from jwks_file
    jwks_ca_file: Path | None
    jwks_refresh_interval: float
    jwks_refetch_cooldown: float
    jwks_timeout: float
    leeway: float
    required_claims: tuple[str, ...]
    require_typ_at_jwt: bool
    verify_cache_size: int
    kind: Literal["jwt"] = "jwt"


@dataclass(frozen=True)
class CacheConfig:
    maxsize: int
    ttl: float
    negative_ttl: float


@dataclass(frozen=True)
class IntrospectionProvider:
    """An RFC 7662 introspection endpoint for opaque tokens."""

    name: str
    endpoint: str
    client_id: str
    auth_method: ClientAuthMethod
    client_secret: str | None = field(repr=False)   # read from file or env, never inline
    client_cert_file: Path | None
    client_key_file: Path | None
    ca_file: Path | None
    timeout: float
    issuer: str | None
    audiences: tuple[str, ...]
    leeway: float
    cache: CacheConfig
    failure_threshold: int
    failure_cooldown: float
    kind: Literal["introspection"] = "introspection"


Provider = JwtProvider | IntrospectionProvider


@dataclass(frozen=True)
class IdentityHeaders:
    """Header names the upstream receives the verified identity in (None: not sent)."""

    subject: str | None
    client_id: str | None
    scope: str | None
    thumbprint: str | None
    provider: str | None

    def names(self) -> tuple[str, ...]:
        return tuple(n for n in (self.subject, self.client_id, self.scope,
                                 self.thumbprint, self.provider) if n)


@dataclass(frozen=True)
class UpstreamConfig:
    url: str
    connect_timeout: float
    read_timeout: float
    max_connections: int
    pass_authorization: bool
    identity_headers: IdentityHeaders


@dataclass(frozen=True)
class PathMatch:
    """How a route matches the request path: segment-aware prefix, exact, or regex."""

    kind: Literal["prefix", "exact", "regex"]
    value: str
    regex: re.Pattern[str] | None = None

    def matches(self, path: str) -> bool:
        if self.kind == "exact":
            return path == self.value
        if self.kind == "regex":
            assert self.regex is not None
            return self.regex.search(path) is not None
        prefix = self.value.rstrip("/")
        return prefix == "" or path == prefix or path.startswith(prefix + "/")


@dataclass(frozen=True)
class AuthNone:
    """An explicitly public route: no token is needed or checked."""


@dataclass(frozen=True)
class AuthPolicy:
    providers: tuple[str, ...]
    binding: Binding
    scopes: tuple[str, ...]


@dataclass(frozen=True)
class Route:
    name: str
    match: PathMatch
    methods: frozenset[str] | None           # None: any method
    auth: AuthNone | AuthPolicy
    upstream_url: str | None                 # None: the global upstream


@dataclass(frozen=True)
class LoggingConfig:
    level: str


@dataclass(frozen=True)
class GatewayConfig:
    source: Path | None
    realm: str
    listen: ListenConfig
    admin: AdminConfig
    providers: dict[str, Provider]
    upstream: UpstreamConfig
    routes: tuple[Route, ...]
    logging: LoggingConfig
    shutdown_grace: float
    shutdown_delay: float
    reload_interval: float

    def watched_files(self) -> tuple[Path, ...]:
        """Files whose change on disk triggers a reload (the config file and TLS material)."""
        files = [self.source] if self.source else []
        files += [self.listen.cert_file, self.listen.key_file]
        if self.listen.client_ca_file is not None:
            files.append(self.listen.client_ca_file)
        return tuple(files)
