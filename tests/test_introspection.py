"""Opaque tokens through a real introspection server on loopback (HTTPS, call counter)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from introspection_server import CLIENT_ID, SECRET, AuthServer, introspection_config

from gwtest import Issuer, Pki, RunningGateway, Upstream
from mtls_gateway.config import IntrospectionProvider
from mtls_gateway.config_load import load_config_text
from mtls_gateway.errors import Refusal
from mtls_gateway.introspection import IntrospectionVerifier


@pytest.fixture(params=[True, False], ids=["lane", "aiohttp"])
def fast_lane(request: pytest.FixtureRequest) -> bool:
    """Every gateway here runs with the fast lane on and off (gwtest.fast_lane)."""
    value: bool = request.param
    return value


@pytest.fixture
async def opaque_gw(make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream,
                    auth_server: AuthServer, tmp_path: Path) -> RunningGateway:
    gw: RunningGateway = await make_gateway(
        introspection_config(pki, issuer, upstream, auth_server, tmp_path))
    return gw


def _verifier(gw: RunningGateway) -> IntrospectionVerifier:
    verifier = gw.server.gateway.verifiers["opaque"]
    assert isinstance(verifier, IntrospectionVerifier)
    return verifier


async def test_bound_opaque_token_and_binding_never_cached(
        opaque_gw: RunningGateway, auth_server: AuthServer, upstream: Upstream,
        pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mtls_gateway.access")
    token = auth_server.issue(pki.clients["a"].thumbprint)
    results = [(await opaque_gw.request("/x", cert=c, token=token)).status
               for c in ("a", "b", "a2", "a")]
    assert results == [200, 401, 401, 200]
    assert auth_server.calls == 1
    assert len(upstream.seen) == 2
    decisions = [r.decision for r in caplog.records if hasattr(r, "decision")]
    assert [d["reason"] for d in decisions] == ["allowed", "binding_mismatch",
                                                "binding_mismatch", "allowed"]
    assert {d["provider"] for d in decisions} == {"opaque"}


async def test_an_answer_arriving_in_pieces_is_read_whole(
        opaque_gw: RunningGateway, auth_server: AuthServer, upstream: Upstream,
        pki: Pki) -> None:
    auth_server.in_pieces = True
    token = auth_server.issue(pki.clients["a"].thumbprint)
    reply = await opaque_gw.request("/x", token=token)
    assert reply.status == 200, reply.body
    assert len(upstream.seen) == 1 and auth_server.calls == 1


async def test_inactive_token_is_401_and_cached_negatively(
        opaque_gw: RunningGateway, auth_server: AuthServer, upstream: Upstream) -> None:
    for _ in range(3):
        reply = await opaque_gw.request("/x", token="unknown-token")
        assert reply.status == 401 and reply.json()["reason"] == "token_inactive"
        assert 'error="invalid_token"' in reply.headers["WWW-Authenticate"]
    assert auth_server.calls == 1
    assert upstream.seen == []


@pytest.mark.parametrize(("body", "status", "expected"), [
    (b'{"active": "true"}', 200, 401),
    (b'{"scope": "x"}', 200, 401),
    (b"<html><body>Login</body></html>", 200, 401),
    (b'["active", true]', 200, 401),
    (b'{"active": true, "exp": "tomorrow"}', 200, 401),
    (b'{"active": true}', 500, 503),
    (b'{"active": true}', 302, 503),
])
async def test_misbehaving_server_is_never_a_pass_and_never_cached(
        opaque_gw: RunningGateway, auth_server: AuthServer, upstream: Upstream, pki: Pki,
        body: bytes, status: int, expected: int) -> None:
    """A non-RFC 7662 answer refuses that token (401 token_inactive); an error status is an
    outage (503). Neither is cached."""
    auth_server.body, auth_server.status = body, status
    token = auth_server.issue(pki.clients["a"].thumbprint)
    for _ in range(2):
        reply = await opaque_gw.request("/x", token=token)
        assert reply.status == expected
        if expected == 401:
            assert reply.json()["reason"] == "token_inactive"
    assert auth_server.calls == 2
    assert upstream.seen == []
    assert _verifier(opaque_gw).stats.failures == (0 if expected == 401 else 2)


async def test_bad_answers_for_every_token_are_an_outage(
        make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream,
        auth_server: AuthServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gw = await make_gateway(introspection_config(pki, issuer, upstream, auth_server, tmp_path,
                                                 failure_threshold=3, failure_cooldown="30s"))
    auth_server.body = b'{"active": "yes"}'
    seen = []
    for _ in range(5):
        reply = await gw.request("/x", token=auth_server.issue(pki.clients["a"].thumbprint))
        seen.append((reply.status, reply.json()["reason"]))
    assert seen == [(401, "token_inactive")] * 2 + [(503, "introspection_bad_response")] \
        + [(503, "introspection_unavailable")] * 2      # the breaker opened at the third
    assert auth_server.calls == 3
    assert "not RFC 7662" in caplog.text
    assert upstream.seen == []


@pytest.mark.parametrize("status", [401, 404, 405])
async def test_endpoint_refusing_every_call_is_misconfigured_and_opens_the_breaker(
        make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream,
        auth_server: AuthServer, tmp_path: Path, status: int) -> None:
    gw = await make_gateway(introspection_config(pki, issuer, upstream, auth_server, tmp_path,
                                                 failure_threshold=2, failure_cooldown="30s"))
    auth_server.body, auth_server.status = b'{"error": "nope"}', status
    reasons = []
    for _ in range(3):
        reply = await gw.request("/x", token=auth_server.issue(pki.clients["a"].thumbprint))
        reasons.append((reply.status, reply.json()["reason"]))
    assert reasons == [(503, "introspection_misconfigured")] * 2 \
        + [(503, "introspection_unavailable")]
    assert auth_server.calls == 2 and _verifier(gw).stats.short_circuited == 1


@pytest.mark.parametrize(("body", "status", "reason"), [
    (b'{"error": "unsupported_token_type"}', 401, "token_unknown"),
    (b'{"error": "invalid_request"}', 401, "token_malformed"),
    (b"", 401, "token_malformed"),
])
async def test_4xx_about_one_token_never_opens_the_breaker(
        make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream,
        auth_server: AuthServer, tmp_path: Path, body: bytes, status: int,
        reason: str) -> None:
    gw = await make_gateway(introspection_config(pki, issuer, upstream, auth_server, tmp_path,
                                                 failure_threshold=2))
    auth_server.body, auth_server.status = body, 400
    assert (await gw.request("/x", token="not-a-jwt")).json()["reason"] == reason
    for _ in range(4):
        reply = await gw.request("/x", token=auth_server.issue(pki.clients["a"].thumbprint))
        assert (reply.status, reply.json()["reason"]) == (status, reason)
    auth_server.body, auth_server.status = None, 200
    good = auth_server.issue(pki.clients["a"].thumbprint)
    assert (await gw.request("/x", token=good)).status == 200   # breaker still closed
    assert _verifier(gw).stats.short_circuited == 0 and upstream.seen[-1].path_qs == "/x"


async def test_cached_entry_rechecks_expiry_without_calling(
        opaque_gw: RunningGateway, auth_server: AuthServer, pki: Pki,
        monkeypatch: pytest.MonkeyPatch) -> None:
    token = auth_server.issue(pki.clients["a"].thumbprint, exp=int(time.time()) + 120)
    assert (await opaque_gw.request("/x", token=token)).status == 200
    # The wall clock moves past exp + leeway while the monotonic cache entry is still alive.
    real = time.time
    monkeypatch.setattr("mtls_gateway.introspection.time.time", lambda: real() + 200)
    reply = await opaque_gw.request("/x", token=token)
    assert reply.status == 401 and reply.json()["reason"] == "token_expired"
    assert auth_server.calls == 1


async def test_cache_ttl_is_bounded_by_exp(opaque_gw: RunningGateway,
                                           auth_server: AuthServer, pki: Pki) -> None:
    # Real margins: at least two seconds before exp for the two requests that must hit the
    # cache (a loaded machine is slow), and half a second past exp before the one that must
    # not.
    exp = int(time.time()) + 3
    token = auth_server.issue(pki.clients["a"].thumbprint, exp=exp)
    assert (await opaque_gw.request("/x", token=token)).status == 200
    assert (await opaque_gw.request("/x", token=token)).status == 200
    assert auth_server.calls == 1
    await asyncio.sleep(exp + 0.5 - time.time())
    auth_server.tokens[token] = {"active": False}
    reply = await opaque_gw.request("/x", token=token)
    assert reply.status == 401 and auth_server.calls == 2


async def test_500_concurrent_requests_one_call(make_gateway: Any, pki: Pki, issuer: Issuer,
                                                upstream: Upstream, auth_server: AuthServer,
                                                tmp_path: Path) -> None:
    gw = await make_gateway(introspection_config(pki, issuer, upstream, auth_server, tmp_path,
                                                 timeout="60s"))
    token = auth_server.issue(pki.clients["a"].thumbprint)
    auth_server.hold = asyncio.Event()  # the server answers only once all 500 are waiting
    verifier = _verifier(gw)
    tasks = [asyncio.create_task(gw.request("/x", token=token)) for _ in range(500)]
    deadline = time.monotonic() + 60
    while verifier.stats.coalesced < 499 and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    auth_server.hold.set()
    replies = await asyncio.gather(*tasks)
    assert [r.status for r in replies] == [200] * 500
    assert auth_server.calls == 1
    assert verifier.stats.coalesced == 499 and verifier.stats.misses == 1


async def test_server_down_cached_tokens_work_new_ones_fail_fast(
        make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream,
        auth_server: AuthServer, tmp_path: Path) -> None:
    gw = await make_gateway(introspection_config(
        pki, issuer, upstream, auth_server, tmp_path, failure_threshold=2,
        failure_cooldown="30s"))
    warm = auth_server.issue(pki.clients["a"].thumbprint)
    assert (await gw.request("/x", token=warm)).status == 200
    await auth_server.stop()
    assert (await gw.request("/x", token=warm)).status == 200
    statuses = []
    started = time.monotonic()
    for _ in range(5):
        reply = await gw.request("/x", token=auth_server.issue(pki.clients["a"].thumbprint))
        statuses.append((reply.status, reply.json()["reason"]))
    assert statuses == [(503, "introspection_unavailable")] * 5
    assert time.monotonic() - started < 5
    stats = _verifier(gw).stats
    assert stats.calls == 3 and stats.short_circuited == 3   # the breaker opened after 2
    assert (await gw.request("/x", token=warm)).status == 200


async def test_slow_server_gives_503_after_timeout(make_gateway: Any, pki: Pki, issuer: Issuer,
                                                   upstream: Upstream, auth_server: AuthServer,
                                                   tmp_path: Path) -> None:
    gw = await make_gateway(introspection_config(pki, issuer, upstream, auth_server, tmp_path,
                                                 timeout="300ms"))
    auth_server.delay = 1.5
    started = time.monotonic()
    reply = await gw.request("/x", token=auth_server.issue(pki.clients["a"].thumbprint))
    assert reply.status == 503 and time.monotonic() - started < 1.2
    assert upstream.seen == []


async def test_rejected_gateway_credentials_are_503_and_logged_as_misconfiguration(
        make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream,
        auth_server: AuthServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    config = introspection_config(pki, issuer, upstream, auth_server, tmp_path)
    wrong = tmp_path / "wrong-secret"
    wrong.write_text("not-the-secret")
    config["providers"]["opaque"]["client_secret_file"] = str(wrong)
    gw = await make_gateway(config)
    token = auth_server.issue(pki.clients["a"].thumbprint)
    reply = await gw.request("/x", token=token)
    assert reply.status == 503
    assert reply.json()["reason"] == "introspection_misconfigured"
    assert "WWW-Authenticate" not in reply.headers
    assert "gateway is misconfigured" in caplog.text
    assert "not-the-secret" not in caplog.text and token not in caplog.text
    assert upstream.seen == []


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post",
                                    "tls_client_auth"])
async def test_client_auth_methods_seen_by_the_server(
        make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream,
        auth_server: AuthServer, tmp_path: Path, method: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    extra: dict[str, Any] = {"auth_method": method}
    if method == "tls_client_auth":
        crt, key = _gateway_client_cert(pki, tmp_path)
        extra.update(client_cert_file=str(crt), client_key_file=str(key),
                     client_secret_file=None)
    config = introspection_config(pki, issuer, upstream, auth_server, tmp_path, **extra)
    config["providers"]["opaque"] = {k: v for k, v in config["providers"]["opaque"].items()
                                     if v is not None}
    gw = await make_gateway(config)
    assert (await gw.request("/x", token=auth_server.issue(pki.clients["a"].thumbprint))
            ).status == 200
    assert auth_server.auth_seen == [(method, CLIENT_ID)]
    assert SECRET not in caplog.text


def _gateway_client_cert(pki: Pki, tmp_path: Path) -> tuple[Path, Path]:
    """A client certificate CN=gateway signed by the test CA (whose key the pki kept)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from mtls_gateway.pki import CertKey, issue_client

    ca_cert = x509.load_pem_x509_certificate(pki.ca_file.read_bytes())
    ca_key = load_pem_private_key((pki.dir / "ca.key").read_bytes(), None)
    ca = CertKey(ca_cert, ca_key)  # type: ignore[arg-type]
    return issue_client(ca, "gateway").write(tmp_path, "gateway-client")


@pytest.mark.parametrize(("claims", "reason"), [
    ({"iss": "https://evil.test"}, "wrong_issuer"),
    ({"aud": ["https://other.test"]}, "wrong_audience"),
    ({"nbf": int(time.time()) + 3600}, "token_not_yet_valid"),
    ({"exp": int(time.time()) - 3600}, "token_expired"),
    ({"cnf": {"x5t#S256": 42}}, "token_malformed"),
])
async def test_response_claims_are_checked_like_jwt_claims(
        opaque_gw: RunningGateway, auth_server: AuthServer, upstream: Upstream, pki: Pki,
        claims: dict[str, Any], reason: str) -> None:
    token = auth_server.issue(pki.clients["a"].thumbprint, **claims)
    reply = await opaque_gw.request("/x", token=token)
    assert reply.status == 401 and reply.json()["reason"] == reason
    assert upstream.seen == []


async def test_scope_from_introspection_is_enforced(make_gateway: Any, pki: Pki, issuer: Issuer,
                                                   upstream: Upstream, auth_server: AuthServer,
                                                   tmp_path: Path) -> None:
    config = introspection_config(pki, issuer, upstream, auth_server, tmp_path)
    config["routes"][1]["auth"]["scopes"] = ["payments:write"]
    gw = await make_gateway(config)
    token = auth_server.issue(pki.clients["a"].thumbprint)
    assert (await gw.request("/x", token=token)).status == 403
    auth_server.tokens[token]["scope"] = "payments:write"
    other = auth_server.issue(pki.clients["a"].thumbprint, scope="accounts:read payments:write")
    assert (await gw.request("/x", token=other)).status == 200


async def test_provider_chain_jwt_locally_opaque_by_introspection(
        opaque_gw: RunningGateway, auth_server: AuthServer, issuer: Issuer, pki: Pki,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mtls_gateway.access")
    tp = pki.clients["a"].thumbprint
    assert (await opaque_gw.request("/x", token=issuer.mint(tp))).status == 200
    assert auth_server.calls == 0
    assert (await opaque_gw.request("/x", token=auth_server.issue(tp))).status == 200
    assert auth_server.calls == 1
    # a JWT from an issuer we do not know locally goes to introspection, which says inactive
    reply = await opaque_gw.request("/x", token=issuer.mint(tp, iss="https://unknown.test"))
    assert reply.status == 401 and reply.json()["reason"] == "token_inactive"
    providers = [r.decision["provider"] for r in caplog.records if hasattr(r, "decision")]
    assert providers == ["corp", "opaque", "opaque"]


async def test_cache_is_bounded_and_keyed_by_hash(make_gateway: Any, pki: Pki, issuer: Issuer,
                                                 upstream: Upstream, auth_server: AuthServer,
                                                 tmp_path: Path) -> None:
    config = introspection_config(pki, issuer, upstream, auth_server, tmp_path)
    config["providers"]["opaque"]["cache"]["maxsize"] = 3
    gw = await make_gateway(config)
    tokens = [auth_server.issue(pki.clients["a"].thumbprint) for _ in range(5)]
    for token in tokens:
        assert (await gw.request("/x", token=token)).status == 200
    cache = _verifier(gw)._cache
    assert len(cache) == 3
    assert all(isinstance(k, bytes) and len(k) == 32 for k in cache)
    assert not any(t.encode() in k for t in tokens for k in cache)


def test_inline_secret_is_refused_and_env_secret_read(pki: Pki, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from mtls_gateway.config import IntrospectionProvider
    from mtls_gateway.config_load import load_config_text
    from mtls_gateway.errors import ConfigError

    up = Upstream()
    up.url = "http://127.0.0.1:1"
    auth = AuthServer(pki)
    auth.url = "https://127.0.0.1:1/introspect"
    config = introspection_config(pki, None, up, auth, tmp_path)
    provider = config["providers"]["opaque"]
    del provider["client_secret_file"]
    provider["client_secret"] = "inline"
    with pytest.raises(ConfigError) as info:
        load_config_text(yaml.safe_dump(config), base_dir=tmp_path)
    assert any(p.startswith("providers.opaque.client_secret: inline secrets are refused")
               for p in info.value.problems)
    assert "inline" not in str(info.value).replace("inline secrets", "")
    del provider["client_secret"]
    provider["client_secret_env"] = "TEST_INTROSPECTION_SECRET"
    with pytest.raises(ConfigError, match="TEST_INTROSPECTION_SECRET is not set"):
        load_config_text(yaml.safe_dump(config), base_dir=tmp_path)
    monkeypatch.setenv("TEST_INTROSPECTION_SECRET", "from-env")
    loaded = load_config_text(yaml.safe_dump(config), base_dir=tmp_path).providers["opaque"]
    assert isinstance(loaded, IntrospectionProvider) and loaded.client_secret == "from-env"
    assert "from-env" not in repr(loaded)


# --- the gateway's own pool is not the endpoint (issue 20) ------------------------------------

async def test_burst_of_new_tokens_never_trips_the_breaker(
        make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream,
        auth_server: AuthServer, tmp_path: Path) -> None:
    """300 new tokens at once against a healthy endpoint answering in 0.3 s, through 10 pool
    connections: the last ones wait ~9 s for a connection, three times the endpoint's
    timeout (3 s), yet the wait is not the endpoint's and nothing fails. (Each call itself
    has 10x its 0.3 s in hand, so a loaded machine does not make real timeouts.)"""
    gw = await make_gateway(introspection_config(pki, issuer, upstream, auth_server, tmp_path,
                                                 max_connections=10, timeout="3s",
                                                 queue_timeout="60s"))
    auth_server.delay = 0.3
    verifier = _verifier(gw)
    tokens = [auth_server.issue(None) for _ in range(300)]

    async def one(token: str) -> str:
        try:
            await verifier.verify(token, hashlib.sha256(token.encode()).digest())
        except Refusal as exc:
            return exc.reason
        return "ok"

    started = time.monotonic()
    results = await asyncio.gather(*(one(t) for t in tokens))
    assert Counter(results) == {"ok": 300}
    assert verifier.stats.failures == 0 and verifier.stats.short_circuited == 0
    assert time.monotonic() - started > 3       # the queue really outlasted the timeout


def test_introspection_pool_defaults(pki: Pki, issuer: Issuer, upstream: Upstream,
                                     auth_server: AuthServer, tmp_path: Path) -> None:
    config = load_config_text(yaml.safe_dump(introspection_config(
        pki, issuer, upstream, auth_server, tmp_path)), base_dir=tmp_path)
    provider = config.providers["opaque"]
    assert isinstance(provider, IntrospectionProvider)
    assert (provider.max_connections, provider.max_waiting, provider.queue_timeout) == (
        100, 1000, 5.0)


async def test_gateway_overload_is_shed_with_its_own_reason_not_the_breaker(
        make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream,
        auth_server: AuthServer, tmp_path: Path) -> None:
    gw = await make_gateway(introspection_config(
        pki, issuer, upstream, auth_server, tmp_path, max_connections=2, max_waiting=3,
        queue_timeout="10s", failure_threshold=1, timeout="5s"))
    auth_server.delay = 0.5
    a = pki.clients["a"].thumbprint
    replies = await asyncio.gather(*(gw.request("/x", token=auth_server.issue(a))
                                     for _ in range(10)))
    outcome = Counter((r.status, r.json().get("reason", "")) for r in replies)
    assert outcome == {(200, ""): 5, (503, "introspection_overloaded"): 5}
    assert auth_server.calls == 5
    verifier = _verifier(gw)
    assert verifier.stats.failures == 0
    assert (await gw.request("/x", token=auth_server.issue(a))).status == 200   # not open


async def test_queue_timeout_sheds_without_counting(
        make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream,
        auth_server: AuthServer, tmp_path: Path) -> None:
    gw = await make_gateway(introspection_config(
        pki, issuer, upstream, auth_server, tmp_path, max_connections=1,
        queue_timeout="200ms", failure_threshold=1, timeout="5s"))
    auth_server.delay = 1.0
    a = pki.clients["a"].thumbprint
    first = asyncio.create_task(gw.request("/x", token=auth_server.issue(a)))
    await asyncio.sleep(0.3)
    second = await gw.request("/x", token=auth_server.issue(a))
    assert (second.status, second.json()["reason"]) == (503, "introspection_overloaded")
    assert (await first).status == 200
    assert _verifier(gw).stats.failures == 0
async def test_a_client_gone_while_its_token_is_checked_is_logged_once(
        opaque_gw: RunningGateway, auth_server: AuthServer, pki: Pki, upstream: Upstream,
        fast_lane: bool, caplog: pytest.LogCaptureFixture) -> None:
    """The client closes its connection while introspection is pending: one decision log
    line (never none), and the upstream sees nothing."""
    caplog.set_level(logging.INFO, "mtls_gateway.access")
    auth_server.hold = asyncio.Event()
    token = auth_server.issue(pki.clients["a"].thumbprint)
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", opaque_gw.server.port, ssl=pki.client_context("a"),
        server_hostname="localhost")
    writer.write(f"GET /x HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {token}\r\n\r\n"
                 .encode())
    await writer.drain()
    deadline = time.monotonic() + 10
    while auth_server.calls == 0 and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    writer.close()
    await asyncio.sleep(0.3)
    auth_server.hold.set()
    await asyncio.sleep(0.3)
    decisions = [r.decision for r in caplog.records  # type: ignore[attr-defined]
                 if r.name == "mtls_gateway.access"]
    if fast_lane:   # (the lane drops the request; aiohttp lets the handler finish)
        assert [(d["reason"], d["status"]) for d in decisions] == [("client_closed", 499)]
        assert upstream.seen == []
    else:
        assert len(decisions) == 1
