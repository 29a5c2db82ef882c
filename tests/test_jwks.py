"""Key handling against a real JWKS endpoint over HTTPS: rotation, floods, outages."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gwtest import Issuer, Pki, Upstream, base_config
from mtls_gateway.jwks import KeySet


async def test_unknown_kid_triggers_refetch_and_rotation_is_picked_up(
        make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream) -> None:
    gw = await make_gateway(base_config(pki, issuer, upstream))
    tp = pki.clients["a"].thumbprint
    assert (await gw.request("/x", token=issuer.mint(tp))).status == 200
    fetches = issuer.fetches
    new = issuer.rotate()
    reply = await gw.request("/x", token=issuer.mint(tp, kid=new.kid))
    assert reply.status == 200, reply.body
    assert issuer.fetches == fetches + 1


async def test_kid_flood_causes_bounded_refetches(make_gateway: Any, pki: Pki, issuer: Issuer,
                                                  upstream: Upstream) -> None:
    gw = await make_gateway(base_config(pki, issuer, upstream))  # cooldown 30s
    tp = pki.clients["a"].thumbprint
    before = issuer.fetches
    tokens = [issuer.mint(tp, headers={"kid": uuid.uuid4().hex}) for _ in range(200)]
    replies = await asyncio.gather(*(gw.request("/x", token=t) for t in tokens))
    assert {r.status for r in replies} == {401}
    assert {r.json()["reason"] for r in replies} == {"unknown_key"}
    assert issuer.fetches - before <= 1
    assert upstream.seen == []
    assert (await gw.request("/x", token=issuer.mint(tp))).status == 200


async def test_jwks_down_cold_fails_closed_with_503(make_gateway: Any, pki: Pki,
                                                    issuer: Issuer,
                                                    upstream: Upstream) -> None:
    issuer.fail_with = 500
    config = base_config(pki, issuer, upstream)
    config["providers"]["corp"]["jwks_refetch_cooldown"] = "0s"
    gw = await make_gateway(config)
    tp = pki.clients["a"].thumbprint
    reply = await gw.request("/x", token=issuer.mint(tp))
    assert reply.status == 503
    assert reply.json()["reason"] == "jwks_unavailable"
    assert upstream.seen == []
    issuer.fail_with = None  # the issuer recovers: the next request fetches and passes
    assert (await gw.request("/x", token=issuer.mint(tp))).status == 200


async def test_jwks_down_warm_keeps_last_good_keys(make_gateway: Any, pki: Pki,
                                                   issuer: Issuer, upstream: Upstream) -> None:
    config = base_config(pki, issuer, upstream)
    config["providers"]["corp"].update(jwks_refresh_interval="100ms", jwks_refetch_cooldown="0s")
    gw = await make_gateway(config)
    tp = pki.clients["a"].thumbprint
    assert (await gw.request("/x", token=issuer.mint(tp))).status == 200
    await issuer.stop()
    before = issuer.fetches
    await asyncio.sleep(0.5)  # several background refreshes fail meanwhile
    reply = await gw.request("/x", token=issuer.mint(tp))
    assert reply.status == 200
    # unknown kid while the issuer is down: refused as invalid, never a pass, never a 5xx storm
    assert (await gw.request("/x", token=issuer.mint(tp, headers={"kid": "x"}))).status == 401
    assert issuer.fetches == before  # the server is gone: nothing reached it


async def test_background_refresh_picks_up_new_keys(make_gateway: Any, pki: Pki,
                                                    issuer: Issuer, upstream: Upstream) -> None:
    config = base_config(pki, issuer, upstream)
    config["providers"]["corp"]["jwks_refresh_interval"] = "200ms"
    config["providers"]["corp"]["jwks_refetch_cooldown"] = "1h"  # no on-demand refetch
    gw = await make_gateway(config)
    new = issuer.rotate()
    await asyncio.sleep(0.6)
    reply = await gw.request("/x", token=issuer.mint(pki.clients["a"].thumbprint, kid=new.kid))
    assert reply.status == 200


async def test_slow_jwks_concurrent_cold_requests_share_one_fetch(
        make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream) -> None:
    issuer.fail_with = 503
    gw = await make_gateway(base_config(pki, issuer, upstream))
    issuer.fail_with, issuer.delay = None, 0.3
    config_fetches = issuer.fetches
    tp = pki.clients["a"].thumbprint
    replies = await asyncio.gather(*(gw.request("/x", token=issuer.mint(tp)) for _ in range(20)))
    assert {r.status for r in replies} == {200}
    assert issuer.fetches - config_fetches == 1


def _jwk(private: Any, **extra: Any) -> dict[str, Any]:
    from jwt.algorithms import ECAlgorithm, RSAAlgorithm

    algo = RSAAlgorithm if isinstance(private, rsa.RSAPrivateKey) else ECAlgorithm
    return {**json.loads(algo.to_jwk(private.public_key())), **extra}


@pytest.mark.parametrize(("jwk_extra", "key_kind", "allowed", "expected"), [
    ({"kid": "r"}, "rsa2048", ("RS256", "PS256"), {("r", "RS256"), ("r", "PS256")}),
    ({"kid": "r", "alg": "PS256"}, "rsa2048", ("RS256", "PS256"), {("r", "PS256")}),
    ({"kid": "r", "use": "enc"}, "rsa2048", ("RS256",), set()),
    ({"kid": "weak"}, "rsa1024", ("RS256",), set()),
    ({"kid": "e"}, "p256", ("RS256", "ES256"), {("e", "ES256")}),
    ({"kid": "e", "alg": "ES384"}, "p256", ("ES256", "ES384", "RS256"), set()),
])
def test_keyset_one_key_one_algorithm(rsa_keys: list[rsa.RSAPrivateKey], jwk_extra: Any,
                                      key_kind: str, allowed: tuple[str, ...],
                                      expected: set[tuple[str, str]]) -> None:
    private = {"rsa2048": rsa_keys[0],
               "rsa1024": rsa.generate_private_key(public_exponent=65537, key_size=1024),
               "p256": ec.generate_private_key(ec.SECP256R1())}[key_kind]
    doc = {"keys": [_jwk(private, **jwk_extra),
                    {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},   # never loaded
                    _jwk(rsa_keys[1], kid="other")]}
    keys = KeySet.from_document(doc, allowed)
    assert {k for k in keys.by_kid if k[0] != "other"} == expected
    assert not any(kid == "hmac" for kid, _ in keys.by_kid)


async def test_verified_jwt_cache_skips_signature_but_never_binding_or_expiry(
        make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream,
        monkeypatch: pytest.MonkeyPatch) -> None:
    gw = await make_gateway(base_config(pki, issuer, upstream))
    verifier = gw.server.gateway.verifiers["corp"]
    token = issuer.mint(pki.clients["a"].thumbprint)
    statuses = [(await gw.request("/x", cert=c, token=token)).status
                for c in ("a", "a", "b", "a2", "a")]
    assert statuses == [200, 200, 401, 401, 200]       # binding is checked every time
    assert (verifier.verifications, verifier.cache_hits) == (1, 4)
    real = time.time
    monkeypatch.setattr("mtls_gateway.jwt_verifier.time.time", lambda: real() + 3600)
    reply = await gw.request("/x", token=token)
    assert reply.status == 401 and reply.json()["reason"] == "token_expired"
    assert verifier.verifications == 1                 # refused from the cache, by the clock


async def test_verified_jwt_cache_is_void_once_the_key_set_changes(
        make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream) -> None:
    config = base_config(pki, issuer, upstream)
    config["providers"]["corp"]["jwks_refetch_cooldown"] = "0s"
    gw = await make_gateway(config)
    tp = pki.clients["a"].thumbprint
    old = issuer.mint(tp)
    assert (await gw.request("/x", token=old)).status == 200
    new = issuer.rotate()                               # rsa-1 is withdrawn at the issuer
    assert (await gw.request("/x", token=issuer.mint(tp, kid=new.kid))).status == 200
    reply = await gw.request("/x", token=old)           # cached, but its key is gone
    assert reply.status == 401 and reply.json()["reason"] == "unknown_key"


async def test_verified_jwt_cache_can_be_turned_off(make_gateway: Any, pki: Pki,
                                                    issuer: Issuer, upstream: Upstream) -> None:
    config = base_config(pki, issuer, upstream)
    config["providers"]["corp"]["verify_cache_size"] = 0
    gw = await make_gateway(config)
    token = issuer.mint(pki.clients["a"].thumbprint)
    for _ in range(3):
        assert (await gw.request("/x", token=token)).status == 200
    assert gw.server.gateway.verifiers["corp"].verifications == 3
