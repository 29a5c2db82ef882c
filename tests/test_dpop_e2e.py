"""DPoP end to end: a real gateway (fast lane on and off), real tokens from a real JWKS
issuer, real DPoP proofs signed by real keys, a recording upstream, and a real redis-server.

Every refusal asserts the status, the RFC 9449 section 7.1 challenge, the reason code and
that the upstream saw nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dpop_client import DpopKey, RedisServer
from gwtest import GatewayFactory, Issuer, Pki, Reply, RunningGateway, Upstream, base_config

pytestmark = pytest.mark.parametrize("fast_lane", [True, False], ids=["lane", "nolane"])

NONCE_SECRET = "0123456789abcdef0123456789abcdef-nonce"


@pytest.fixture(scope="module")
def key() -> DpopKey:
    return DpopKey.generate("ES256")


@pytest.fixture(scope="module")
def other_key() -> DpopKey:
    return DpopKey.generate("EdDSA")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-e2e")).start()
    yield server
    server.stop()


def _config(pki: Pki, issuer: Issuer, upstream: Upstream, tmp_path: Path, fast_lane: bool,
            **dpop: Any) -> dict[str, Any]:
    config = base_config(pki, issuer, upstream)
    secret = tmp_path / "nonce-secret"
    secret.write_text(NONCE_SECRET)
    config["fast_lane"] = fast_lane
    config["dpop"] = {"nonce_secret_file": str(secret), **dpop}
    api = config["routes"].pop()
    config["routes"] += [
        {"name": "dpop", "path_prefix": "/dpop",
         "auth": {"provider": "corp", "sender_constraint": "dpop"}},
        {"name": "nonce", "path_prefix": "/nonce",
         "auth": {"provider": "corp", "sender_constraint": "dpop", "dpop_nonce": True}},
        {"name": "either", "path_prefix": "/either",
         "auth": {"provider": "corp", "sender_constraint": "mtls_or_dpop"}},
        api,
    ]
    return config


async def _gateway(make_gateway: GatewayFactory, pki: Pki, issuer: Issuer,
                   upstream: Upstream, tmp_path: Path, fast_lane: bool,
                   **dpop: Any) -> RunningGateway:
    return await make_gateway(_config(pki, issuer, upstream, tmp_path, fast_lane, **dpop))


def _dpop_headers(token: str, proof: str | None) -> list[tuple[str, str]]:
    headers = [("Authorization", f"DPoP {token}")]
    return [*headers, ("DPoP", proof)] if proof is not None else headers


def _assert_refused(reply: Reply, upstream: Upstream, reason: str, error: str | None,
                    status: int = 401) -> None:
    assert reply.status == status, reply.body
    assert reply.json()["reason"] == reason
    if error is not None:
        challenges = reply.headers.getall("WWW-Authenticate")
        dpop = [c for c in challenges if c.startswith("DPoP ")]
        assert len(dpop) == 1, challenges
        assert f'error="{error}"' in challenges[-1] or any(f'error="{error}"' in c
                                                         for c in challenges)
        assert 'algs="' in dpop[0]
    assert upstream.seen == []


# --- accepted ----------------------------------------------------------------------------

async def test_accepted_with_a_fresh_proof_per_request(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream,
        tmp_path: Path, key: DpopKey, fast_lane: bool) -> None:
    """A public client (no certificate) on one keep-alive connection, a proof per request."""
    gw = await _gateway(make_gateway, pki, issuer, upstream, tmp_path, fast_lane)
    token = issuer.mint(None, cnf={"jkt": key.thumbprint})
    connector = aiohttp.TCPConnector(ssl=pki.client_context(None), limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        for i in range(3):
            url = f"{gw.url}/dpop/items/{i}"
            proof = key.proof("GET", url, token)
            async with session.get(url + "?q=1", headers=_dpop_headers(token, proof)) as resp:
                assert resp.status == 200, await resp.text()
    assert [s.path_qs for s in upstream.seen] == [f"/dpop/items/{i}?q=1" for i in range(3)]
    lane = gw.server.gateway.lane                      # one pooled upstream connection
    assert (lane.pool.opened if lane is not None else 0) == (1 if fast_lane else 0)
    assert "dpop" in upstream.seen[0].headers          # the proof itself is passed along


async def test_accepted_with_a_client_certificate_too(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream,
        tmp_path: Path, key: DpopKey, fast_lane: bool) -> None:
    gw = await _gateway(make_gateway, pki, issuer, upstream, tmp_path, fast_lane)
    token = issuer.mint(None, cnf={"jkt": key.thumbprint})
    reply = await gw.request("/dpop/x", cert="a", headers=_dpop_headers(
        token, key.proof("GET", f"{gw.url}/dpop/x", token)))
    assert reply.status == 200
    assert len(upstream.seen) == 1
    lane = gw.server.gateway.lane                      # the lane carried it, when it is on
    assert (lane is not None and lane.pool.opened > 0) is fast_lane


# --- refused: each fault on its own, upstream saw nothing --------------------------------

def _faults(gw: RunningGateway, issuer: Issuer, key: DpopKey, other: DpopKey
            ) -> dict[str, tuple[list[tuple[str, str]], str, str]]:
    """name -> (headers, reason, OAuth error) for GET /dpop/x."""
    url = f"{gw.url}/dpop/x"
    token = issuer.mint(None, cnf={"jkt": key.thumbprint})
    unbound = issuer.mint(None)
    return {
        "wrong htm": (_dpop_headers(token, key.proof("POST", url, token)),
                      "dpop_htm_mismatch", "invalid_dpop_proof"),
        "wrong htu path": (_dpop_headers(token, key.proof("GET", f"{gw.url}/dpop/y", token)),
                           "dpop_htu_mismatch", "invalid_dpop_proof"),
        "wrong htu host": (_dpop_headers(token, key.proof(
            "GET", url.replace("127.0.0.1", "evil.example"), token)),
            "dpop_htu_mismatch", "invalid_dpop_proof"),
        "wrong ath": (_dpop_headers(token, key.proof("GET", url, "another-token")),
                      "dpop_ath_mismatch", "invalid_dpop_proof"),
        "wrong key": (_dpop_headers(token, other.proof("GET", url, token)),
                      "dpop_jkt_mismatch", "invalid_token"),
        "expired proof": (_dpop_headers(token, key.proof("GET", url, token,
                                                         iat=time.time() - 600)),
                          "dpop_proof_expired", "invalid_dpop_proof"),
        "proof missing": (_dpop_headers(token, None), "dpop_proof_missing",
                          "invalid_dpop_proof"),
        "two proofs": ([*_dpop_headers(token, key.proof("GET", url, token)),
                        ("DPoP", key.proof("GET", url, token))],
                       "dpop_proof_invalid", "invalid_dpop_proof"),
        "forged signature": (_dpop_headers(token, key.proof("GET", url, token,
                                                            signer=DpopKey.generate())),
                             "dpop_proof_invalid", "invalid_dpop_proof"),
        "bearer downgrade": ([("Authorization", f"Bearer {token}")],
                             "dpop_bearer_downgrade", "invalid_token"),
        "unbound token": (_dpop_headers(unbound, key.proof("GET", url, unbound)),
                          "dpop_binding_missing", "invalid_token"),
    }


_FAULTS = ["wrong htm", "wrong htu path", "wrong htu host", "wrong ath", "wrong key",
           "expired proof", "proof missing", "two proofs", "forged signature",
           "bearer downgrade", "unbound token"]


@pytest.mark.parametrize("fault", _FAULTS)
async def test_refused(make_gateway: GatewayFactory, pki: Pki, issuer: Issuer,
                       upstream: Upstream, tmp_path: Path, key: DpopKey, other_key: DpopKey,
                       fast_lane: bool, fault: str) -> None:
    gw = await _gateway(make_gateway, pki, issuer, upstream, tmp_path, fast_lane)
    headers, reason, error = _faults(gw, issuer, key, other_key)[fault]
    reply = await gw.request("/dpop/x", cert=None, headers=headers)
    _assert_refused(reply, upstream, reason, error)
    assert "Bearer " not in " ".join(reply.headers.getall("WWW-Authenticate"))


async def test_no_credentials_get_a_bare_dpop_challenge(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream,
        tmp_path: Path, fast_lane: bool) -> None:
    gw = await _gateway(make_gateway, pki, issuer, upstream, tmp_path, fast_lane)
    reply = await gw.request("/dpop/x", cert=None)
    assert reply.status == 401
    assert reply.headers.getall("WWW-Authenticate") == [
        f'DPoP realm="mtls-gateway", algs="{" ".join(_ALGS)}"']
    assert upstream.seen == []


_ALGS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
         "EdDSA"]


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_replay_refused(make_gateway: GatewayFactory, pki: Pki, issuer: Issuer,
                              upstream: Upstream, tmp_path: Path, key: DpopKey,
                              request: pytest.FixtureRequest, fast_lane: bool,
                              store: str) -> None:
    dpop = {"replay_store": request.getfixturevalue("redis_server").url} \
        if store == "redis" else {}
    gw = await _gateway(make_gateway, pki, issuer, upstream, tmp_path, fast_lane, **dpop)
    token = issuer.mint(None, cnf={"jkt": key.thumbprint})
    headers = _dpop_headers(token, key.proof("GET", f"{gw.url}/dpop/x", token))
    assert (await gw.request("/dpop/x", cert=None, headers=headers)).status == 200
    assert len(upstream.seen) == 1
    upstream.seen.clear()
    reply = await gw.request("/dpop/x", cert=None, headers=headers)
    _assert_refused(reply, upstream, "dpop_replayed", "invalid_dpop_proof")


async def test_replay_store_down_fails_closed(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream,
        tmp_path: Path, key: DpopKey, fast_lane: bool) -> None:
    server = RedisServer(tmp_path).start()
    try:
        gw = await _gateway(make_gateway, pki, issuer, upstream, tmp_path, fast_lane,
                            replay_store=server.url, replay_store_timeout="300ms")
        token = issuer.mint(None, cnf={"jkt": key.thumbprint})
        url = f"{gw.url}/dpop/x"
        ok = await gw.request("/dpop/x", cert=None,
                              headers=_dpop_headers(token, key.proof("GET", url, token)))
        assert ok.status == 200
        upstream.seen.clear()
        server.stop()
        reply = await gw.request("/dpop/x", cert=None,
                                 headers=_dpop_headers(token, key.proof("GET", url, token)))
        _assert_refused(reply, upstream, "dpop_replay_store_unavailable", None, status=503)
    finally:
        server.stop()


# --- nonces ------------------------------------------------------------------------------

async def test_nonce_flow(make_gateway: GatewayFactory, pki: Pki, issuer: Issuer,
                          upstream: Upstream, tmp_path: Path, key: DpopKey,
                          fast_lane: bool) -> None:
    gw = await _gateway(make_gateway, pki, issuer, upstream, tmp_path, fast_lane)
    token = issuer.mint(None, cnf={"jkt": key.thumbprint})
    url = f"{gw.url}/nonce/x"
    first = await gw.request("/nonce/x", cert=None,
                             headers=_dpop_headers(token, key.proof("GET", url, token)))
    _assert_refused(first, upstream, "dpop_nonce_required", "use_dpop_nonce")
    nonce = first.headers["DPoP-Nonce"]
    assert len(first.headers.getall("DPoP-Nonce")) == 1
    made_up = await gw.request("/nonce/x", cert=None, headers=_dpop_headers(
        token, key.proof("GET", url, token, nonce="made-up")))
    _assert_refused(made_up, upstream, "dpop_nonce_required", "use_dpop_nonce")
    assert made_up.headers["DPoP-Nonce"] == nonce
    retry = await gw.request("/nonce/x", cert=None, headers=_dpop_headers(
        token, key.proof("GET", url, token, nonce=nonce)))
    assert retry.status == 200
    assert len(upstream.seen) == 1


class _Clock:
    """The nonce issuer's clock, set by the test (no racing the wall clock)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_fresh_nonce_on_allowed_answers_once_the_window_moves(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream,
        tmp_path: Path, key: DpopKey, fast_lane: bool) -> None:
    """RFC 9449 section 8.2: a proof carrying last window's nonce (still accepted) is
    answered 200 with the current nonce in DPoP-Nonce, on one keep-alive connection; a
    current nonce, or a route without nonces, gets none."""
    gw = await _gateway(make_gateway, pki, issuer, upstream, tmp_path, fast_lane,
                        nonce_lifetime="300s")
    verifier = gw.server.gateway.pipeline.dpop
    assert verifier is not None and verifier.nonces is not None
    clock = _Clock(3000 * 300.0 + 10)                  # 10 s into a window
    verifier.nonces.clock = clock
    token = issuer.mint(None, cnf={"jkt": key.thumbprint})
    connector = aiohttp.TCPConnector(ssl=pki.client_context(None), limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def call(path: str, nonce: str | None) -> tuple[int, list[str], Any]:
            url = f"{gw.url}{path}"
            proof = key.proof("GET", url, token, nonce=nonce)
            async with session.get(url, headers=_dpop_headers(token, proof)) as resp:
                return resp.status, resp.headers.getall("DPoP-Nonce", []), await resp.json()

        status, nonces, _ = await call("/nonce/a", None)
        assert (status, len(nonces)) == (401, 1)       # told to use one
        first = nonces[0]
        status, nonces, body = await call("/nonce/b", first)
        assert (status, nonces, body["ok"]) == (200, [], True)   # current: nothing new
        clock.now += 300                               # the issuer moves to a new window
        status, nonces, body = await call("/nonce/c", first)
        assert (status, body["ok"]) == (200, True)     # still accepted, and told the next
        assert len(nonces) == 1 and nonces[0] != first
        second = nonces[0]
        assert second == verifier.nonces.current()
        status, nonces, _ = await call("/nonce/d", second)
        assert (status, nonces) == (200, [])
        status, nonces, _ = await call("/dpop/e", first)   # a route without nonces
        assert (status, nonces) == (200, [])
        clock.now += 300                               # two windows on: refused, with the next
        status, nonces, _ = await call("/nonce/f", first)
        assert status == 401 and nonces == [verifier.nonces.current()]
    assert [s.path_qs for s in upstream.seen] == ["/nonce/b", "/nonce/c", "/nonce/d",
                                                  "/dpop/e"]
    assert all("dpop-nonce" not in s.headers for s in upstream.seen)
    lane = gw.server.gateway.lane                      # one keep-alive connection throughout
    assert (lane.pool.opened if lane is not None else 0) == (1 if fast_lane else 0)


# --- mtls_or_dpop: the token's cnf decides ------------------------------------------------

async def test_mtls_or_dpop(make_gateway: GatewayFactory, pki: Pki, issuer: Issuer,
                            upstream: Upstream, tmp_path: Path, key: DpopKey,
                            fast_lane: bool) -> None:
    gw = await _gateway(make_gateway, pki, issuer, upstream, tmp_path, fast_lane)
    url = f"{gw.url}/either/x"
    cert_bound = issuer.mint(pki.clients["a"].thumbprint)
    key_bound = issuer.mint(None, cnf={"jkt": key.thumbprint})
    assert (await gw.request("/either/x", cert="a", token=cert_bound)).status == 200
    assert (await gw.request("/either/x", cert=None, headers=_dpop_headers(
        key_bound, key.proof("GET", url, key_bound)))).status == 200
    assert len(upstream.seen) == 2
    upstream.seen.clear()
    wrong_cert = await gw.request("/either/x", cert="b", token=cert_bound)
    _assert_refused(wrong_cert, upstream, "binding_mismatch", "invalid_token")
    downgrade = await gw.request("/either/x", cert="a", token=key_bound)
    _assert_refused(downgrade, upstream, "dpop_bearer_downgrade", "invalid_token")
    challenges = downgrade.headers.getall("WWW-Authenticate")
    assert challenges[0].startswith('Bearer realm="mtls-gateway", error="invalid_token"')
    assert challenges[1].startswith('DPoP realm="mtls-gateway", algs=')
    no_proof = await gw.request("/either/x", cert="a", headers=_dpop_headers(key_bound, None))
    _assert_refused(no_proof, upstream, "dpop_proof_missing", "invalid_dpop_proof")
    as_dpop = await gw.request("/either/x", cert="a", headers=_dpop_headers(
        cert_bound, key.proof("GET", url, cert_bound)))   # the DPoP scheme, a cert-bound token
    _assert_refused(as_dpop, upstream, "dpop_binding_missing", "invalid_token")


async def test_mtls_or_dpop_token_bound_both_ways_is_checked_both_ways(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream,
        tmp_path: Path, key: DpopKey, fast_lane: bool) -> None:
    gw = await _gateway(make_gateway, pki, issuer, upstream, tmp_path, fast_lane)
    url = f"{gw.url}/either/x"
    both = issuer.mint(None, cnf={"x5t#S256": pki.clients["a"].thumbprint,
                                  "jkt": key.thumbprint})
    ok = await gw.request("/either/x", cert="a", headers=_dpop_headers(
        both, key.proof("GET", url, both)))
    assert ok.status == 200
    upstream.seen.clear()
    wrong_cert = await gw.request("/either/x", cert="b", headers=_dpop_headers(
        both, key.proof("GET", url, both)))
    _assert_refused(wrong_cert, upstream, "binding_mismatch", "invalid_token")
    no_cert = await gw.request("/either/x", cert=None, headers=_dpop_headers(
        both, key.proof("GET", url, both)))
    _assert_refused(no_cert, upstream, "no_client_cert", "invalid_token")


async def test_mtls_routes_unchanged_for_dpop_bound_tokens(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream,
        tmp_path: Path, key: DpopKey, fast_lane: bool) -> None:
    """The default route (sender_constraint mtls, binding required) answers as before: a
    DPoP-bound token is not certificate-bound, and the DPoP scheme is not Bearer."""
    gw = await _gateway(make_gateway, pki, issuer, upstream, tmp_path, fast_lane)
    key_bound = issuer.mint(None, cnf={"jkt": key.thumbprint})
    as_bearer = await gw.request("/accounts", cert="a", token=key_bound)
    assert (as_bearer.status, as_bearer.json()["reason"]) == (401, "binding_missing")
    as_dpop = await gw.request("/accounts", cert="a", headers=_dpop_headers(
        key_bound, key.proof("GET", f"{gw.url}/accounts", key_bound)))
    assert (as_dpop.status, as_dpop.json()["reason"]) == (401, "no_token")
    assert all(c.startswith("Bearer ") for c in as_dpop.headers.getall("WWW-Authenticate"))
    assert upstream.seen == []


@pytest.mark.parametrize(("binding", "claims", "cert", "expected"), [
    ("off", {"jkt": True}, "a", (401, "dpop_bearer_downgrade")),
    ("off", {"jkt": True, "x5t": True}, "a", (401, "dpop_bearer_downgrade")),
    ("off", {"x5t": True}, "b", (200, "allowed")),      # off: certificate binding not checked
    ("off", {}, None, (200, "allowed")),                 # a plain bearer token
    ("optional", {"jkt": True}, "a", (401, "binding_unsupported")),
    ("optional", {"jkt": True, "x5t": True}, "a", (200, "allowed")),   # cert binding proven
])
async def test_a_dpop_bound_token_is_never_a_bearer_token_on_mtls_routes(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream,
        tmp_path: Path, key: DpopKey, fast_lane: bool, binding: str, claims: dict[str, bool],
        cert: str | None, expected: tuple[int, str]) -> None:
    """RFC 9449 section 7.2: a token bound to a DPoP key, sent as Bearer without a proof, is
    refused whatever the route's certificate binding says, ``binding: off`` included."""
    config = _config(pki, issuer, upstream, tmp_path, fast_lane)
    config["routes"].insert(0, {"name": "loose", "path_prefix": "/loose",
                                "auth": {"provider": "corp", "binding": binding}})
    gw = await make_gateway(config)
    cnf: dict[str, str] = {}
    if claims.get("jkt"):
        cnf["jkt"] = key.thumbprint
    if claims.get("x5t"):
        cnf["x5t#S256"] = pki.clients["a"].thumbprint
    token = issuer.mint(None, cnf=cnf or None)
    reply = await gw.request("/loose/x", cert=cert, token=token)
    assert (reply.status, reply.json()["reason"] if reply.status != 200 else "allowed") \
        == expected, reply.body
    if expected[0] == 200:
        assert len(upstream.seen) == 1
    else:
        assert upstream.seen == []
        assert all(c.startswith("Bearer ") for c in reply.headers.getall("WWW-Authenticate"))


async def test_external_origins(make_gateway: GatewayFactory, pki: Pki, issuer: Issuer,
                                upstream: Upstream, tmp_path: Path, key: DpopKey,
                                fast_lane: bool) -> None:
    """Behind a load balancer: htu names the public origin, not the gateway's Host."""
    gw = await _gateway(make_gateway, pki, issuer, upstream, tmp_path, fast_lane,
                        external_origins=["https://api.example.com"])
    token = issuer.mint(None, cnf={"jkt": key.thumbprint})
    public = await gw.request("/dpop/x", cert=None, headers=_dpop_headers(
        token, key.proof("GET", "https://api.example.com/dpop/x", token)))
    assert public.status == 200
    upstream.seen.clear()
    direct = await gw.request("/dpop/x", cert=None, headers=_dpop_headers(
        token, key.proof("GET", f"{gw.url}/dpop/x", token)))
    _assert_refused(direct, upstream, "dpop_htu_mismatch", "invalid_dpop_proof")


async def test_metadata_announces_dpop(make_gateway: GatewayFactory, pki: Pki, issuer: Issuer,
                                       upstream: Upstream, tmp_path: Path,
                                       fast_lane: bool) -> None:
    config = _config(pki, issuer, upstream, tmp_path, fast_lane, algorithms=["ES256", "EdDSA"])
    config["metadata"] = {"resource": "https://api.example.com"}
    gw = await make_gateway(config)
    reply = await gw.request("/.well-known/oauth-protected-resource", cert=None)
    doc = reply.json()
    assert doc["dpop_signing_alg_values_supported"] == ["ES256", "EdDSA"]
    assert doc["dpop_bound_access_tokens_required"] is False   # mtls routes exist too
    assert doc["tls_client_certificate_bound_access_tokens"] is True
