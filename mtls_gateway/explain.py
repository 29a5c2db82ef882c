"""``mtls-gateway explain``: why would the gateway answer this request the way it does?

Built on the decision core, not beside it: the real :class:`~mtls_gateway.gateway.Gateway`
is made from the configuration (its verifiers started, so keys and introspection are
fetched as the gateway fetches them), and :meth:`~mtls_gateway.pipeline.Pipeline.decide`
runs on a :class:`~mtls_gateway.pipeline.RequestView` made from the arguments, with the
client certificate described exactly as the TLS listener describes it
(:func:`~mtls_gateway.tls.describe_certificate`). So the verdict is the running gateway's by
construction; the view's ``trace`` (:mod:`mtls_gateway.trace`) collects every check as the
pipeline and the verifiers make it. Nothing is sent to the upstream, and a DPoP proof is
checked against a replay cache of explain's own (a shared store is not written: the proof
stays usable).

``offline``: no network at all. A JWT provider's inline keys are used; a provider whose keys
come from ``jwks_uri``, or that introspects, cannot be asked, and the answer says which
checks were not made (``undetermined``) instead of guessing.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from yarl import URL

from .config import AuthMtlsClient, GatewayConfig, JwtProvider, Provider
from .dpop import MemoryReplayStore
from .errors import DependencyDown, Refusal
from .gateway import Gateway, build_verifier
from .jwks import JwksSource, KeySet
from .jwt_verifier import JwtVerifier
from .pipeline import ConnectionMemo, Refuse, RequestView
from .providers import Verifier
from .routing import Router
from .tls import PeerCertificate, describe_certificate
from .tokeninfo import TokenInfo
from .trace import Check

__all__ = ["Explanation", "NotChecked", "explain", "peer_from_pem", "render_text"]

EXIT_ALLOWED, EXIT_REFUSED, EXIT_USAGE, EXIT_UNDETERMINED = 0, 1, 2, 3


class NotChecked(DependencyDown):
    """``--offline``: a check needs the network (explain's own, never a gateway answer)."""


@dataclass
class Explanation:
    method: str
    target: str
    route: str | None
    provider: str | None
    checks: list[Check]
    status: int | None                   # None: undetermined (offline)
    reason: str
    www_authenticate: list[str] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)

    @property
    def allowed(self) -> bool:
        return self.status is not None and self.status < 400

    @property
    def exit_code(self) -> int:
        if self.status is None:
            return EXIT_UNDETERMINED
        return EXIT_ALLOWED if self.allowed else EXIT_REFUSED

    def as_json(self) -> str:
        return json.dumps({
            "method": self.method, "target": self.target, "route": self.route,
            "provider": self.provider,
            "checks": [{"step": c.step, "verdict": c.verdict, "values": c.values}
                       for c in self.checks],
            "status": self.status, "reason": self.reason, "allowed": self.allowed,
            "www_authenticate": self.www_authenticate,
            "headers": [list(h) for h in self.headers], "not_checked": self.not_checked,
        }, indent=2, default=str)


def peer_from_pem(pem: bytes) -> PeerCertificate:
    """The first certificate of a PEM file, as the TLS listener describes a client's."""
    cert = x509.load_pem_x509_certificate(pem)
    return describe_certificate(cert.public_bytes(serialization.Encoding.DER))


class _OfflineKeys(JwksSource):
    """The inline keys only; a key that would be fetched is a check not made."""

    async def start(self) -> None:
        return None

    async def keys_for(self, kid: str | None, alg: str) -> tuple[KeySet, tuple[jwt.PyJWK, ...]]:
        keys = self.current
        if keys is not None and (found := keys.lookup(kid, alg)):
            return keys, found
        if self.provider.jwks_uri is None:
            return await super().keys_for(kid, alg)      # inline only: its own answer
        raise NotChecked("not_checked_offline",
                         f"signature, exp, nbf, iss, aud: the keys of provider "
                         f"{self.provider.name} come from {self.provider.jwks_uri}")


class _OfflineIntrospection:
    """An introspection provider under ``--offline``: it claims tokens as the real one does
    and can verify none of them."""

    def __init__(self, name: str, endpoint: str) -> None:
        self.name, self._endpoint = name, endpoint

    def claims_token(self, token: str) -> bool:
        return True

    def cached(self, token: str, digest: bytes) -> TokenInfo | None:
        return None

    def cached_entry(self, digest: bytes) -> object | None:
        return None

    def reuse(self, entry: object, digest: bytes) -> TokenInfo | None:
        return None

    async def verify(self, token: str, digest: bytes) -> TokenInfo:
        raise NotChecked("not_checked_offline",
                         f"introspection at {self._endpoint} (provider {self.name})")

    @property
    def ready(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def _offline_verifier(provider: Provider) -> Verifier:
    if isinstance(provider, JwtProvider):
        return JwtVerifier(provider, keys=_OfflineKeys(provider))
    return _OfflineIntrospection(provider.name, provider.endpoint)


def _view(config: GatewayConfig, method: str, target: str, *, token: str | None,
          scheme: str | None, dpop_proof: str | None, host: str | None,
          peer: PeerCertificate | None, trace: list[Check]) -> RequestView:
    """The request as the gateway would see it: ``target`` may be a whole URL (its
    authority is then the Host)."""
    split = urlsplit(target)
    if split.scheme and split.netloc:
        host = host or split.netloc
        target = split.path or "/"
        if split.query:
            target += "?" + split.query
    authorization: tuple[str, ...] = ()
    if token is not None:
        authorization = (f"{scheme or ('DPoP' if dpop_proof else 'Bearer')} {token}",)
    query = target.partition("?")[2]
    return RequestView(
        method=method.upper(), target=target, path=URL(target).path,
        host=host or f"{config.listen.host}:{config.listen.port}",
        authorization=authorization, dpop=(dpop_proof,) if dpop_proof else (),
        token_in_query=any(k == "access_token" for k, _ in parse_qsl(query)),
        scheme="https" if config.listen.tls else "http", remote="",
        memo=ConnectionMemo(), peer=lambda: peer, trace=trace)


async def explain(config: GatewayConfig, method: str, target: str, *,
                  token: str | None = None, scheme: str | None = None,
                  dpop_proof: str | None = None, host: str | None = None,
                  peer: PeerCertificate | None = None, offline: bool = False) -> Explanation:
    """Decide ``method target`` as the gateway for ``config`` would (module docstring).

    Raises :class:`ValueError` for a request explain cannot make (a token endpoint)."""
    peek = _view(config, method, target, token=token, scheme=scheme, dpop_proof=dpop_proof,
                 host=host, peer=peer, trace=[])
    with contextlib.suppress(Refusal):      # (no route: decide() says so, traced)
        matched = Router(config.routes).match(peek.method, peek.path, peek.target)
        if isinstance(matched.auth, AuthMtlsClient):
            raise ValueError(f"route {matched.name} is a token endpoint (auth: mtls_client): "
                             "explain covers resource routes")
    verifiers: Mapping[str, Verifier]
    if offline:
        verifiers = {n: _offline_verifier(p) for n, p in config.providers.items()}
    else:
        verifiers = {n: build_verifier(p) for n, p in config.providers.items()}
    gateway = Gateway(config, verifiers=verifiers)
    pipeline = gateway.pipeline
    if pipeline.dpop is not None:       # never consume the proof in a shared replay store
        await pipeline.dpop.store.close()
        pipeline.dpop.store = MemoryReplayStore(1024, 3600.0)
    trace: list[Check] = []
    started: list[Verifier] = []
    try:
        for verifier in verifiers.values():
            await verifier.start()
            started.append(verifier)
        view = _view(config, method, target, token=token, scheme=scheme,
                     dpop_proof=dpop_proof, host=host, peer=peer, trace=trace)
        decision = await pipeline.decide(view)
    finally:
        for verifier in started:
            await verifier.close()
        await pipeline.close()
    assert decision is not None           # (no ``serves`` filter)
    route = decision.route
    out = Explanation(method=view.method, target=view.target,
                      route=route.name if route is not None else None,
                      provider=str(decision.fields.get("provider") or "") or None,
                      checks=trace, status=None, reason="")
    if isinstance(decision, Refuse):
        refusal = decision.refusal
        out.reason = refusal.reason
        if isinstance(refusal, NotChecked):
            out.reason = "undetermined"
            out.not_checked.append(refusal.description)
            trace[-1:] = [Check("offline", "not checked", {"needs": refusal.description})]
            return out
        rendered = pipeline.render(refusal, route)
        out.status = rendered.status
        out.www_authenticate = [v for k, v in rendered.headers if k == "WWW-Authenticate"]
        out.headers = [(k, v) for k, v in rendered.headers
                       if k not in ("WWW-Authenticate", "Content-Type", "Cache-Control")]
    else:
        out.status, out.reason = 200, decision.reason
        trace.append(Check("forward", "pass", {"upstream": decision.upstream_url,
                                               "identity_headers": sorted(decision.identity)}))
    return out


def _value(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return "-" if value is None else str(value)


def render_text(e: Explanation) -> str:
    """The human-readable answer: one line per check, then what the client would get."""
    lines = [f"request   {e.method} {e.target}",
             f"route     {e.route or '(none)'}",
             f"provider  {e.provider or '-'}"]
    width = max((len(c.verdict) for c in e.checks), default=4)
    for c in e.checks:
        values = ", ".join(f"{k}={_value(v)}" for k, v in c.values.items())
        lines.append(f"  [{c.verdict:<{width}}] {c.step}{': ' + values if values else ''}")
    if e.status is None:
        lines.append("answer    undetermined offline: not checked: " + "; ".join(e.not_checked))
        return "\n".join(lines)
    lines.append(f"answer    {e.status} {e.reason}")
    for challenge in e.www_authenticate:
        lines.append(f"WWW-Authenticate: {challenge}")
    for name, value in e.headers:
        lines.append(f"{name}: {value}")
    lines.append("verdict   " + ("allowed (forwarded to the upstream)" if e.allowed
                                 else "refused (nothing forwarded)"))
    return "\n".join(lines)
