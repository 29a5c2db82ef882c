"""Property-based fuzzing (Hypothesis): nothing an attacker sends gets through or crashes.

Invariants, for every generated input:

* only the gateway's own refusals come out (``Refusal`` subclasses, ``ValueError`` for
  parsers), never another exception;
* a token is accepted only if an independent oracle agrees it should be (signed by the
  issuer, allowed alg and typ, exact iss, our aud, numeric exp in the future...);
* through the real gateway: no 5xx other than 502/503/504, and the upstream receives
  nothing unless the request was valid.

The default run is small so the suite stays fast. The long run (README, SECURITY.md):

    HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest -p no:cacheprovider tests/test_fuzz.py

``FUZZ_EXAMPLES`` sets the examples per property of the long profile (default 20000).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml
from aiohttp.http_parser import HttpRequestParser, HttpResponseParser
from cryptography.x509 import load_der_x509_certificate
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy
from test_jwt_hardening import sign_raw

from gwtest import AUDIENCE, ISSUER, Issuer, Pki, Upstream, base_config
from mtls_gateway.answer import HOP_BY_HOP_BYTES, AnswerReader, BadAnswer
from mtls_gateway.app import GatewayServer
from mtls_gateway.bearer import bearer_token
from mtls_gateway.cert_headers import (
    CertHeaderError,
    encode_client_cert,
    parse_client_cert,
    parse_client_cert_chain,
    parse_pem_header,
    parse_xfcc,
    xfcc_client,
)
from mtls_gateway.config import CacheConfig, IntrospectionProvider, PathMatch, Route
from mtls_gateway.config_load import load_config, load_config_text
from mtls_gateway.errors import DependencyDown, InvalidRequest, InvalidToken, NoRoute
from mtls_gateway.fastlane import parse_plain
from mtls_gateway.introspection import IntrospectionVerifier, _BadAnswer
from mtls_gateway.jwks import KeySet
from mtls_gateway.jwt_verifier import JwtVerifier
from mtls_gateway.routing import Router
from mtls_gateway.strict_json import loads_object

T = TypeVar("T")

_COMMON = {"deadline": None, "print_blob": True,
           "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture]}
# The default suite explores the same examples every run (no flaky CI); the long run explores
# new ones each time.
settings.register_profile("fuzz-default", max_examples=40, derandomize=True,
                          **_COMMON)  # type: ignore[arg-type]
settings.register_profile("long", max_examples=int(os.environ.get("FUZZ_EXAMPLES", "20000")),
                          derandomize=False, **_COMMON)  # type: ignore[arg-type]
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fuzz-default"))
LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
#: end-to-end properties cost a TLS handshake per example: a tenth of the unit examples
E2E = settings(max_examples=max(10, settings().max_examples // 10))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --- strategies -------------------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4)
                           | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)
NOW = int(time.time())
numeric_dates = (st.integers(NOW - 10**6, NOW + 10**6) | st.floats(NOW - 1e6, NOW + 1e6)
                 | st.integers() | json_values)
headers = st.fixed_dictionaries(
    {"alg": st.sampled_from(["RS256", "ES256", "PS256", "HS256", "none", "RS512", "rs256"])
     | json_values},
    optional={"kid": st.sampled_from(["rsa-1", "ec-1", "", "RSA-1"]) | json_values,
              "typ": st.sampled_from(["at+jwt", "JWT", "application/at+jwt", "dpop+jwt", ""])
              | json_values,
              "crit": json_values, "cty": json_values, "b64": st.booleans(),
              "zip": st.just("DEF"), "jku": st.just("https://evil.test/jwks"),
              "jwk": json_values, "x5c": json_values})
payloads = st.fixed_dictionaries(
    {},
    optional={"iss": st.sampled_from([ISSUER, ISSUER + "/", ISSUER.upper(), ISSUER[:-1]])
              | json_values,
              "aud": st.sampled_from([AUDIENCE, [AUDIENCE], ["x", AUDIENCE], AUDIENCE + "/", []])
              | json_values,
              "exp": numeric_dates, "nbf": numeric_dates, "iat": numeric_dates,
              "sub": json_values, "scope": st.sampled_from(["accounts:read", ""]) | json_values,
              "cnf": json_values})


# Mostly-valid tokens with a few members changed, so that acceptance is exercised too.
_BASE_HEADER = {"alg": "RS256", "kid": "rsa-1", "typ": "at+jwt"}
_BASE_PAYLOAD = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "iat": NOW - 7200,
                 "exp": NOW + 7200, "scope": "accounts:read", "cnf": {"x5t#S256": "TP"}}
near_headers = st.dictionaries(st.sampled_from([*sorted(_BASE_HEADER), "crit", "cty", "jku"]),
                               json_values | st.sampled_from(["RS256", "JWT", "rsa-1"]),
                               max_size=2).map(lambda d: {**_BASE_HEADER, **d})
near_payloads = st.dictionaries(st.sampled_from([*sorted(_BASE_PAYLOAD), "nbf"]),
                                numeric_dates | st.sampled_from([ISSUER, AUDIENCE]),
                                max_size=2).map(lambda d: {**_BASE_PAYLOAD, **d})
any_headers = headers | near_headers | st.just(_BASE_HEADER)
any_payloads = payloads | near_payloads | st.just(_BASE_PAYLOAD)


def _ok_date(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and abs(value) < 2**53


def oracle_accepts(header: dict[str, Any], payload: dict[str, Any]) -> bool:
    """Independent statement of what a correctly signed RS256 token needs to be accepted."""
    typ = header.get("typ")
    aud = payload.get("aud")
    return (header.get("alg") == "RS256" and header.get("kid", "rsa-1") == "rsa-1"
            and not {"crit", "cty", "zip", "b64"} & header.keys()
            and (typ is None or (isinstance(typ, str) and typ.lower() in
                                 ("at+jwt", "application/at+jwt", "jwt", "application/jwt")))
            and payload.get("iss") == ISSUER
            and (aud == AUDIENCE or (isinstance(aud, list) and AUDIENCE in aud
                                     and all(isinstance(a, str) for a in aud)))
            and _ok_date(payload.get("exp")) and payload["exp"] + 30 >= time.time()
            and all(_ok_date(payload[n]) for n in ("nbf", "iat") if n in payload)
            and payload.get("nbf", 0) <= time.time() + 30
            and payload.get("iat", 0) <= time.time() + 30
            and _members_ok(payload))


def _near_a_boundary(payload: dict[str, Any]) -> bool:
    """A date within an hour of the start +/- leeway: its verdict depends on when it is
    checked. Measured from NOW (fixed at import) so that a replayed example is excluded or
    not exactly as the first time (Hypothesis refuses flaky assumptions)."""
    return any(_ok_date(payload.get(n)) and min(abs(payload[n] - (NOW + 30)),
                                                abs(payload[n] - (NOW - 30))) < 3600
               for n in ("exp", "nbf", "iat"))


def _members_ok(payload: dict[str, Any]) -> bool:
    """What tokeninfo.py requires of the members the gateway reads itself."""
    scope, cnf = payload.get("scope"), payload.get("cnf")
    scope_ok = scope is None or isinstance(scope, str) or (
        isinstance(scope, list) and all(isinstance(s, str) for s in scope))
    cnf_ok = cnf is None or (isinstance(cnf, dict) and (
        "x5t#S256" not in cnf or cnf["x5t#S256"] is None
        or (isinstance(cnf["x5t#S256"], str) and cnf["x5t#S256"] != "")))
    strings_ok = all(isinstance(payload[n], str) for n in ("sub", "jti") if n in payload)
    return scope_ok and cnf_ok and strings_ok


# --- a static JWT verifier (no network) -------------------------------------------------------

@pytest.fixture(scope="module")
def signer(pki: Pki, rsa_keys: Any) -> Issuer:
    return Issuer(pki, rsa_keys)     # keys and claims only; its server is never started


@pytest.fixture(scope="module")
def verifier(signer: Issuer) -> JwtVerifier:
    config = load_config_text(yaml.safe_dump({
        "listen": {"cert_file": str(signer.pki.server_cert),
                   "key_file": str(signer.pki.server_key),
                   "client_ca_file": str(signer.pki.ca_file)},
        "providers": {"corp": {"type": "jwt", "issuer": ISSUER, "audiences": [AUDIENCE],
                               "algorithms": ["RS256", "ES256"],
                               "jwks": {"keys": [k.public_jwk() for k in signer.keys]},
                               "verify_cache_size": 0}},
        "upstream": {"url": "http://127.0.0.1:1"},
        "routes": [{"path_prefix": "/", "auth": {"provider": "corp"}}]}),
        base_dir=Path("."))
    provider = config.providers["corp"]
    assert provider.kind == "jwt"
    return JwtVerifier(provider)


def _verify(verifier: JwtVerifier, token: str) -> Any:
    async def go() -> Any:
        return await verifier.verify(token, hashlib.sha256(token.encode()).digest())
    return asyncio.run(go())


@given(header=any_headers, payload=any_payloads)
def test_signed_tokens_are_accepted_only_when_the_oracle_agrees(
        verifier: JwtVerifier, signer: Issuer, header: dict[str, Any],
        payload: dict[str, Any]) -> None:
    try:
        token = sign_raw(signer.key("rsa-1").private, "RS256", header, payload)
    except (TypeError, ValueError):   # not JSON-serialisable: nothing to send
        assume(False)
        return
    assume(not _near_a_boundary(payload))
    try:
        _verify(verifier, token)
        accepted = True
    except (InvalidToken, DependencyDown):
        accepted = False
    event("accepted" if accepted else "refused")   # shown by --hypothesis-show-statistics
    assert accepted == oracle_accepts(header, payload), (header, payload)


@given(text=st.text(max_size=300) | st.from_regex(r"[A-Za-z0-9_\-.=]{0,400}", fullmatch=True))
def test_arbitrary_token_strings_are_refused_cleanly(verifier: JwtVerifier, text: str) -> None:
    with pytest.raises((InvalidToken, DependencyDown)):
        _verify(verifier, text)


@given(header=json_values, payload=json_values, sig=st.binary(max_size=300),
       extra_dots=st.integers(0, 4))
def test_structured_forgeries_are_refused(verifier: JwtVerifier, header: Any, payload: Any,
                                          sig: bytes, extra_dots: int) -> None:
    token = ".".join([_b64(json.dumps(header).encode()), _b64(json.dumps(payload).encode()),
                      _b64(sig)] + ["x"] * extra_dots)
    with pytest.raises((InvalidToken, DependencyDown)):
        _verify(verifier, token)


@given(data=st.data())
def test_mutated_valid_tokens_never_verify_with_other_claims(
        verifier: JwtVerifier, signer: Issuer, data: st.DataObject) -> None:
    valid = signer.mint("tp")
    pos = data.draw(st.integers(0, len(valid) - 1))
    op = data.draw(st.sampled_from(["replace", "delete", "insert", "truncate"]))
    char = data.draw(st.sampled_from("AZaz09-_.=+/ \x00"))
    mutated = {"replace": valid[:pos] + char + valid[pos + 1:],
               "delete": valid[:pos] + valid[pos + 1:],
               "insert": valid[:pos] + char + valid[pos:],
               "truncate": valid[:pos]}[op]
    assume(mutated != valid)
    try:
        _verify(verifier, mutated)
    except (InvalidToken, DependencyDown):
        return
    # base64url's spare bits: the same bytes under another spelling, so the same claims
    assert mutated.split(".")[:2] == valid.split(".")[:2]


# --- parsers of untrusted documents -----------------------------------------------------------

@given(body=st.binary(max_size=400) | json_values.map(lambda v: json.dumps(v).encode()))
def test_strict_json_raises_only_value_error(body: bytes) -> None:
    with contextlib.suppress(ValueError):
        assert isinstance(loads_object(body), dict)


jwk_members = st.fixed_dictionaries(
    {"kty": st.sampled_from(["RSA", "EC", "OKP", "oct", "rsa"]) | json_values},
    optional={"kid": json_values, "alg": st.sampled_from(["RS256", "ES256", "HS256", "none"])
              | json_values, "use": st.sampled_from(["sig", "enc"]) | json_values,
              "key_ops": json_values, "crv": st.sampled_from(["P-256", "P-384", "Ed25519"])
              | json_values, "n": st.text(max_size=40) | json_values,
              "e": st.sampled_from(["AQAB", "Aw"]) | json_values, "x": st.text(max_size=50),
              "y": st.text(max_size=50), "d": st.text(max_size=10), "k": st.text(max_size=10)})


@given(keys=st.lists(jwk_members | json_values, max_size=6), real=st.booleans(),
       doc_shape=st.sampled_from(["object", "list", "keys_object"]))
def test_jwks_documents_yield_only_public_asymmetric_keys(
        signer: Issuer, keys: list[Any], real: bool, doc_shape: str) -> None:
    if real:
        keys = [*keys, signer.key("rsa-1").public_jwk()]
    doc: Any = {"keys": keys} if doc_shape == "object" else keys if doc_shape == "list" \
        else {"keys": {"a": keys}}
    try:
        keyset = KeySet.from_document(doc, ("RS256", "ES256", "EdDSA"))
    except ValueError:
        assert not (real and doc_shape == "object" and len(keys) <= 100)
        return
    for (kid, alg), key in keyset.by_kid.items():
        assert alg in ("RS256", "ES256", "EdDSA") and isinstance(kid, str)
        assert hasattr(key.key, "verify")          # a public key object, never a secret
        assert not hasattr(key.key, "private_bytes")


def _introspection_verifier() -> IntrospectionVerifier:
    return IntrospectionVerifier(IntrospectionProvider(
        name="opaque", endpoint="https://as.test/i", client_id="gw",
        auth_method="client_secret_basic", client_secret="s", client_cert_file=None,
        client_key_file=None, ca_file=None, timeout=1.0, issuer="https://as.test",
        audiences=("https://api.test",), leeway=30.0, cache=CacheConfig(10, 60.0, 10.0),
        failure_threshold=5, failure_cooldown=5.0))


introspection_bodies = st.fixed_dictionaries(
    {"active": st.booleans() | json_values},
    optional={"exp": numeric_dates, "nbf": numeric_dates, "iat": numeric_dates,
              "iss": st.just("https://as.test") | json_values,
              "aud": st.just("https://api.test") | json_values,
              "scope": json_values, "cnf": json_values, "sub": json_values})


@given(body=introspection_bodies.map(lambda d: json.dumps(d).encode())
       | st.binary(max_size=300),
       content_type=st.sampled_from(["application/json", "application/token+json",
                                     "text/html", "text/plain", ""]))
def test_introspection_answers_pass_only_when_active_and_well_formed(
        body: bytes, content_type: str) -> None:
    verifier = _introspection_verifier()
    try:
        info = verifier._check(verifier._parse(body, content_type))
    except (InvalidToken, DependencyDown, _BadAnswer):   # _BadAnswer: 401 token_inactive
        return
    doc = json.loads(body)
    assert doc["active"] is True and content_type.endswith("json")
    assert doc.get("iss") == "https://as.test"
    assert info.provider == "opaque"


@given(value=st.text(max_size=120) | st.sampled_from(["Bearer", "bearer ", "Bearer  x",
                                                     "Bearer x=y", "Basic abc"]),
       second=st.none() | st.text(max_size=20), query=st.booleans())
def test_authorization_headers_parse_or_refuse(value: str, second: str | None,
                                               query: bool) -> None:
    headers = CIMultiDict([("Authorization", value)])
    if second is not None:
        headers.add("authorization", second)
    params = MultiDict([("access_token", "x")] if query else [])
    try:
        token = bearer_token(CIMultiDictProxy(headers), MultiDictProxy(params))
    except InvalidRequest:
        return
    assert second is None and not query
    assert token is None or (token and " " not in token and token in value)


ROUTER = Router([Route("admin", PathMatch("prefix", "/admin"), None, None, None),  # type: ignore[arg-type]
                 Route("rest", PathMatch("prefix", "/"), None, None, None)])  # type: ignore[arg-type]


@given(path=st.text(max_size=40), raw=st.text(max_size=40))
def test_routing_refuses_or_matches_a_normal_path(path: str, raw: str) -> None:
    try:
        route = ROUTER.match("GET", path, raw)
    except (InvalidRequest, NoRoute):
        return
    assert path.startswith("/") and "//" not in path and ";" not in path
    assert not any(seg in (".", "..") for seg in path.split("/"))
    assert route.name == ("admin" if path == "/admin" or path.startswith("/admin/") else "rest")


# --- the fast lane's parser against aiohttp's (llhttp) -----------------------------------------

_NAMES = [b"Host", b"host", b"Authorization", b"Content-Length", b"Transfer-Encoding",
          b"Connection", b"Upgrade", b"Expect", b"X-A", b"Accept", b"X A", b"X-A ", b"",
          b"X\x00", b"\xc3\xa9"]
_CLEAN = st.text(alphabet="abcxyz019 ,;=-/", max_size=10).map(str.encode)
_VALUES = st.one_of(*[_CLEAN] * 8, st.binary(max_size=8),
                    st.sampled_from([b"close", b"upgrade", b"chunked", b"0", b" x ", b"\tx"]))


def _often(common: bytes, *rare: bytes) -> st.SearchStrategy[bytes]:
    return st.sampled_from([common] * (12 * len(rare)) + list(rare))


@st.composite
def _heads(draw: st.DrawFn) -> bytes:
    """Mostly well-formed request heads with a few wrong bytes in them."""
    method = draw(_often(b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"POST", b"get", b"CONNECT"))
    target = draw(_often(b"/x", b"/", b"/a?b=1", b"/%2e/", b"*", b"http://h/x", b"/x#f",
                         b"/?access_token=t", b"/a;b", b"//x", b"/a b"))
    version = draw(_often(b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.10", b"http/1.1"))
    lines = [draw(_often(b" ", b"  ", b"\t")).join((method, target, version))]
    for name, sep, value, eol in draw(st.lists(st.tuples(
            _often(b"X-A", *_NAMES), _often(b": ", b":", b" :", b":\t", b""), _VALUES,
            _often(b"\r\n", b"\n", b"\r\n ", b"\r")), max_size=6)):
        lines.append(eol + name + sep + value)
    if draw(st.integers(0, 3)):
        lines.append(b"\r\nHost: h")
    return b"".join(lines)


def _aiohttp_parse(data: bytes) -> Any:
    """What aiohttp's server parser (the reference path) makes of ``data``."""

    class _Protocol:
        _reading_paused = False

        def pause_reading(self) -> None: ...

        def resume_reading(self) -> None: ...

    async def parse() -> Any:
        parser = HttpRequestParser(_Protocol(), asyncio.get_running_loop(), 2 ** 16,
                                   max_line_size=8190, max_field_size=8190, max_headers=100)
        return parser.feed_data(data)

    return asyncio.run(parse())


@settings(max_examples=settings().max_examples * 25)    # pure parsing: cheap examples
@given(head=_heads())
def test_fast_lane_takes_only_what_aiohttp_reads_the_same_way(head: bytes) -> None:
    """A head the lane accepts is one aiohttp parses without error into the same single
    bodiless HTTP/1.1 request, same method, target and header fields in the same order:
    the two paths cannot disagree on where a request ends (no smuggling between them)."""
    plain = parse_plain(head, max_headers=100, max_line=8190)
    event("plain" if plain is not None else "not plain")
    if plain is None:
        return
    messages, upgraded, tail = _aiohttp_parse(head + b"\r\n\r\n")
    assert len(messages) == 1 and not upgraded and not tail
    message, payload = messages[0]
    assert (message.method, message.path, tuple(message.version)) == (
        plain.method, plain.raw_path, (1, 1))
    assert not message.chunked and not message.upgrade and payload.at_eof()
    assert [(n.lower(), v) for n, v in message.raw_headers] == [
        (lower, value) for _name, lower, value in plain.headers]
    assert message.headers["Host"] == plain.host


# --- the fast lane's upstream answer reader against aiohttp's client parser (llhttp) ----------

_FIELD_NAMES = [b"Content-Length", b"Transfer-Encoding", b"Connection", b"X-A", b"Date",
                b"Keep-Alive", b"X A", b"", b"\xc3\xa9", b"Server", b"Trailer"]
_FIELD_VALUES = st.one_of(*[_CLEAN] * 6, st.binary(max_size=6), st.sampled_from(
    [b"close", b"keep-alive", b"chunked", b"gzip", b"chunked, gzip", b"0", b"2", b"3",
     b"-1", b"+2", b" 2", b"x-a", b"close, X-A"]))


@st.composite
def _answers(draw: st.DrawFn) -> tuple[str, list[bytes]]:
    """(request method, an upstream answer cut into reads): mostly well-formed answers with
    a few wrong bytes, framed by Content-Length, chunked, or the upstream closing."""
    method = draw(_often(b"GET", b"HEAD")).decode()
    parts = []
    if draw(st.integers(0, 9)) == 0:
        parts.append(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
    version = draw(_often(b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"http/1.1"))
    code = draw(_often(b"200", b"204", b"304", b"404", b"2OO", b"99", b"101", b"1000"))
    reason = draw(_often(b"OK", b"", b"Not OK", b"\x01"))
    lines = [version + b" " + code + (b" " + reason if reason or draw(st.booleans()) else b"")]
    framing = draw(st.sampled_from(["length", "chunked", "close", "none"]))
    body = draw(st.binary(max_size=40))
    if framing == "length":
        length = draw(_often(str(len(body)).encode(), str(len(body) + 1).encode(),
                             str(max(len(body) - 1, 0)).encode(), b"x"))
        lines.append(b"Content-Length: " + length)
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
    for name, sep, value, eol in draw(st.lists(st.tuples(
            _often(b"X-A", *_FIELD_NAMES), _often(b": ", b":", b" :", b":\t"),
            _FIELD_VALUES, _often(b"\r\n", b"\n", b"\r\n ")), max_size=5)):
        lines.append(eol.removeprefix(b"\r\n") + name + sep + value)
    answer = b"\r\n".join(lines) + b"\r\n\r\n"
    if framing == "chunked":
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=3)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        for piece in pieces:
            if piece:
                size = draw(_often(b"%x" % len(piece), b"%X" % len(piece),
                                   b"%x;ext=1" % len(piece), b"%x " % len(piece), b"zz",
                                   b"%x" % (len(piece) + 1)))
                answer += size + b"\r\n" + piece + draw(_often(b"\r\n", b"", b"\n"))
        answer += b"0\r\n" + draw(_often(b"", b"X-T: 1\r\n")) + draw(_often(b"\r\n", b""))
    else:
        answer += body
    answer += draw(_often(b"", b"HTTP/1.1 200 OK\r\n\r\n", b"junk"))
    reads = sorted(set(draw(st.lists(st.integers(1, max(len(answer) - 1, 1)), max_size=4))))
    return method, [answer[a:b] for a, b in zip([0, *reads], [*reads, len(answer)],
                                                 strict=True) if answer[a:b]]


def _dechunk(body: bytes) -> bytes:
    out = b""
    while True:
        size, _, body = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            assert body == b"\r\n"
            return out
        out, body = out + body[:n], body[n + 2:]


def _lane_read(method: str, reads: list[bytes]) -> tuple[int, list[tuple[bytes, bytes]],
                                                          bytes] | None:
    """What the lane relays of ``reads`` followed by the upstream closing: status, fields
    (without those it adds itself) and the body; None: refused (502, or a cut)."""
    reader = AnswerReader(method)
    out = b""
    try:
        for data in reads:
            headless = reader.head is None
            body = reader.feed(data)
            if headless and reader.head is not None:
                out = reader.head + b"\r\n"
            out += body
        out += reader.eof()
    except BadAnswer:
        return None
    assert reader.done and reader.head is not None
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    fields = [tuple(line.split(b": ", 1)) for line in lines[1:]]
    chunked = (b"Transfer-Encoding", b"chunked") in fields
    own = {b"date", b"server", b"transfer-encoding"}
    return (int(lines[0].split(b" ")[1]),
            [(n.lower(), v) for n, v in fields if n.lower() not in own],   # type: ignore[misc]
            _dechunk(body) if chunked else body)


def _aiohttp_read(method: str, reads: list[bytes]) -> tuple[int, list[tuple[bytes, bytes]],
                                                             bytes] | None:
    """The same through aiohttp's client parser, set up as its client sets it up; None: its
    client would raise (502 on the reference path, or a cut)."""

    class _Protocol:
        _reading_paused = False

        def pause_reading(self) -> None: ...

        def resume_reading(self, resume_parser: bool = True) -> None: ...

    async def parse() -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        parser = HttpResponseParser(_Protocol(), asyncio.get_running_loop(), 2 ** 16,
                                    max_line_size=8190, max_field_size=8190, max_headers=128,
                                    response_with_body=method != "HEAD", read_until_eof=True,
                                    auto_decompress=False)
        messages: list[Any] = []
        try:
            for data in reads:
                found, upgraded, _tail = parser.feed_data(data)
                messages += found
                if upgraded:
                    return None
            parser.feed_eof()
        except Exception:
            return None
        final = [(m, p) for m, p in messages if not 100 <= m.code <= 199 or m.code == 101]
        if not final:
            return None
        message, payload = final[0]
        if payload.exception() is not None or not payload.is_eof():
            return None
        body = b""
        while chunk := payload.read_nowait(-1):
            body += chunk
        named = {t.strip().lower() for n, v in message.raw_headers
                 if n.lower() == b"connection" for t in v.split(b",")}
        fields = [(n.lower(), v) for n, v in message.raw_headers
                  if n.lower() not in HOP_BY_HOP_BYTES | named | {b"date", b"server"}]
        return message.code, fields, body

    return asyncio.run(parse())


@settings(max_examples=settings().max_examples * 25)    # pure parsing: cheap examples
@given(case=_answers())
def test_lane_relays_only_answers_aiohttp_reads_the_same_way(
        case: tuple[str, list[bytes]]) -> None:
    """An upstream answer the lane relays whole is one aiohttp's client parser (the aiohttp
    path's) reads without error as the same status, fields and body, however it is cut into
    reads: the lane never passes what the reference path would refuse, nor relays it
    differently. (The lane may refuse more: it is answered 502.)"""
    method, reads = case
    lane = _lane_read(method, reads)
    reference = _aiohttp_read(method, reads)
    event(f"lane {'relays' if lane else 'refuses'}, aiohttp "
          f"{'reads' if reference else 'refuses'}")
    if lane is None:
        return
    assert reference is not None
    status, fields, body = lane
    assert reference == (status, [f for f in fields if f[0] not in (b"date", b"server")],
                         body)


# --- end to end through the real gateway ------------------------------------------------------

class Live:
    """A gateway, issuer and upstream on a private event loop in a thread, so that sync
    Hypothesis tests can drive them."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def live(pki: Pki, rsa_keys: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    env = Live()
    issuer, upstream = Issuer(pki, rsa_keys), Upstream()
    path = tmp_path_factory.mktemp("fuzz") / "gateway.yaml"

    async def start() -> tuple[GatewayServer, aiohttp.ClientSession]:
        await issuer.start()
        await upstream.start()
        path.write_text(yaml.safe_dump(base_config(pki, issuer, upstream)))
        server = GatewayServer(load_config(path))
        await server.start()
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
            ssl=pki.client_context("a"), force_close=True))
        return server, session

    server, session = env.run(start())
    yield env, server, issuer, upstream, session

    async def stop() -> None:
        await session.close()
        await server.stop()
        await upstream.stop()
        await issuer.stop()

    env.run(stop())
    env.stop()


def _send(live: Any, path: str, headers: list[tuple[str, str]]) -> int:
    env, server, _issuer, _upstream, session = live

    async def go() -> int:
        url = f"https://127.0.0.1:{server.port}{path}"
        async with session.get(url, headers=headers) as resp:
            await resp.read()
            return resp.status

    return env.run(go())


def _check_outcome(live: Any, status: int, valid: bool) -> None:
    upstream: Upstream = live[3]
    assert status < 500 or status in (502, 503, 504), status
    if valid:
        assert status == 200 and len(upstream.seen) == 1
    else:
        assert status != 200 and upstream.seen == [], status
    upstream.seen.clear()


def _printable(value: str) -> str:
    return "".join(ch for ch in value if 0x20 <= ord(ch) < 0x7f)


@E2E
@given(token=st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e),
                     min_size=1, max_size=200),
       scheme=st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "DPoP", "Bearer\t"]))
def test_e2e_authorization_values(live: Any, token: str, scheme: str) -> None:
    status = _send(live, "/x", [("Authorization", f"{scheme} {token}")])
    _check_outcome(live, status, valid=False)


@E2E
@given(header=any_headers, payload=any_payloads)
def test_e2e_signed_tokens(live: Any, header: dict[str, Any], payload: dict[str, Any]) -> None:
    issuer: Issuer = live[2]
    if payload.get("cnf") == {"x5t#S256": "TP"}:
        payload = {**payload, "cnf": {"x5t#S256": live_thumbprint(live)}}
    try:
        token = sign_raw(issuer.key("rsa-1").private, "RS256", header, payload)
    except (TypeError, ValueError):
        assume(False)
        return
    assume(len(token) < 7000)        # the test upstream's header line limit
    assume(not _near_a_boundary(payload))
    # the binding is required: only a token bound to client "a" may pass
    valid = oracle_accepts(header, payload) and isinstance(payload.get("cnf"), dict) \
        and payload["cnf"].get("x5t#S256") == live_thumbprint(live)
    status = _send(live, "/x", [("Authorization", f"Bearer {token}")])
    _check_outcome(live, status, valid=valid)


def live_thumbprint(live: Any) -> str:
    return str(live[2].pki.clients["a"].thumbprint)


cert_header_names = st.sampled_from(["X-Forwarded-Client-Cert", "Client-Cert",
                                     "Client-Cert-Chain", "SSL-Client-Cert",
                                     "X-SSL-Client-Cert", "X-Client-Cert-Thumbprint",
                                     "X-Auth-Subject", "Forwarded", "X-Forwarded-For"])


@E2E
@given(names=st.lists(cert_header_names, min_size=1, max_size=4),
       value=st.text(max_size=200).map(_printable), with_token=st.booleans())
def test_e2e_certificate_and_identity_headers_are_never_trusted(
        live: Any, names: list[str], value: str, with_token: bool) -> None:
    """Without a configured front proxy, certificate headers are stripped: they neither
    authorise nor reach the upstream."""
    issuer: Issuer = live[2]
    extra = [(n, value or "x") for n in names]
    token_headers = [("Authorization", f"Bearer {issuer.mint(live_thumbprint(live))}")] \
        if with_token else []
    status = _send(live, "/x", extra + token_headers)
    upstream: Upstream = live[3]
    seen = list(upstream.seen)
    _check_outcome(live, status, valid=with_token)
    if seen:
        forwarded = seen[0].headers
        for name in ("x-forwarded-client-cert", "client-cert", "client-cert-chain",
                     "ssl-client-cert", "x-ssl-client-cert", "forwarded"):
            assert name not in forwarded
        if value:
            assert forwarded.get("x-auth-subject") == ["user-1"]


@E2E
@given(path=st.text(alphabet=st.sampled_from("/.%2fFeE5cC;\\aAdmin0x"), max_size=30))
def test_e2e_paths(live: Any, path: str) -> None:
    status = _send(live, "/" + path, [])
    # no token: nothing may reach the upstream whatever the path ("/public..." is public)
    upstream: Upstream = live[3]
    assert status < 500 or status in (502, 503, 504)
    for seen in upstream.seen:
        assert seen.path_qs.startswith("/public/") or seen.path_qs == "/public" \
            or seen.path_qs.startswith("/public?")
    upstream.seen.clear()



# --- certificate headers from a front proxy (cert_headers.py, header mode end to end) --------

def _cert_der(pki: Pki, name: str = "a") -> bytes:
    return pki.clients[name].der


def _pem(der: bytes) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    return x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM).decode()


def _encodings(der: bytes) -> dict[str, str]:
    from urllib.parse import quote
    pem = _pem(der)
    return {"rfc9440": encode_client_cert(der),
            "xfcc": (f'By=spiffe://x;Hash={hashlib.sha256(der).hexdigest()};'
                     f'Cert="{quote(pem, safe="")}";Subject="CN=x"'),
            "pem": quote(pem, safe="")}


def _mutate(data: st.DataObject, value: str) -> str:
    pos = data.draw(st.integers(0, max(0, len(value) - 1)))
    op = data.draw(st.sampled_from(["replace", "delete", "insert", "truncate", "duplicate",
                                    "none"]))
    char = data.draw(st.sampled_from([*':;,="\\%+/=AZaz09 \t', "%0A", "%00", "\u00e9"]))
    return {"replace": value[:pos] + char + value[pos + 1:],
            "delete": value[:pos] + value[pos + 1:],
            "insert": value[:pos] + char + value[pos:],
            "truncate": value[:pos],
            "duplicate": value + "," + value,
            "none": value}[op]


@given(data=st.data(), fmt=st.sampled_from(["rfc9440", "xfcc", "pem"]))
def test_certificate_header_parsers_return_a_certificate_or_refuse(
        pki: Pki, data: st.DataObject, fmt: str) -> None:
    der = _cert_der(pki)
    value = data.draw(st.just(_encodings(der)[fmt]).map(lambda v: v)
                      | st.text(max_size=200))
    value = _mutate(data, value)
    try:
        if fmt == "rfc9440":
            got: bytes | None = parse_client_cert(value)
        elif fmt == "pem":
            got = parse_pem_header(value)
        else:
            got, digest, _subject = xfcc_client(value)
            if got is not None:
                assert digest == hashlib.sha256(got).hexdigest()
    except CertHeaderError:
        return
    if got is not None:
        load_der_x509_certificate(got)            # a real certificate, in canonical DER
        if got != der:   # a mutation that still parses must be another whole certificate
            assert hashlib.sha256(got).digest() != hashlib.sha256(der).digest()


def _xfcc_text(elements: list[dict[str, str]]) -> str:
    def quoted(v: str) -> str:
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return ",".join(";".join(f"{k}={quoted(v)}" for k, v in el.items()) for el in elements)


xfcc_texts = st.lists(st.dictionaries(
    st.sampled_from(["By", "Hash", "Cert", "Chain", "Subject", "URI", "DNS", "by", "X-y"]),
    st.text(max_size=20), max_size=4), max_size=3).map(_xfcc_text)


@given(value=st.text(max_size=150) | xfcc_texts)
def test_xfcc_parser_parses_or_refuses(value: str) -> None:
    try:
        elements = parse_xfcc(value)
    except CertHeaderError:
        return
    for element in elements:
        for key, values in element.pairs.items():
            assert key == key.lower() and values


@given(value=st.text(max_size=300) | st.lists(st.binary(max_size=60).map(
    lambda b: ":" + base64.b64encode(b).decode() + ":"), max_size=3).map(", ".join))
def test_client_cert_chain_parser_parses_or_refuses(value: str) -> None:
    try:
        chain = parse_client_cert_chain(value)
    except CertHeaderError:
        return
    for der in chain:
        load_der_x509_certificate(der)


@pytest.fixture(scope="module")
def live_header(pki: Pki, rsa_keys: Any, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[Any]:
    """Gateways in header mode (plain HTTP from a trusted proxy at 127.0.0.1), one per
    format, sharing one issuer and one upstream."""
    env = Live()
    issuer, upstream = Issuer(pki, rsa_keys), Upstream()
    folder = tmp_path_factory.mktemp("fuzz-header")

    async def start() -> tuple[dict[str, GatewayServer], aiohttp.ClientSession]:
        await issuer.start()
        await upstream.start()
        servers = {}
        for fmt in ("rfc9440", "xfcc", "pem"):
            config = base_config(pki, issuer, upstream)
            config["listen"]["tls"] = False
            config["listen"]["client_certificate"] = {
                "source": "header", "format": fmt,
                "trusted_proxies": {"cidrs": ["127.0.0.1/32"]}}
            path = folder / f"{fmt}.yaml"
            path.write_text(yaml.safe_dump(config))
            servers[fmt] = GatewayServer(load_config(path))
            await servers[fmt].start()
        return servers, aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))

    servers, session = env.run(start())
    yield env, servers, issuer, upstream, session

    async def stop() -> None:
        await session.close()
        for server in servers.values():
            await server.stop()
        await upstream.stop()
        await issuer.stop()

    env.run(stop())
    env.stop()


_HEADER_NAMES = {"rfc9440": "Client-Cert", "xfcc": "X-Forwarded-Client-Cert",
                 "pem": "X-SSL-Client-Cert"}


@E2E
@given(data=st.data(), fmt=st.sampled_from(["rfc9440", "xfcc", "pem"]),
       cert=st.sampled_from(["a", "b"]))
def test_e2e_header_mode_binds_only_the_stated_certificate(
        live_header: Any, pki: Pki, data: st.DataObject, fmt: str, cert: str) -> None:
    env, servers, issuer, upstream, session = live_header
    value = _mutate(data, _encodings(_cert_der(pki, cert))[fmt])
    token = issuer.mint(pki.clients["a"].thumbprint)

    async def go() -> int:
        url = f"http://127.0.0.1:{servers[fmt].port}/x"
        async with session.get(url, headers=[(_HEADER_NAMES[fmt], value),
                                             ("Authorization", f"Bearer {token}")]) as r:
            await r.read()
            return r.status

    status = env.run(go())
    assert status < 500 or status in (502, 503, 504)
    if status == 200:
        [seen] = upstream.seen
        # the upstream got the request only for client a's own certificate
        assert seen.headers["x-client-cert-thumbprint"] == [pki.clients["a"].thumbprint]
    else:
        assert upstream.seen == []
    upstream.seen.clear()
