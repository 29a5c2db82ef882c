"""Configuration types: what a loaded, valid ``gateway.yaml`` means.

These are plain frozen dataclasses with no parsing or validation logic; that
lives in :mod:`mtls_gateway.config_load`, which is the only way to build them
from YAML. Durations are seconds (float); paths are absolute.
The commented ``gateway.yaml`` at the top of the repository documents every
field and its default.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "AdminConfig",
    "AsMetadataRewrite",
    "AuthMtlsClient",
    "AuthNone",
    "AuthPolicy",
    "Binding",
    "CacheConfig",
    "CertHeaderFormat",
    "ClientAuthMethod",
    "ClientRegistration",
    "ClientRegistryConfig",
    "DpopConfig",
    "GatewayConfig",
    "HeaderCertificateSource",
    "IdentityHeaders",
    "IntrospectionProvider",
    "JwtProvider",
    "LimitsConfig",
    "ListenConfig",
    "LoggingConfig",
    "MetadataConfig",
    "PathMatch",
    "Provider",
    "Route",
    "SenderConstraint",
    "TlsClientAuthMethod",
    "TrustedProxies",
    "UpstreamConfig",
    "UpstreamTls",
]

#: Signature algorithms a provider may allow. Never HMAC, never ``none`` (RFC 8725, RFC 9068).
ASYMMETRIC_ALGORITHMS: tuple[str, ...] = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)

Binding = Literal["required", "optional", "off"]
#: What a token on a route is bound to: the TLS client certificate (RFC 8705), a DPoP
#: key (RFC 9449), or either, as the token's ``cnf`` says.
SenderConstraint = Literal["mtls", "dpop", "mtls_or_dpop"]
ClientAuthMethod = Literal["client_secret_basic", "client_secret_post", "tls_client_auth"]
CertHeaderFormat = Literal["rfc9440", "xfcc", "pem"]
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class TrustedProxies:
    """Who may state the client certificate in a header: every configured rule must hold.

    ``cidrs``: the connection's source address; ``subjects`` (RFC 4514, exact DN) and
    ``sans`` (``dns:``, ``uri:``, ``ip:``, ``email:``): the front proxy's own client
    certificate on a mutual-TLS connection, which must also chain to ``ca_file`` (a name
    counts only when a CA the operator chose for proxies vouches for it). Empty tuples are
    rules not configured.
    """

    cidrs: tuple[IpNetwork, ...]
    subjects: tuple[str, ...]
    sans: tuple[str, ...]
    ca_file: Path | None = None
    ca_certs: tuple[bytes, ...] = field(default=(), repr=False)   # DER, read from ca_file


@dataclass(frozen=True)
class HeaderCertificateSource:
    """The client certificate comes from a trusted front proxy's header, not our handshake."""

    format: CertHeaderFormat
    header: str
    chain_header: str | None            # RFC 9440 Client-Cert-Chain (checked, not used)
    trusted: TrustedProxies
TlsClientAuthMethod = Literal["tls_client_auth", "self_signed_tls_client_auth"]


@dataclass(frozen=True)
class ListenConfig:
    host: str
    port: int
    cert_file: Path | None               # None only when tls is false
    key_file: Path | None
    client_ca_file: Path | None          # None with client_ca "any", or when tls is false
    client_cert: Literal["required", "optional"]
    min_tls_version: Literal["1.2", "1.3"]
    max_tls_version: Literal["1.2", "1.3"]
    tls: bool = True
    #: None: the certificate of our own TLS handshake (the default).
    client_certificate: HeaderCertificateSource | None = None
    # "pki": client certificates must chain to client_ca_file.
    # "any": any issuer, self-signed too (pyOpenSSL only, mtls_gateway.tls_any); binding only.
    client_ca: Literal["pki", "any"] = "pki"
    #: Who terminates TLS: "openssl" (pyOpenSSL on the OpenSSL inside the cryptography wheel,
    #: mtls_gateway.tls_any) or "python" (CPython's ssl on the system's OpenSSL; pki only).
    tls_stack: Literal["openssl", "python"] = "openssl"
    client_cert_validity: Literal["enforce", "ignore"] = "enforce"   # "any" only
    #: "pki" only: DER of the registered self_signed_tls_client_auth certificates (inline
    #: jwks) the handshake accepts as themselves; none of them can issue (anchors.py).
    pinned_client_certs: tuple[bytes, ...] = field(default=(), repr=False)


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
    # The gateway's own pool (introspection.py): waiting here is never an endpoint failure.
    max_connections: int = 100          # calls in flight at once
    max_waiting: int = 1000             # calls queued for a connection; beyond: shed at once
    queue_timeout: float = 5.0          # longest wait for a connection; then shed (503)


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
class UpstreamTls:
    """How the gateway meets an ``https://`` upstream (docs/upstream-tls.md).

    ``ca_file``: the CAs its certificate must chain to (None: the system trust store);
    ``client_cert_file``/``client_key_file``: the gateway's certificate for mutual TLS to
    the upstream (None: none sent); ``server_name``: SNI and the name its certificate must
    carry (None: the URL's host).
    """

    ca_file: Path | None = None
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    server_name: str | None = None

    def files(self) -> tuple[Path, ...]:
        return tuple(f for f in (self.ca_file, self.client_cert_file, self.client_key_file)
                     if f is not None)


@dataclass(frozen=True)
class UpstreamConfig:
    url: str
    connect_timeout: float
    read_timeout: float
    max_connections: int
    pass_authorization: bool
    identity_headers: IdentityHeaders
    #: More inbound header names (lower case) never forwarded, besides the built-in list.
    strip_headers: tuple[str, ...] = ()
    tls: UpstreamTls = field(default_factory=UpstreamTls)


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
    sender_constraint: SenderConstraint = "mtls"   # see DpopConfig and docs/dpop.md
    dpop_nonce: bool = False                       # RFC 9449 s9: proofs carry our nonce


@dataclass(frozen=True)
class AuthMtlsClient:
    """A token endpoint: the client authenticates with its certificate (RFC 8705 section 2)."""

    registry: str                            # name in GatewayConfig.client_registries
    client_header: str | None                # names the authenticated client to the AS
    max_body_bytes: int                      # token request bodies are read whole, up to this


@dataclass(frozen=True)
class Route:
    name: str
    match: PathMatch
    methods: frozenset[str] | None           # None: any method
    auth: AuthNone | AuthPolicy | AuthMtlsClient
    upstream_url: str | None                 # None: the global upstream
    forward_client_cert: bool = False        # send the caller's certificate as RFC 9440 Client-Cert
    upstream_tls: UpstreamTls | None = None  # with upstream_url: its TLS (None: upstream.tls)
    resource: str | None = None              # own RFC 9728 resource (None: metadata.resource)


@dataclass(frozen=True)
class LoggingConfig:
    level: str


@dataclass(frozen=True)
class LimitsConfig:
    """Bounds on what one client may cost the gateway (see :mod:`mtls_gateway.connection`)."""

    max_body_size: int = 10 * 1024 * 1024     # bytes; 413 beyond, chunked bodies too
    max_header_size: int = 16 * 1024          # bytes per header line and request line
    max_headers: int = 100                    # header lines per request
    header_timeout: float = 10.0              # a request head must arrive within this
    body_timeout: float = 30.0                # longest wait for the next request body bytes
    idle_timeout: float = 60.0                # keep-alive connection idle time
    max_requests_per_connection: int = 1000   # then Connection: close
    max_connections: int = 10000              # concurrent client connections


@dataclass(frozen=True)
class ClientRegistration:
    """One OAuth client registered for mutual-TLS client authentication (RFC 8705 section 2).

    ``tls_client_auth`` sets exactly one of ``subject_dn`` / ``san_*`` (section 2.1.2);
    ``self_signed_tls_client_auth`` exactly one of ``jwks`` / ``jwks_uri`` (section 2.2.2).
    Values are kept as registered; :mod:`mtls_gateway.client_registry` parses them once.
    """

    client_id: str
    method: TlsClientAuthMethod
    subject_dn: str | None = None
    san_dns: str | None = None
    san_uri: str | None = None
    san_ip: str | None = None
    san_email: str | None = None
    jwks: dict[str, Any] | None = None
    jwks_uri: str | None = None


@dataclass(frozen=True)
class ClientRegistryConfig:
    """A named set of client registrations (inline or from a YAML file)."""

    name: str
    clients: tuple[ClientRegistration, ...]
    file: Path | None                  # watched for reloads when set
    ca_file: Path | None               # tls_client_auth chains must also reach this bundle
    jwks_ca_file: Path | None          # CA bundle for jwks_uri servers (None: system store)
    jwks_refresh_interval: float
    jwks_max_age: float                # older fetched key sets are not used (fail closed)
    jwks_timeout: float
    ca_certs: tuple[bytes, ...] = field(default=(), repr=False)   # DER, read from ca_file


@dataclass(frozen=True)
class AsMetadataRewrite:
    """Authorization-server metadata documents rewritten on their way through (RFC 8705 s5)."""

    paths: tuple[str, ...]
    mtls_endpoint_aliases: dict[str, str]


@dataclass(frozen=True)
class MetadataConfig:
    """RFC 9728 protected resource metadata served by the gateway."""

    resource: str                      # the resource identifier (absolute https URL)
    authorization_servers: tuple[str, ...]
    scopes_supported: tuple[str, ...]
    resource_name: str | None
    resource_documentation: str | None
    as_metadata: AsMetadataRewrite | None


# --- DPoP (RFC 9449, issue 19) -------------------------------------------------------------

@dataclass(frozen=True)
class DpopConfig:
    """The top-level ``dpop:`` section: how DPoP proofs are checked (mtls_gateway.dpop).

    ``replay_store`` is ``"memory"`` (one replica) or a ``redis://`` / ``rediss://`` URL
    shared by every replica. ``external_origins`` are the scheme://host[:port] clients
    address (behind a load balancer); empty: the listener's scheme and the Host header.
    Secrets come from files or the environment, never from the YAML itself.
    """

    algorithms: tuple[str, ...] = ASYMMETRIC_ALGORITHMS
    iat_max_age: float = 60.0                # a proof's iat may be this old ...
    iat_max_skew: float = 5.0                # ... or this far in the future
    replay_store: str = "memory"
    replay_cache_size: int = 100_000         # memory store: entries; full -> 503
    replay_store_timeout: float = 0.5        # redis store: connect and command timeout
    replay_store_password: str | None = field(default=None, repr=False)
    nonce_secret: bytes | None = field(default=None, repr=False)
    nonce_lifetime: float = 300.0            # a nonce is accepted for 1 to 2 lifetimes
    external_origins: tuple[str, ...] = ()
    max_proof_size: int = 8192               # bytes of the DPoP header value


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
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    client_registries: dict[str, ClientRegistryConfig] = field(default_factory=dict)
    metadata: MetadataConfig | None = None
    fast_lane: bool = True                 # plain requests skip aiohttp (fastlane.py)
    dpop: DpopConfig = field(default_factory=DpopConfig)

    def watched_files(self) -> tuple[Path, ...]:
        """Files whose change on disk triggers a reload (the config file and TLS material)."""
        files = [self.source] if self.source else []
        files += [f for f in (self.listen.cert_file, self.listen.key_file,
                              self.listen.client_ca_file) if f is not None]
        files += [r.file for r in self.client_registries.values() if r.file is not None]
        files += [r.ca_file for r in self.client_registries.values() if r.ca_file is not None]
        source = self.listen.client_certificate
        if source is not None and source.trusted.ca_file is not None:
            files.append(source.trusted.ca_file)
        files += [f for tls in (self.upstream.tls, *(r.upstream_tls for r in self.routes))
                  if tls is not None for f in tls.files() if f not in files]
        return tuple(files)
