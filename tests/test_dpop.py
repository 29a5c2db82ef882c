"""mtls_gateway.dpop: every RFC 9449 proof check refused on its own, with real keys and
signatures; URI normalisation; nonces; the replay cache on the memory and Redis stores."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from dpop_client import DpopKey, RedisServer, b64url
from mtls_gateway.config import DpopConfig
from mtls_gateway.dpop import (
    DPOP_REASONS,
    DpopInvalidToken,
    DpopStoreDown,
    DpopVerifier,
    InvalidDpopProof,
    MemoryReplayStore,
    NonceIssuer,
    ProofRequest,
    RedisReplayStore,
    ReplayStoreUnavailable,
    UseDpopNonce,
    access_token_hash,
    authorization_scheme,
    dpop_refusal,
    jwk_thumbprint,
    normalize_uri,
)
from mtls_gateway.errors import AuthChallenge, Refusal
from mtls_gateway.refusal import render

NOW = 1_800_000_000.0
URL = "https://api.example.com/accounts/1"
TOKEN = "access-token-123"
SECRET = b"n" * 32


class Clock:
    """A controllable clock: tests never race the wall clock."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def keys() -> dict[str, DpopKey]:
    return {alg: DpopKey.generate(alg) for alg in ("ES256", "ES384", "RS256", "PS256",
                                                   "EdDSA")}


def _request(method: str = "GET", target: str = "/accounts/1?x=1",
             host: str | None = "api.example.com", token: str = TOKEN) -> ProofRequest:
    return ProofRequest(method=method, target=target, host=host, scheme="https",
                        access_token=token)


def _verifier(clock: Clock | None = None, **overrides: Any) -> DpopVerifier:
    config = replace(DpopConfig(nonce_secret=SECRET), **overrides)
    clock = clock or Clock()
    return DpopVerifier(config, clock=clock, monotonic=clock)


def _raw(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"sig") -> str:
    return ".".join((b64url(json.dumps(header).encode()), b64url(json.dumps(claims).encode()),
                     b64url(signature)))


async def _check(verifier: DpopVerifier, proof: str | list[str], *, jkt: str | None,
                 request: ProofRequest | None = None, nonce: bool = False) -> Any:
    values = [proof] if isinstance(proof, str) else proof
    return await verifier.check(values, request or _request(), expected_jkt=jkt,
                                nonce_required=nonce)


# --- the happy path, every key type ------------------------------------------------------

@pytest.mark.parametrize("alg", ["ES256", "ES384", "RS256", "PS256", "EdDSA"])
async def test_valid_proof_is_accepted(keys: dict[str, DpopKey], alg: str) -> None:
    key = keys[alg]
    verifier = _verifier()
    proof = key.proof("GET", URL, TOKEN, iat=NOW)
    result = await _check(verifier, proof, jkt=key.thumbprint)
    assert result.jkt == key.thumbprint
    assert result.next_nonce is None


def test_rfc_vectors() -> None:
    """RFC 9449 section 4.2 / 6.1 (jkt of the example key) and 7.1 (ath of the example)."""
    jwk = {"kty": "EC", "x": "l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs",
           "y": "9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA", "crv": "P-256"}
    assert jwk_thumbprint(jwk) == "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
    assert access_token_hash("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU") == \
        "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"


@pytest.mark.parametrize("alg", ["ES256", "RS256", "EdDSA"])
def test_thumbprint_matches_an_independent_computation(keys: dict[str, DpopKey],
                                                       alg: str) -> None:
    jwk = {**keys[alg].public_jwk, "kid": "extra", "use": "sig"}   # extra members ignored
    assert jwk_thumbprint(jwk) == keys[alg].thumbprint


# --- each check refused on its own -------------------------------------------------------

def _sign(key: DpopKey, **kw: Any) -> str:
    return key.proof("GET", URL, TOKEN, **{"iat": NOW, **kw})


def _flip_signature(proof: str) -> str:
    head, body, sig = proof.split(".")
    return f"{head}.{body}.{sig[:-4]}{'AAAA' if sig[-4:] != 'AAAA' else 'BBBB'}"


def _noncanonical(proof: str) -> str:
    """Same bytes, but the last base64url character of the payload carries stray bits."""
    head, body, sig = proof.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    if len(body) % 4 in (2, 3):
        last = alphabet.index(body[-1])
        body = body[:-1] + alphabet[last | 1]
    return f"{head}.{body}.{sig}"


def _cases(es: DpopKey, other: DpopKey, rsa: DpopKey) -> list[tuple[str, Any, str]]:
    """(name, proof or list of DPoP header values, expected reason)."""
    good = _sign(es)
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": es.public_jwk}
    claims = {"jti": "j", "htm": "GET", "htu": URL, "iat": NOW,
              "ath": access_token_hash(TOKEN)}
    p384 = DpopKey.generate("ES384")
    return [
        ("no header", [], "dpop_proof_missing"),
        ("two headers", [good, _sign(es)], "dpop_proof_invalid"),
        ("two segments", good.rsplit(".", 1)[0], "dpop_proof_invalid"),
        ("four segments", good + ".x", "dpop_proof_invalid"),
        ("padding", good + "=", "dpop_proof_invalid"),
        ("non-canonical base64url", _noncanonical(good), "dpop_proof_invalid"),
        ("payload not JSON", _raw(header, claims).split(".")[0] + "." + b64url(b"{x") + ".AA",
         "dpop_proof_invalid"),
        ("duplicate claim", b64url(json.dumps(header).encode()) + "."
         + b64url(b'{"jti":"a","jti":"b"}') + ".AA", "dpop_proof_invalid"),
        ("too large", _sign(es, claims={"pad": "x" * 9000}), "dpop_proof_invalid"),
        ("typ JWT", _sign(es, header={"typ": "JWT"}), "dpop_proof_invalid"),
        ("typ missing", _sign(es, header={"typ": None}), "dpop_proof_invalid"),
        ("crit", _sign(es, header={"crit": ["exp"]}), "dpop_proof_invalid"),
        ("alg none", _raw({**header, "alg": "none"}, claims), "dpop_alg_not_allowed"),
        ("empty signature", _raw(header, claims, b""), "dpop_proof_invalid"),
        ("alg HS256", _raw({**header, "alg": "HS256"}, claims), "dpop_alg_not_allowed"),
        ("alg not on the allowlist", _sign(rsa), "dpop_alg_not_allowed"),
        ("jwk missing", _sign(es, header={"jwk": None}), "dpop_proof_invalid"),
        ("jwk private", _sign(es, header={"jwk": es.private_jwk}), "dpop_proof_invalid"),
        ("jwk symmetric", _raw({**header, "jwk": {"kty": "oct", "k": "c2VjcmV0"}}, claims),
         "dpop_proof_invalid"),
        ("jwk of another type than alg", _sign(es, header={"jwk": rsa.public_jwk}),
         "dpop_proof_invalid"),
        ("jwk of another curve than alg", _raw({**header, "jwk": p384.public_jwk}, claims),
         "dpop_proof_invalid"),
        ("jwk not on the curve", _sign(es, header={"jwk": {**es.public_jwk,
                                                           "y": other.public_jwk["y"]}}),
         "dpop_proof_invalid"),
        ("signed by another key", _sign(es, signer=other), "dpop_proof_invalid"),
        ("signature altered", _flip_signature(good), "dpop_proof_invalid"),
        ("jti missing", _sign(es, drop=("jti",)), "dpop_proof_invalid"),
        ("jti not a string", _sign(es, claims={"jti": 7}), "dpop_proof_invalid"),
        ("htm missing", _sign(es, drop=("htm",)), "dpop_proof_invalid"),
        ("htu missing", _sign(es, drop=("htu",)), "dpop_proof_invalid"),
        ("iat missing", _sign(es, drop=("iat",)), "dpop_proof_invalid"),
        ("iat a string", _sign(es, claims={"iat": str(int(NOW))}), "dpop_proof_invalid"),
        ("htm POST", _sign(es, claims={"htm": "POST"}), "dpop_htm_mismatch"),
        ("htm lower case", _sign(es, claims={"htm": "get"}), "dpop_htm_mismatch"),
        ("htu other host", _sign(es, claims={"htu": "https://evil.example.com/accounts/1"}),
         "dpop_htu_mismatch"),
        ("htu other path", _sign(es, claims={"htu": "https://api.example.com/accounts/2"}),
         "dpop_htu_mismatch"),
        ("htu http", _sign(es, claims={"htu": "http://api.example.com/accounts/1"}),
         "dpop_htu_mismatch"),
        ("htu other port", _sign(es, claims={"htu": "https://api.example.com:8443/accounts/1"}),
         "dpop_htu_mismatch"),
        ("htu relative", _sign(es, claims={"htu": "/accounts/1"}), "dpop_htu_mismatch"),
        ("htu with userinfo", _sign(es, claims={"htu": "https://u@api.example.com/accounts/1"}),
         "dpop_htu_mismatch"),
        ("iat too old", _sign(es, iat=NOW - 61), "dpop_proof_expired"),
        ("iat in the future", _sign(es, iat=NOW + 6), "dpop_iat_in_future"),
        ("ath missing", _sign(es, drop=("ath",)), "dpop_ath_mismatch"),
        ("ath of another token", _sign(es, claims={"ath": access_token_hash("other")}),
         "dpop_ath_mismatch"),
    ]


_CASE_NAMES = [c[0] for c in _cases(DpopKey.generate(), DpopKey.generate(),
                                    DpopKey.generate("RS256"))]


@pytest.fixture(scope="module")
def cases(keys: dict[str, DpopKey]) -> dict[str, tuple[Any, str]]:
    other = DpopKey.generate("ES256")
    return {name: (proof, reason) for name, proof, reason
            in _cases(keys["ES256"], other, keys["RS256"])}


@pytest.mark.parametrize("name", _CASE_NAMES)
async def test_each_check_refused_on_its_own(keys: dict[str, DpopKey],
                                             cases: dict[str, tuple[Any, str]],
                                             name: str) -> None:
    proof, reason = cases[name]
    verifier = _verifier(algorithms=("ES256", "ES384", "PS256", "EdDSA"))  # not RS256
    with pytest.raises(Refusal) as info:
        await _check(verifier, proof, jkt=keys["ES256"].thumbprint)
    assert info.value.reason == reason
    assert info.value.status == 401
    assert info.value.error == DPOP_REASONS[reason].error == "invalid_dpop_proof" \
        or reason == "dpop_nonce_required"


async def test_window_edges_are_inclusive(keys: dict[str, DpopKey]) -> None:
    es, verifier = keys["ES256"], _verifier()
    for iat in (NOW - 60, NOW + 5):
        await _check(verifier, _sign(es, iat=iat), jkt=es.thumbprint)


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
async def test_a_small_rsa_key_is_refused() -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa
    small = DpopKey(rsa.generate_private_key(public_exponent=65537, key_size=1024), "RS256")
    with pytest.raises(InvalidDpopProof) as info:
        await _check(_verifier(), _sign(small), jkt=small.thumbprint)
    assert info.value.reason == "dpop_proof_invalid"


@pytest.mark.parametrize(("expected", "reason", "cls"), [
    ("other", "dpop_jkt_mismatch", DpopInvalidToken),
    (None, "dpop_binding_missing", DpopInvalidToken),
])
async def test_key_binding(keys: dict[str, DpopKey], expected: str | None, reason: str,
                           cls: type[Refusal]) -> None:
    with pytest.raises(cls) as info:
        await _check(_verifier(), _sign(keys["ES256"]), jkt=expected)
    assert info.value.reason == reason
    assert info.value.error == "invalid_token"


# --- htu: what the client addressed, normalised ------------------------------------------

@pytest.mark.parametrize(("htu", "target", "host"), [
    ("https://api.example.com/accounts/1", "/accounts/1", "api.example.com"),
    ("HTTPS://API.EXAMPLE.COM/accounts/1", "/accounts/1", "api.example.com"),
    ("https://api.example.com:443/accounts/1", "/accounts/1", "API.example.com:443"),
    ("https://api.example.com/accounts/1?a=b#frag", "/accounts/1?c=d", "api.example.com"),
    ("https://api.example.com/x/../accounts/./1", "/accounts/1", "api.example.com"),
    ("https://api.example.com/accounts/1", "/x/../accounts/1", "api.example.com"),
    ("https://api.example.com/accounts/%7euser", "/accounts/~user", "api.example.com"),
    ("https://api.example.com/accounts/%2f", "/accounts/%2F", "api.example.com"),
    ("https://api.example.com/", "/", "api.example.com"),
    ("https://api.example.com", "/", "api.example.com"),
    ("https://api.example.com/accounts/1", "https://api.example.com/accounts/1",
     "api.example.com"),
])
async def test_htu_normalisation_accepts(keys: dict[str, DpopKey], htu: str, target: str,
                                         host: str) -> None:
    es = keys["ES256"]
    proof = es.proof("GET", htu, TOKEN, iat=NOW)
    await _check(_verifier(), proof, jkt=es.thumbprint, request=_request(target=target,
                                                                         host=host))


@pytest.mark.parametrize(("htu", "target", "host"), [
    ("https://api.example.com/accounts/%2f", "/accounts//", "api.example.com"),  # %2F is data
    ("https://api.example.com/Accounts/1", "/accounts/1", "api.example.com"),   # path case
    ("https://api.example.com/accounts/1", "/accounts/1", None),                 # no Host
    ("https://api.example.com/accounts/1", "/accounts/1", "api.example.com:8443"),
])
async def test_htu_normalisation_refuses(keys: dict[str, DpopKey], htu: str, target: str,
                                         host: str | None) -> None:
    es = keys["ES256"]
    with pytest.raises(InvalidDpopProof) as info:
        await _check(_verifier(), es.proof("GET", htu, TOKEN, iat=NOW), jkt=es.thumbprint,
                     request=_request(target=target, host=host))
    assert info.value.reason == "dpop_htu_mismatch"


async def test_external_origins_replace_the_host_header(keys: dict[str, DpopKey]) -> None:
    """Behind a load balancer: the configured origin counts, the Host header does not."""
    es = keys["ES256"]
    verifier = _verifier(external_origins=("https://api.example.com",
                                           "https://API.example.org:443/"))
    internal = _request(host="gateway.internal:8443")
    for origin in ("https://api.example.com", "https://api.example.org"):
        await _check(verifier, es.proof("GET", origin + "/accounts/1", TOKEN, iat=NOW),
                     jkt=es.thumbprint, request=internal)
    with pytest.raises(InvalidDpopProof) as info:
        await _check(verifier, es.proof("GET", "https://gateway.internal:8443/accounts/1",
                                        TOKEN, iat=NOW), jkt=es.thumbprint, request=internal)
    assert info.value.reason == "dpop_htu_mismatch"


@pytest.mark.parametrize(("uri", "expected"), [
    ("HTTPS://API.Example.COM:443/a/./b/../c%7e%2f?x#y", ("https://api.example.com",
                                                          "/a/c~%2F")),
    ("http://h:80", ("http://h", "/")),
    ("https://h:08443/%41", ("https://h:8443", "/A")),
    ("https://[::1]:8443/x", ("https://[::1]:8443", "/x")),
    ("https://h/a/b/..", ("https://h", "/a/")),
    ("https://u@h/", None),
    ("ftp://h/", None),
    ("https:///x", None),
    ("https://h/a b", None),
    ("https://h/\u00e9", None),
])
def test_normalize_uri(uri: str, expected: tuple[str, str] | None) -> None:
    assert normalize_uri(uri) == expected


# --- nonces ------------------------------------------------------------------------------

def test_nonce_windows() -> None:
    clock = Clock(NOW)
    issuer = NonceIssuer(SECRET, 300, clock)
    first = issuer.current()
    assert issuer.check(first) is True
    clock.now += 300                                  # next window: still accepted, stale
    assert issuer.check(first) is False
    assert issuer.current() != first
    clock.now += 300                                  # two windows on: refused
    assert issuer.check(first) is None
    assert NonceIssuer(b"x" * 32, 300, clock).check(issuer.current()) is None  # other secret
    with pytest.raises(ValueError):
        NonceIssuer(b"short", 300, clock)


async def test_nonce_flow(keys: dict[str, DpopKey]) -> None:
    es, clock = keys["ES256"], Clock()
    verifier = _verifier(clock)
    with pytest.raises(UseDpopNonce) as info:         # no nonce: told to use one
        await _check(verifier, _sign(es), jkt=es.thumbprint, nonce=True)
    assert info.value.reason == "dpop_nonce_required"
    nonce = info.value.nonce
    assert nonce and nonce == verifier.nonces.current()  # type: ignore[union-attr]
    with pytest.raises(UseDpopNonce):                 # a made-up nonce: the same
        await _check(verifier, _sign(es, nonce="made-up"), jkt=es.thumbprint, nonce=True)
    ok = await _check(verifier, _sign(es, nonce=nonce), jkt=es.thumbprint, nonce=True)
    assert ok.next_nonce is None
    clock.now += 300                                  # the previous window: accepted ...
    stale = await _check(verifier, es.proof("GET", URL, TOKEN, iat=clock.now, nonce=nonce),
                         jkt=es.thumbprint, nonce=True)
    assert stale.next_nonce == verifier.nonces.current() != nonce  # type: ignore[union-attr]
    clock.now += 300                                  # ... two on: refused, with a new one
    with pytest.raises(UseDpopNonce) as info:
        await _check(verifier, es.proof("GET", URL, TOKEN, iat=clock.now, nonce=nonce),
                     jkt=es.thumbprint, nonce=True)
    assert info.value.nonce == verifier.nonces.current()  # type: ignore[union-attr]


async def test_fresh_nonce_only_where_the_route_uses_nonces(keys: dict[str, DpopKey]) -> None:
    """RFC 9449 s8.2: last window's nonce earns the current one on a nonce route only."""
    es, clock = keys["ES256"], Clock()
    verifier = _verifier(clock)
    assert verifier.nonces is not None
    nonce = verifier.nonces.current()
    clock.now += 300
    without = await _check(verifier, es.proof("GET", URL, TOKEN, iat=clock.now, nonce=nonce),
                           jkt=es.thumbprint, nonce=False)
    assert without.next_nonce is None
    with_ = await _check(verifier, es.proof("GET", URL, TOKEN, iat=clock.now, nonce=nonce),
                         jkt=es.thumbprint, nonce=True)
    assert with_.next_nonce == verifier.nonces.current() != nonce


# --- the replay cache --------------------------------------------------------------------

@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(params=["memory", "redis"])
async def store_config(request: pytest.FixtureRequest) -> AsyncIterator[DpopConfig]:
    if request.param == "memory":
        yield DpopConfig(nonce_secret=SECRET)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        yield DpopConfig(nonce_secret=SECRET, replay_store=server.url)


async def test_replay_is_refused_on_both_stores(keys: dict[str, DpopKey],
                                                store_config: DpopConfig) -> None:
    es, clock = keys["ES256"], Clock()
    verifier = DpopVerifier(store_config, clock=clock, monotonic=clock)
    try:
        proof = _sign(es, jti="unique-" + store_config.replay_store + str(time.time()))
        await _check(verifier, proof, jkt=es.thumbprint)
        with pytest.raises(InvalidDpopProof) as info:
            await _check(verifier, proof, jkt=es.thumbprint)
        assert info.value.reason == "dpop_replayed"
        # Another key may use the same jti: the cache is keyed by (jkt, jti).
        other = keys["EdDSA"]
        await _check(verifier, other.proof("GET", URL, TOKEN, iat=NOW,
                                           jti=json.loads(_payload(proof))["jti"]),
                     jkt=other.thumbprint)
        # A refused proof never consumes its jti.
        fresh_jti = "refused-first-" + str(time.time())
        with pytest.raises(DpopInvalidToken):
            await _check(verifier, _sign(es, jti=fresh_jti), jkt="someone-else")
        await _check(verifier, _sign(es, jti=fresh_jti), jkt=es.thumbprint)
    finally:
        await verifier.store.close()


def _payload(proof: str) -> bytes:
    import base64
    body = proof.split(".")[1]
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


async def test_memory_store_forgets_after_the_window_and_refuses_when_full() -> None:
    clock = Clock(0.0)
    store = MemoryReplayStore(maxsize=2, ttl=65, clock=clock)
    assert await store.first_use(b"a", 65) is True
    assert await store.first_use(b"a", 65) is False
    assert await store.first_use(b"b", 65) is True
    with pytest.raises(ReplayStoreUnavailable):       # full of live entries: fail closed
        await store.first_use(b"c", 65)
    assert await store.first_use(b"a", 65) is False  # and nothing was forgotten
    clock.now = 66.0                                  # the window has passed
    assert await store.first_use(b"c", 65) is True
    assert await store.first_use(b"a", 65) is True


async def test_redis_store_sets_the_expiry(redis_server: RedisServer) -> None:
    store = RedisReplayStore(redis_server.url, timeout=1.0)
    key = f"k{time.time()}".encode()
    try:
        assert await store.first_use(key, 65) is True
        assert await store.first_use(key, 65) is False
        pttl = await store._client.pttl(RedisReplayStore._PREFIX + key)
        assert 60_000 < pttl <= 65_000
    finally:
        await store.close()


async def test_redis_down_fails_closed(keys: dict[str, DpopKey],
                                       tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    es, clock = keys["ES256"], Clock()
    verifier = DpopVerifier(DpopConfig(replay_store=server.url, replay_store_timeout=0.5),
                            clock=clock, monotonic=clock)
    try:
        await _check(verifier, _sign(es), jkt=es.thumbprint)
        server.stop()
        started = time.monotonic()
        with pytest.raises(DpopStoreDown) as info:
            await _check(verifier, _sign(es), jkt=es.thumbprint)
        assert info.value.status == 503
        assert info.value.reason == "dpop_replay_store_unavailable"
        assert time.monotonic() - started < 5          # no retry loop, no long wait
    finally:
        await verifier.store.close()
        server.stop()


async def test_redis_unreachable_from_the_start_fails_closed(keys: dict[str, DpopKey]) -> None:
    from dpop_client import _free_port
    es, clock = keys["ES256"], Clock()
    verifier = DpopVerifier(DpopConfig(replay_store=f"redis://127.0.0.1:{_free_port()}/0",
                                       replay_store_timeout=0.5), clock=clock, monotonic=clock)
    try:
        with pytest.raises(DpopStoreDown):
            await asyncio.wait_for(_check(verifier, _sign(es), jkt=es.thumbprint), 10)
    finally:
        await verifier.store.close()


# --- refusals and challenges -------------------------------------------------------------

@pytest.mark.parametrize("reason", sorted(DPOP_REASONS))
def test_every_reason_builds_its_refusal(reason: str) -> None:
    entry = DPOP_REASONS[reason]
    refusal = dpop_refusal(reason, nonce="n1")
    assert (refusal.status, refusal.error, refusal.reason) == (entry.status, entry.error,
                                                              reason)
    assert refusal.description == entry.description
    assert '"' not in entry.description and "\\" not in entry.description


@pytest.mark.parametrize(("reason", "bearer", "error_in", "expected"), [
    ("dpop_jkt_mismatch", False, "dpop",
     ['DPoP realm="api", error="invalid_token", error_description="token is bound to a '
      'different DPoP key", algs="ES256 PS256"']),
    ("dpop_proof_missing", True, "dpop",
     ['Bearer realm="api"', 'DPoP realm="api", error="invalid_dpop_proof", '
      'error_description="a DPoP proof is required with this token", algs="ES256 PS256"']),
])
def test_dpop_refusals_render_a_dpop_challenge(reason: str, bearer: bool, error_in: Any,
                                               expected: list[str]) -> None:
    """RFC 9449 section 7.1, through the one renderer (mtls_gateway.refusal)."""
    refusal = dpop_refusal(reason)
    refusal.challenge = AuthChallenge(("ES256", "PS256"), bearer, error_in)
    rendered = render(refusal, "api")
    assert rendered.status == 401
    assert [v for k, v in rendered.headers if k == "WWW-Authenticate"] == expected
    assert json.loads(rendered.body)["reason"] == reason


def test_nonce_refusal_renders_dpop_nonce() -> None:
    refusal = dpop_refusal("dpop_nonce_required", nonce="n-1")
    refusal.challenge = AuthChallenge(("ES256",), False, "dpop", "n-1")
    headers = render(refusal, "api").headers
    assert ("DPoP-Nonce", "n-1") in headers
    assert ("WWW-Authenticate", 'DPoP realm="api", error="use_dpop_nonce", error_description='
            '"resource server requires a fresh nonce in the DPoP proof", algs="ES256"') in headers


@pytest.mark.parametrize(("value", "expected"), [
    ("DPoP abc.def-ghi", ("dpop", "abc.def-ghi")),
    ("dpop abc", ("dpop", "abc")),
    ("Bearer abc", ("bearer", "abc")),
    ("DPoP a b", ("dpop", "")),
    ("DPoP ", ("dpop", "")),
    ("Basic abc", None),
    ("DPoPabc", None),
])
def test_authorization_scheme(value: str, expected: tuple[str, str] | None) -> None:
    assert authorization_scheme(value) == expected
