"""End to end through real mutual TLS: the request path of gateway.py and pipeline.py.

Every refusal test asserts both the answer and that the upstream saw nothing. Every test
runs twice, with the fast lane on and off (the ``fast_lane`` fixture below): one decision
core, two transports, the same answers.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import logging
import ssl
import time
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gwtest import AUDIENCE, ISSUER, Issuer, Pki, RunningGateway, Upstream, base_config


@pytest.fixture(params=[True, False], ids=["lane", "aiohttp"])
def fast_lane(request: pytest.FixtureRequest) -> bool:
    value: bool = request.param
    return value


def _challenge(reply: Any) -> str:
    return str(reply.headers.get("WWW-Authenticate", ""))


async def test_bound_token_with_its_certificate_is_forwarded(
        gateway: RunningGateway, issuer: Issuer, upstream: Upstream, pki: Pki,
        fast_lane: bool) -> None:
    token = issuer.mint(pki.clients["a"].thumbprint)
    reply = await gateway.request("/accounts/1?x=1", cert="a", token=token)
    assert reply.status == 200, reply.body
    lane = gateway.server.gateway.lane
    assert (lane is not None and lane.pool.opened == 1) is fast_lane   # the path under test
    assert reply.headers["X-Upstream"] == "yes"
    assert [s.path_qs for s in upstream.seen] == ["/accounts/1?x=1"]
    seen = upstream.seen[0].headers
    assert seen["x-client-cert-thumbprint"] == [pki.clients["a"].thumbprint]
    assert seen["x-auth-subject"] == ["user-1"]
    assert seen["x-auth-client-id"] == ["client-a"]
    assert seen["x-auth-scope"] == ["accounts:read"]
    assert seen["authorization"] == [f"Bearer {token}"]
    assert seen["x-forwarded-proto"] == ["https"]
    assert seen["x-forwarded-for"] == ["127.0.0.1"]


@pytest.mark.parametrize(("cert", "reason"), [
    ("a2", "binding_mismatch"),        # same CA, same subject, different certificate
    ("b", "binding_mismatch"),
    (None, "no_client_cert"),
])
async def test_bound_token_with_another_or_no_certificate_is_refused(
        gateway: RunningGateway, issuer: Issuer, upstream: Upstream, pki: Pki,
        cert: str | None, reason: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mtls_gateway.access")
    token = issuer.mint(pki.clients["a"].thumbprint)
    reply = await gateway.request("/accounts/1", cert=cert, token=token)
    assert reply.status == 401
    assert 'error="invalid_token"' in _challenge(reply)
    assert reply.json()["reason"] == reason
    assert token not in reply.body.decode()
    assert upstream.seen == []
    decision = caplog.records[-1].decision  # type: ignore[attr-defined]
    assert decision["reason"] == reason and decision["decision"] == "deny"
    assert decision["token_hash"] and token not in caplog.text


async def test_client_from_unknown_ca_cannot_connect(gateway: RunningGateway,
                                                     upstream: Upstream) -> None:
    with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
        await gateway.request("/public/x", cert="stranger")
    assert upstream.seen == []


@pytest.mark.parametrize(("binding", "cnf", "cert", "status", "reason"), [
    ("required", None, "a", 401, "binding_missing"),
    ("optional", None, "a", 200, "allowed"),
    ("optional", None, None, 200, "allowed"),
    ("optional", "a", "a", 200, "allowed"),
    ("optional", "a", "b", 401, "binding_mismatch"),
    ("optional", "a", None, 401, "no_client_cert"),
    ("off", None, None, 200, "allowed"),
    ("off", "a", "b", 200, "allowed"),
    ("required", "a", "a", 200, "allowed"),
])
async def test_binding_modes(make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream,
                             binding: str, cnf: str | None, cert: str | None, status: int,
                             reason: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mtls_gateway.access")
    config = base_config(pki, issuer, upstream)
    config["routes"][1]["auth"]["binding"] = binding
    gw = await make_gateway(config)
    token = issuer.mint(pki.clients[cnf].thumbprint if cnf else None)
    reply = await gw.request("/x", cert=cert, token=token)
    assert reply.status == status, reply.body
    assert len(upstream.seen) == (1 if status == 200 else 0)
    assert caplog.records[-1].decision["reason"] == reason  # type: ignore[attr-defined]


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _forged(issuer: Issuer, pki: Pki, kind: str) -> str:
    claims = issuer.claims(pki.clients["a"].thumbprint)
    if kind == "alg_none":
        return f"{_b64({'alg': 'none', 'typ': 'at+jwt'})}.{_b64(claims)}."
    if kind == "hs256_public_key":
        # the classic confusion attack: HMAC keyed with the issuer's public key
        pem = issuer.key("rsa-1").private.public_key().public_bytes(
            Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        header = _b64({"alg": "HS256", "kid": "rsa-1", "typ": "at+jwt"})
        signing_input = f"{header}.{_b64(claims)}".encode()
        sig = hmac.new(pem, signing_input, hashlib.sha256).digest()
        return signing_input.decode() + "." + base64.urlsafe_b64encode(sig).rstrip(b"=").decode()
    if kind == "tampered":
        token = issuer.mint(pki.clients["a"].thumbprint)
        head, _, sig = token.split(".")
        return f"{head}.{_b64({**claims, 'scope': 'accounts:read admin'})}.{sig}"
    raise AssertionError(kind)


@pytest.mark.parametrize(("case", "reason"), [
    ("expired", "token_expired"),
    ("not_yet_valid", "token_not_yet_valid"),
    ("wrong_iss", "wrong_issuer"),
    ("wrong_aud", "wrong_audience"),
    ("no_exp", "missing_claim"),
    ("alg_none", "alg_not_allowed"),
    ("hs256_public_key", "alg_not_allowed"),
    ("tampered", "bad_signature"),
    ("unknown_kid", "unknown_key"),
    ("crit", "crit_unsupported"),
    ("jku_ignored", "unknown_key"),
    ("garbage", "token_malformed"),
    ("es256_ok", "allowed"),
])
async def test_token_validation(gateway: RunningGateway, issuer: Issuer, upstream: Upstream,
                                pki: Pki, case: str, reason: str,
                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mtls_gateway.access")
    tp = pki.clients["a"].thumbprint
    now = int(time.time())
    token = {
        "expired": lambda: issuer.mint(tp, exp=now - 120, iat=now - 600),
        "not_yet_valid": lambda: issuer.mint(tp, nbf=now + 600),
        "wrong_iss": lambda: issuer.mint(tp, iss=ISSUER + "/other"),
        "wrong_aud": lambda: issuer.mint(tp, aud="https://elsewhere.test"),
        "no_exp": lambda: issuer.mint(tp, exp=None),
        "alg_none": lambda: _forged(issuer, pki, "alg_none"),
        "hs256_public_key": lambda: _forged(issuer, pki, "hs256_public_key"),
        "tampered": lambda: _forged(issuer, pki, "tampered"),
        "unknown_kid": lambda: issuer.mint(tp, headers={"kid": "nope"}),
        "crit": lambda: issuer.mint(tp, headers={"crit": ["exp"], "exp": 1}),
        # a jku pointing elsewhere never selects a key: the kid is still unknown
        "jku_ignored": lambda: issuer.mint(tp, headers={"kid": "evil",
                                                        "jku": "https://evil.test/jwks"}),
        "garbage": lambda: "not-a-jwt",
        "es256_ok": lambda: issuer.mint(tp, kid="ec-1"),
    }[case]()
    reply = await gateway.request("/x", cert="a", token=token)
    allowed = reason == "allowed"
    assert reply.status == (200 if allowed else 401), reply.body
    assert caplog.records[-1].decision["reason"] == reason  # type: ignore[attr-defined]
    if not allowed:
        assert 'error="invalid_token"' in _challenge(reply)
        assert upstream.seen == []


async def test_no_token_gets_a_challenge_without_error(gateway: RunningGateway,
                                                       upstream: Upstream) -> None:
    reply = await gateway.request("/x", cert="a")
    assert reply.status == 401
    assert _challenge(reply) == 'Bearer realm="mtls-gateway"'
    assert upstream.seen == []


@pytest.mark.parametrize(("path", "headers", "reason"), [
    ("/x?access_token=abc", {}, "token_in_query"),
    ("/x?access_token=abc", {"Authorization": "Bearer abc"}, "multiple_tokens"),
    ("/x", [("Authorization", "Bearer abc"), ("Authorization", "Bearer def")],
     "multiple_tokens"),
    ("/x", {"Authorization": "Bearer a b"}, "malformed_authorization"),
])
async def test_malformed_requests_get_invalid_request(gateway: RunningGateway,
                                                      upstream: Upstream, path: str,
                                                      headers: Any, reason: str) -> None:
    reply = await gateway.request(path, cert="a", headers=headers)
    assert reply.status == 400
    assert 'error="invalid_request"' in _challenge(reply)
    assert reply.json()["reason"] == reason
    assert "abc" not in reply.body.decode()
    assert upstream.seen == []


async def test_missing_scope_is_403(make_gateway: Any, pki: Pki, issuer: Issuer,
                                    upstream: Upstream) -> None:
    config = base_config(pki, issuer, upstream)
    config["routes"][1]["auth"]["scopes"] = ["accounts:read", "payments:write"]
    gw = await make_gateway(config)
    reply = await gw.request("/x", token=issuer.mint(pki.clients["a"].thumbprint))
    assert reply.status == 403
    assert 'error="insufficient_scope"' in _challenge(reply)
    assert 'scope="accounts:read payments:write"' in _challenge(reply)
    assert upstream.seen == []
    ok = await gw.request("/x", token=issuer.mint(pki.clients["a"].thumbprint,
                                                  scope="payments:write accounts:read"))
    assert ok.status == 200


async def test_routes_first_match_methods_and_no_route(make_gateway: Any, pki: Pki,
                                                       issuer: Issuer,
                                                       upstream: Upstream) -> None:
    config = base_config(pki, issuer, upstream)
    config["routes"] = [
        {"name": "health", "path": "/health", "methods": ["GET"], "auth": "none"},
        {"name": "api", "path_prefix": "/api", "auth": {"provider": "corp"}},
    ]
    gw = await make_gateway(config)
    assert (await gw.request("/health", cert=None)).status == 200
    assert (await gw.request("/health", cert=None, method="POST")).status == 404
    assert (await gw.request("/healthz", cert=None)).status == 404
    assert (await gw.request("/apiary", cert="a")).status == 404  # prefixes are segment-wise
    assert (await gw.request("/api/x", cert="a")).status == 401
    for bad in ("/api/../health", "/api/%2e%2e/health", "/api/./x", "/api%2fx", "/api\\x"):
        assert await gw.raw(f"GET {bad} HTTP/1.1") == 400, bad
    assert [s.path_qs for s in upstream.seen] == ["/health"]


async def test_forged_identity_and_hop_by_hop_headers_are_stripped(
        gateway: RunningGateway, issuer: Issuer, upstream: Upstream, pki: Pki) -> None:
    forged = [
        ("X-Auth-Subject", "admin"), ("X-Client-Cert-Thumbprint", "forged"),
        ("X-Forwarded-For", "10.0.0.1"), ("Forwarded", "for=10.0.0.1"),
        ("X-Forwarded-Client-Cert", "Hash=abc"), ("Client-Cert", ":AAAA:"),
        ("Connection", "X-Custom-Hop"), ("X-Custom-Hop", "1"), ("TE", "trailers"),
        ("Proxy-Authorization", "Basic Zm9vOmJhcg=="), ("Upgrade", "websocket"),
        ("X-Kept", "yes"),
    ]
    token = issuer.mint(pki.clients["a"].thumbprint)
    reply = await gateway.request("/x", token=token, headers=forged)
    assert reply.status == 200
    seen = upstream.seen[0].headers
    assert seen["x-auth-subject"] == ["user-1"]
    assert seen["x-client-cert-thumbprint"] == [pki.clients["a"].thumbprint]
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    for name in ("forwarded", "x-forwarded-client-cert", "client-cert", "x-custom-hop", "te",
                 "proxy-authorization", "upgrade"):
        assert name not in seen, name
    assert seen["x-kept"] == ["yes"]


async def test_public_route_strips_forged_identity_too(gateway: RunningGateway,
                                                       upstream: Upstream) -> None:
    reply = await gateway.request("/public/x", cert=None,
                                  headers={"X-Auth-Subject": "admin"})
    assert reply.status == 200
    assert "x-auth-subject" not in upstream.seen[0].headers


async def test_response_hop_by_hop_headers_removed_and_large_download_streams(
        gateway: RunningGateway, issuer: Issuer, pki: Pki) -> None:
    size = 8 * 1024 * 1024 + 123
    reply = await gateway.request(f"/big?n={size}", token=issuer.mint(pki.clients["a"].thumbprint))
    assert reply.status == 200
    assert len(reply.body) == size
    assert "X-Secret-Hop" not in reply.headers and "Keep-Alive" not in reply.headers


async def test_large_upload_streams_through(make_gateway: Any, issuer: Issuer, pki: Pki,
                                            upstream: Upstream) -> None:
    config = base_config(pki, issuer, upstream)
    config["limits"] = {"max_body_size": 32 * 1024 * 1024}
    gateway = await make_gateway(config)
    chunk = bytes(range(256)) * 256  # 64 KiB
    count = 256                      # 16 MiB in all, sent chunked

    async def body() -> Any:
        for _ in range(count):
            yield chunk

    reply = await gateway.request("/upload", method="POST", data=body(),
                                  token=issuer.mint(pki.clients["a"].thumbprint))
    assert reply.status == 200
    expected = hashlib.sha256(chunk * count).hexdigest()
    assert upstream.seen[0].body_len == len(chunk) * count
    assert upstream.seen[0].body_sha256 == expected


async def test_authorization_can_be_withheld_from_upstream(make_gateway: Any, pki: Pki,
                                                           issuer: Issuer,
                                                           upstream: Upstream) -> None:
    config = base_config(pki, issuer, upstream)
    config["upstream"]["pass_authorization"] = False
    config["upstream"]["identity_headers"] = {"subject": "X-User", "scope": "",
                                              "provider": "X-Auth-Provider"}
    gw = await make_gateway(config)
    reply = await gw.request("/x", token=issuer.mint(pki.clients["a"].thumbprint))
    assert reply.status == 200
    seen = upstream.seen[0].headers
    assert "authorization" not in seen and "x-auth-scope" not in seen
    assert seen["x-user"] == ["user-1"] and seen["x-auth-provider"] == ["corp"]


async def test_upstream_down_is_502(make_gateway: Any, pki: Pki, issuer: Issuer,
                                    upstream: Upstream) -> None:
    config = base_config(pki, issuer, upstream)
    await upstream.stop()
    gw = await make_gateway(config)
    reply = await gw.request("/x", token=issuer.mint(pki.clients["a"].thumbprint))
    assert reply.status == 502
    assert reply.json()["reason"] == "upstream_unavailable"


async def test_slow_upstream_is_504(make_gateway: Any, pki: Pki, issuer: Issuer,
                                   upstream: Upstream) -> None:
    config = base_config(pki, issuer, upstream)
    config["upstream"]["read_timeout"] = "300ms"
    gw = await make_gateway(config)
    started = time.monotonic()
    reply = await gw.request("/slow?s=3", token=issuer.mint(pki.clients["a"].thumbprint))
    assert reply.status == 504
    assert reply.json()["reason"] == "upstream_timeout"
    assert time.monotonic() - started < 2.5


async def test_per_route_upstream_override(make_gateway: Any, pki: Pki, issuer: Issuer,
                                           upstream: Upstream) -> None:
    from gwtest import Upstream as Up

    other = Up()
    await other.start()
    try:
        config = base_config(pki, issuer, upstream)
        config["routes"][0]["upstream"] = other.url
        gw = await make_gateway(config)
        assert (await gw.request("/public/y", cert=None)).status == 200
        assert [s.path_qs for s in other.seen] == ["/public/y"] and upstream.seen == []
    finally:
        await other.stop()


async def test_decision_log_never_contains_the_token(gateway: RunningGateway, issuer: Issuer,
                                                     pki: Pki,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    token = issuer.mint(pki.clients["a"].thumbprint)
    for cert in ("a", "b"):
        await gateway.request("/x", cert=cert, token=token)
    assert token not in caplog.text
    sig = token.rsplit(".", 1)[1]
    assert sig not in caplog.text
    decisions = [r.decision for r in caplog.records if hasattr(r, "decision")]
    assert [d["reason"] for d in decisions] == ["allowed", "binding_mismatch"]
    assert decisions[0]["token_hash"] == decisions[1]["token_hash"]
    assert decisions[0]["client_thumbprint"] == pki.clients["a"].thumbprint
    assert decisions[0]["route"] == "api" and decisions[0]["provider"] == "corp"


async def test_typ_at_jwt_can_be_required(make_gateway: Any, pki: Pki, issuer: Issuer,
                                          upstream: Upstream) -> None:
    config = base_config(pki, issuer, upstream)
    config["providers"]["corp"]["require_typ_at_jwt"] = True
    gw = await make_gateway(config)
    tp = pki.clients["a"].thumbprint
    assert (await gw.request("/x", token=issuer.mint(tp))).status == 200
    plain = issuer.mint(tp, headers={"typ": "JWT"})
    reply = await gw.request("/x", token=plain)
    assert reply.status == 401 and reply.json()["reason"] == "wrong_typ"


async def test_inline_jwks_provider(make_gateway: Any, pki: Pki, issuer: Issuer,
                                    upstream: Upstream) -> None:
    config = copy.deepcopy(base_config(pki, issuer, upstream))
    provider = config["providers"]["corp"]
    del provider["jwks_uri"], provider["jwks_ca_file"]
    provider["jwks"] = {"keys": [k.public_jwk() for k in issuer.keys]}
    await issuer.stop()  # nothing to fetch
    gw = await make_gateway(config)
    assert (await gw.request("/x", token=issuer.mint(pki.clients["a"].thumbprint))).status == 200


def test_jwt_library_refuses_none_on_its_own() -> None:
    """Belt and braces: pyjwt itself must never verify alg=none when given a key."""
    with pytest.raises(jwt.InvalidAlgorithmError):
        jwt.decode(f"{_b64({'alg': 'none'})}.{_b64({'iss': ISSUER, 'aud': AUDIENCE})}.",
                   key="k", algorithms=["RS256"])


async def test_head_request_passes_length_without_body(gateway: RunningGateway, issuer: Issuer,
                                                       pki: Pki, upstream: Upstream) -> None:
    token = issuer.mint(pki.clients["a"].thumbprint)
    get = await gateway.request("/x", token=token)
    head = await gateway.request("/x", token=token, method="HEAD")
    assert head.status == 200 and head.body == b""
    assert head.headers["Content-Length"] == get.headers["Content-Length"]
    assert [s.method for s in upstream.seen] == ["GET", "HEAD"]
