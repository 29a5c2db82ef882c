"""JWKS hygiene: which keys are ever used, and what a broken or hostile JWKS endpoint gets.

Unit tables for :meth:`KeySet.from_document`; the fetch rules end to end against a real
HTTPS JWKS server on loopback that misbehaves on demand. A JWKS that cannot be used is a
503 (nothing forwarded) until one that can is loaded; a loaded one keeps working.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from gwtest import (
    Issuer,
    LoopbackServer,
    Pki,
    RunningGateway,
    Upstream,
    base_config,
    write_in_pieces,
)
from mtls_gateway.jwks import KeySet

ALGS = ("RS256", "PS256", "ES256", "ES384")


def _rsa_jwk(kid: str, bits: int = 2048, **extra: Any) -> dict[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return {**json.loads(RSAAlgorithm.to_jwk(key.public_key())), "kid": kid, **extra}


def _ec_jwk(kid: str, curve: ec.EllipticCurve | None = None, **extra: Any) -> dict[str, Any]:
    key = ec.generate_private_key(curve or ec.SECP256R1())
    return {**json.loads(ECAlgorithm.to_jwk(key.public_key())), "kid": kid, **extra}


GOOD_RSA = _rsa_jwk("good", alg="RS256")
PRIVATE_RSA = {**json.loads(RSAAlgorithm.to_jwk(
    rsa.generate_private_key(public_exponent=65537, key_size=2048))), "kid": "private"}


@pytest.mark.parametrize(("extra_key", "usable"), [
    pytest.param({"kty": "oct", "k": base64.urlsafe_b64encode(b"s" * 32).decode(),
                  "kid": "x", "alg": "HS256"}, set(), id="symmetric_key_never_loaded"),
    pytest.param({**PRIVATE_RSA}, set(), id="private_key_material_skipped"),
    pytest.param(_rsa_jwk("x", use="enc"), set(), id="use_enc"),
    pytest.param(_rsa_jwk("x", key_ops=["encrypt"]), set(), id="key_ops_without_verify"),
    pytest.param(_rsa_jwk("x", key_ops="verify"), set(), id="key_ops_not_a_list"),
    pytest.param(_rsa_jwk("x", key_ops=["verify"], alg="RS256"), {("x", "RS256")},
                 id="key_ops_verify"),
    pytest.param(_rsa_jwk("x"), {("x", "RS256"), ("x", "PS256")},
                 id="rsa_without_alg_serves_rsa_algs_only"),
    pytest.param(_rsa_jwk("x", alg="PS256"), {("x", "PS256")}, id="rsa_for_ps256_only"),
    pytest.param(_rsa_jwk("x", alg="ES256"), set(), id="rsa_claiming_ec_alg"),
    pytest.param(_rsa_jwk("x", alg="none"), set(), id="alg_none_on_key"),
    pytest.param(_rsa_jwk("x", alg=["RS256"]), set(), id="alg_not_a_string"),
    pytest.param(_rsa_jwk("x", bits=1024, alg="RS256"), set(), id="weak_rsa_1024"),
    pytest.param(_ec_jwk("x"), {("x", "ES256")}, id="ec_p256_only_es256"),
    pytest.param(_ec_jwk("x", alg="ES384"), set(), id="ec_p256_claiming_es384"),
    pytest.param(_ec_jwk("x", ec.SECP384R1(), alg="ES256"), set(), id="ec_p384_claiming_es256"),
    pytest.param(_ec_jwk("x", alg="RS256"), set(), id="ec_claiming_rsa_alg"),
    pytest.param({**_ec_jwk("x"), "y": _ec_jwk("z")["x"]}, set(), id="ec_point_not_on_curve"),
    pytest.param({**_ec_jwk("x"), "crv": "secp256k1"}, set(), id="ec_unknown_curve"),
    pytest.param({**_rsa_jwk("x"), "n": "!!!not-base64!!!"}, set(), id="rsa_n_garbage"),
    pytest.param({**_rsa_jwk("x"), "n": 12345}, set(), id="rsa_n_number"),
    pytest.param({**_rsa_jwk("x"), "e": None}, set(), id="rsa_e_null"),
    pytest.param({k: v for k, v in _rsa_jwk("x").items() if k != "kty"}, set(),
                 id="kty_missing"),
    pytest.param({**_rsa_jwk("x"), "kty": "RSA "}, set(), id="kty_with_space"),
    pytest.param({**_rsa_jwk("good", alg="RS256")}, set(), id="duplicate_kid_keeps_first"),
    pytest.param("not-a-key", set(), id="key_not_an_object"),
])
def test_only_sound_verification_keys_are_loaded(extra_key: Any,
                                                 usable: set[tuple[str, str]]) -> None:
    keys = KeySet.from_document({"keys": [GOOD_RSA, extra_key]}, ALGS)
    assert set(keys.by_kid) == {("good", "RS256")} | usable
    assert keys.lookup("good", "RS256")[0].key.public_numbers() == \
        RSAAlgorithm.from_jwk(GOOD_RSA).public_numbers()   # the first "good" key, not another


@pytest.mark.parametrize("doc", [
    pytest.param({"keys": [GOOD_RSA] * 101}, id="more_than_100_keys"),
    pytest.param({"keys": {}}, id="keys_not_a_list"),
    pytest.param([GOOD_RSA], id="not_an_object"),
    pytest.param({"keys": []}, id="no_keys"),
    pytest.param({"keys": [PRIVATE_RSA]}, id="only_private_keys"),
])
def test_unusable_documents_are_refused_whole(doc: Any) -> None:
    with pytest.raises(ValueError):
        KeySet.from_document(doc, ALGS)


class HostileJwks(LoopbackServer):
    """An HTTPS JWKS endpoint that serves the issuer's keys or misbehaves (``mode``)."""

    def __init__(self, pki: Pki, issuer: Issuer) -> None:
        self.pki, self.issuer = pki, issuer
        self.mode = "good"
        self.hits: list[str] = []
        self.release = asyncio.Event()
        self.gated = asyncio.Event()    # set when a "gate" request has arrived
        self.url = ""

    def _good(self) -> bytes:
        return json.dumps({"keys": [k.public_jwk() for k in self.issuer.keys]}).encode()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(request.path)
        mode, good = self.mode, self._good()
        if request.path == "/elsewhere" or mode == "good":
            return web.Response(body=good, content_type="application/json")
        if mode == "jwk_set_json":
            return web.Response(body=good, content_type="application/jwk-set+json")
        if mode == "in_pieces":     # a valid document that arrives in three TCP writes
            return await write_in_pieces(request, good, content_type="application/json")
        if mode == "redirect_same_host":
            raise web.HTTPFound(f"{self.url}/elsewhere")
        if mode == "redirect_http":
            raise web.HTTPFound(f"{self.url.replace('https', 'http')}/elsewhere")
        if mode == "html":
            return web.Response(text="<html><body>Login</body></html>", content_type="text/html")
        if mode == "json_as_text_plain":
            return web.Response(body=good, content_type="text/plain")
        if mode == "huge":
            keys = {"keys": [], "pad": "x" * (600 * 1024)}
            return web.Response(body=json.dumps(keys).encode(), content_type="application/json")
        if mode == "too_many_keys":
            one = self.issuer.keys[0].public_jwk()
            keys = [{**one, "kid": f"k{i}"} for i in range(150)]
            return web.json_response({"keys": keys})
        if mode == "deeply_nested":
            return web.Response(body=b'{"keys": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                                content_type="application/json")
        if mode == "nan":
            return web.Response(body=b'{"keys": NaN}', content_type="application/json")
        if mode == "duplicate_keys_member":
            return web.Response(body=b'{"keys": [], "keys": ' + good[9:],
                                content_type="application/json")
        if mode == "server_error":
            return web.Response(status=500, text="oops")
        if mode == "empty_keys":
            return web.json_response({"keys": []})
        if mode == "not_utf8":
            return web.Response(body=b"\xff\xfe\x00", content_type="application/json")
        if mode == "truncated":
            return web.Response(body=good[: len(good) // 2], content_type="application/json")
        if mode == "hang":          # past jwks_timeout; released when the test ends
            await self.release.wait()
            return web.Response(status=500)
        if mode == "gate":
            self.gated.set()
            await self.release.wait()
            return web.Response(body=good, content_type="application/json")
        raise AssertionError(mode)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{p:.*}", self.handle)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.pki.server_cert, self.pki.server_key)
        self.url = await self.serve(app, ctx)


@pytest.fixture
async def hostile(pki: Pki, issuer: Issuer) -> Any:
    server = HostileJwks(pki, issuer)
    await server.start()
    yield server
    server.release.set()
    await server.stop()


async def _gateway(make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream,
                   hostile: HostileJwks, **provider: Any) -> RunningGateway:
    config = base_config(pki, issuer, upstream)
    config["providers"]["corp"].update(jwks_uri=f"{hostile.url}/jwks.json",
                                       jwks_timeout="1s", jwks_refetch_cooldown=0, **provider)
    return await make_gateway(config)


BROKEN = ["redirect_same_host", "redirect_http", "html", "json_as_text_plain", "huge",
          "too_many_keys", "deeply_nested", "nan", "duplicate_keys_member", "server_error",
          "empty_keys", "not_utf8", "truncated", "hang"]


@pytest.mark.parametrize("mode", BROKEN)
async def test_broken_jwks_cold_is_503_and_nothing_forwarded(
        make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream,
        hostile: HostileJwks, mode: str) -> None:
    hostile.mode = mode
    gw = await _gateway(make_gateway, pki, issuer, upstream, hostile)
    assert not gw.server.gateway.ready
    reply = await gw.request("/x", token=issuer.mint(pki.clients["a"].thumbprint))
    assert reply.status == 503, reply.body
    assert reply.json()["reason"] == "jwks_unavailable"
    assert upstream.seen == []
    assert "/elsewhere" not in hostile.hits   # redirects are never followed


@pytest.mark.parametrize("mode", BROKEN)
async def test_broken_jwks_warm_keeps_the_last_good_keys(
        make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream,
        hostile: HostileJwks, mode: str) -> None:
    gw = await _gateway(make_gateway, pki, issuer, upstream, hostile)
    hostile.mode = mode
    # an unknown kid makes the gateway refetch: the broken answer must not replace good keys
    unknown = issuer.mint(pki.clients["a"].thumbprint, headers={"kid": "rotated-away"})
    reply = await gw.request("/x", token=unknown)
    assert reply.status == 401 and reply.json()["reason"] == "unknown_key"
    reply = await gw.request("/x", token=issuer.mint(pki.clients["a"].thumbprint))
    assert reply.status == 200
    assert len(upstream.seen) == 1


async def test_jwk_set_json_content_type_is_accepted(make_gateway: Any, pki: Pki,
                                                     issuer: Issuer, upstream: Upstream,
                                                     hostile: HostileJwks) -> None:
    hostile.mode = "jwk_set_json"
    gw = await _gateway(make_gateway, pki, issuer, upstream, hostile)
    reply = await gw.request("/x", token=issuer.mint(pki.clients["a"].thumbprint))
    assert reply.status == 200


async def test_jwks_arriving_in_pieces_is_read_whole(make_gateway: Any, pki: Pki,
                                                     issuer: Issuer, upstream: Upstream,
                                                     hostile: HostileJwks) -> None:
    hostile.mode = "in_pieces"
    gw = await _gateway(make_gateway, pki, issuer, upstream, hostile)
    reply = await gw.request("/x", token=issuer.mint(pki.clients["a"].thumbprint))
    assert reply.status == 200, reply.body
    assert len(upstream.seen) == 1


async def test_a_slow_jwks_fetch_never_blocks_requests_with_known_keys(
        make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream,
        hostile: HostileJwks) -> None:
    gw = await _gateway(make_gateway, pki, issuer, upstream, hostile)
    hostile.mode = "gate"   # the next fetch hangs until the test releases it
    tp = pki.clients["a"].thumbprint
    waiting = asyncio.create_task(gw.request("/x", token=issuer.mint(tp, headers={"kid": "new"})))
    await hostile.gated.wait()      # the refetch for the unknown kid has reached the server
    reply = await gw.request("/x", token=issuer.mint(tp))
    assert reply.status == 200
    assert not waiting.done()       # the known-key request went past the hanging fetch
    hostile.release.set()
    assert (await waiting).status == 401
    assert len(upstream.seen) == 1


async def test_only_the_configured_jwks_uri_is_fetched(make_gateway: Any, pki: Pki,
                                                       issuer: Issuer, upstream: Upstream,
                                                       hostile: HostileJwks) -> None:
    gw = await _gateway(make_gateway, pki, issuer, upstream, hostile)
    tp = pki.clients["a"].thumbprint
    for header in ({"jku": f"{hostile.url}/elsewhere", "kid": "a"},
                   {"x5u": f"{hostile.url}/elsewhere", "kid": "b"}):
        reply = await gw.request("/x", token=issuer.mint(tp, headers=header))
        assert reply.status == 401
    assert set(hostile.hits) == {"/jwks.json"}
    assert upstream.seen == []
