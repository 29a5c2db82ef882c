"""Deny lines say what was wrong (token_summary.py, Pipeline.refusal_facts).

Through a real gateway, lane on and off: each refusal kind's decision line carries the
token's safe summary and what was expected, allow lines carry none of it, and neither the
token, its signature nor a claim outside the summary appears anywhere in the log output.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from introspection_server import AuthServer, introspection_config

from dpop_client import DpopKey
from gwtest import AUDIENCE, ISSUER, GatewayFactory, Issuer, Pki, Upstream, base_config
from mtls_gateway.token_summary import token_summary


@pytest.fixture(params=[True, False], ids=["lane", "aiohttp"])
def fast_lane(request: pytest.FixtureRequest) -> bool:
    value: bool = request.param
    return value


SECRET_CLAIM = "hunter2-never-logged"


def _config(pki: Pki, issuer: Issuer, upstream: Upstream) -> dict[str, Any]:
    config = base_config(pki, issuer, upstream)
    config["routes"] = [
        {"name": "api", "path_prefix": "/api", "auth": {"provider": "corp"}},
        {"name": "scoped", "path_prefix": "/scoped",
         "auth": {"provider": "corp", "scopes": ["accounts:write", "accounts:read"]}},
        {"name": "dpop", "path_prefix": "/dpop",
         "auth": {"provider": "corp", "sender_constraint": "dpop"}},
    ]
    return config


Mint = Callable[[Issuer, Pki, DpopKey], str]
A = "a"


def _thumb(pki: Pki, name: str) -> str:
    return pki.clients[name].thumbprint


#: id -> (path, token, dpop proof?, reason, expected log fields (callable of pki, key))
CASES: dict[str, tuple[str, Mint, bool, str, Callable[[Pki, DpopKey], dict[str, Any]]]] = {
    "wrong_issuer": ("/api/x", lambda i, p, k: i.mint(_thumb(p, A), iss="https://evil.test"),
                     False, "wrong_issuer",
                     lambda p, k: {"token_iss": "https://evil.test", "expected_iss": ISSUER,
                                   "token_cnf": "x5t#S256"}),
    "wrong_audience": ("/api/x", lambda i, p, k: i.mint(_thumb(p, A), aud=["x", "y"]), False,
                       "wrong_audience",
                       lambda p, k: {"token_aud": ["x", "y"], "expected_aud": [AUDIENCE]}),
    "insufficient_scope": ("/scoped/x", lambda i, p, k: i.mint(_thumb(p, A)), False,
                           "insufficient_scope",
                           lambda p, k: {"expected_scope": ["accounts:write", "accounts:read"],
                                         "token_scope": ["accounts:read"]}),
    "binding_mismatch": ("/api/x", lambda i, p, k: i.mint(_thumb(p, "b")), False,
                         "binding_mismatch",
                         lambda p, k: {"token_cnf": "x5t#S256",
                                       "token_cnf_thumbprint": _thumb(p, "b"),
                                       "expected_thumbprint": _thumb(p, A)}),
    "binding_missing": ("/api/x", lambda i, p, k: i.mint(None), False, "binding_missing",
                        lambda p, k: {"token_cnf": "none", "expected_thumbprint": _thumb(p, A),
                                      "token_client_id": "client-a"}),
    "token_expired": ("/api/x", lambda i, p, k: i.mint(_thumb(p, A), exp=1_000_000_000),
                      False, "token_expired",
                      lambda p, k: {"token_exp": 1_000_000_000, "token_alg": "RS256",
                                    "token_kid": "rsa-1", "token_typ": "at+jwt"}),
    "alg_not_allowed": ("/api/x", lambda i, p, k: jwt.encode(
        i.claims(_thumb(p, A)), i.key("rsa-1").private, algorithm="PS256",
        headers={"kid": "rsa-1"}), False, "alg_not_allowed",
        lambda p, k: {"token_alg": "PS256", "expected_alg": ["RS256", "ES256"]}),
    "unknown_key": ("/api/x", lambda i, p, k: jwt.encode(
        i.claims(_thumb(p, A)), i.key("rsa-1").private, algorithm="RS256",
        headers={"kid": "ghost", "typ": "at+jwt"}), False, "unknown_key",
        lambda p, k: {"token_kid": "ghost", "expected_kid": ["ec-1 (ES256)", "rsa-1 (RS256)"]}),
    "wrong_typ": ("/api/x", lambda i, p, k: i.mint(_thumb(p, A), headers={"typ": "JOSE"}),
                  False, "wrong_typ",
                  lambda p, k: {"token_typ": "JOSE", "expected_typ": ["at+jwt", "jwt",
                                                                      "(none)"]}),
    "dpop_jkt_mismatch": ("/dpop/x", lambda i, p, k: i.mint(
        None, cnf={"jkt": "bm90LXRoZS1wcm9vZi1rZXk"}), True, "dpop_jkt_mismatch",
        lambda p, k: {"token_cnf": "jkt", "expected_jkt": "bm90LXRoZS1wcm9vZi1rZXk",
                      "dpop_proof_jkt": k.thumbprint}),
    "token_malformed": ("/api/x", lambda i, p, k: "not-a-jwt", False, "token_malformed",
                        lambda p, k: {"token_format": "opaque", "token_cnf": "none"}),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_a_deny_line_says_what_was_wrong_and_what_was_expected(
        case: str, make_gateway: GatewayFactory, pki: Pki, issuer: Issuer,
        upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    path, mint, with_proof, reason, expected = CASES[case]
    gw = await make_gateway(_config(pki, issuer, upstream))
    key = DpopKey.generate()
    token = mint(issuer, pki, key)
    headers = [("Authorization", f"{'DPoP' if with_proof else 'Bearer'} {token}")]
    if with_proof:
        headers.append(("DPoP", key.proof("GET", gw.url + path, token)))
    reply = await gw.request(path, cert=A, headers=headers)
    assert (reply.status, reply.json()["reason"]) == (401 if reason != "insufficient_scope"
                                                      else 403, reason)
    assert upstream.seen == []
    line = [r.decision for r in caplog.records if hasattr(r, "decision")][-1]
    assert line["decision"] == "deny" and line["reason"] == reason
    for name, value in expected(pki, key).items():
        assert line[name] == value, (name, line)
    assert token not in caplog.text
    if token.count(".") == 2:
        assert token.split(".")[2] not in caplog.text       # the signature
        assert line["token_format"] == "jwt"


async def test_allow_lines_stay_as_they_are(make_gateway: GatewayFactory, pki: Pki,
                                            issuer: Issuer, upstream: Upstream,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mtls_gateway.access")
    gw = await make_gateway(_config(pki, issuer, upstream))
    reply = await gw.request("/api/x", cert=A, token=issuer.mint(_thumb(pki, A)))
    assert reply.status == 200
    line = caplog.records[-1].decision  # type: ignore[attr-defined]
    assert line["decision"] == "allow"
    assert not [k for k in line if k.startswith(("token_", "expected_"))
                and k != "token_hash"], line


async def test_claims_outside_the_summary_are_never_logged(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    gw = await make_gateway(_config(pki, issuer, upstream))
    token = issuer.mint(_thumb(pki, "b"), password=SECRET_CLAIM, sub=SECRET_CLAIM + "-sub")
    reply = await gw.request("/api/x", cert=A, token=token)
    assert reply.json()["reason"] == "binding_mismatch"
    assert SECRET_CLAIM not in caplog.text
    assert token.split(".")[2] not in caplog.text


@pytest.mark.parametrize(("answer", "reason"), [
    (b'{"error": "unsupported_token_type"}', "token_unknown"),
    (b'{"error": "invalid_request"}', "token_malformed"),
])
async def test_a_string_introspection_refuses_is_named_for_what_it_is(
        answer: bytes, reason: str, make_gateway: GatewayFactory, pki: Pki,
        upstream: Upstream, auth_server: AuthServer, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Not a JWT, and the introspection endpoint refuses it (400): not token_inactive."""
    caplog.set_level(logging.INFO, "mtls_gateway.access")
    gw = await make_gateway(introspection_config(pki, None, upstream, auth_server, tmp_path))
    auth_server.body, auth_server.status = answer, 400
    reply = await gw.request("/x", cert=A, token="definitely-not-a-jwt")
    assert (reply.status, reply.json()["reason"]) == (401, reason)
    assert upstream.seen == [] and auth_server.calls == 1
    line = caplog.records[-1].decision  # type: ignore[attr-defined]
    assert (line["reason"], line["token_format"]) == (reason, "opaque")
    assert "definitely-not-a-jwt" not in caplog.text


async def test_an_opaque_token_is_summarised_from_its_verdict(
        make_gateway: GatewayFactory, pki: Pki, upstream: Upstream, auth_server: AuthServer,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mtls_gateway.access")
    gw = await make_gateway(introspection_config(pki, None, upstream, auth_server, tmp_path))
    token = auth_server.issue(_thumb(pki, "b"))
    reply = await gw.request("/x", cert=A, token=token)
    assert reply.json()["reason"] == "binding_mismatch"
    line = caplog.records[-1].decision  # type: ignore[attr-defined]
    assert line["token_format"] == "opaque" and line["token_client_id"] == "client-a"
    assert line["token_cnf_thumbprint"] == _thumb(pki, "b")
    assert line["expected_thumbprint"] == _thumb(pki, A)
    assert token not in caplog.text


@pytest.mark.parametrize(("token", "fields"), [
    ("a.b.c", {"token_format": "opaque", "token_cnf": "none"}),
    ("opaque", {"token_format": "opaque", "token_cnf": "none"}),
])
def test_summary_of_strings_that_are_not_jwts(token: str, fields: dict[str, Any]) -> None:
    assert token_summary(token, None) == fields


def test_long_and_odd_values_are_bounded() -> None:
    token = jwt.encode({"iss": "x" * 5000, "aud": [str(i) for i in range(50)],
                        "client_id": {"nested": "secret"}, "exp": time.time()},
                       "k" * 32, algorithm="HS256", headers={"kid": "k"})
    out = token_summary(token, None)
    assert isinstance(out["token_iss"], str) and len(out["token_iss"]) <= 203
    assert isinstance(out["token_aud"], list) and len(out["token_aud"]) == 9
    assert out["token_client_id"] == "<dict>"


async def test_a_connection_refused_again_with_the_same_token_is_summarised_once(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The summary is remembered with the connection's credential: every deny line still
    carries it whole (and what was expected), it is decoded once."""
    from mtls_gateway import pipeline

    calls: list[str] = []

    def counting(token: str, info: Any) -> dict[str, object]:
        calls.append(token)
        return token_summary(token, info)

    monkeypatch.setattr(pipeline, "token_summary", counting)
    caplog.set_level(logging.INFO, "mtls_gateway.access")
    gw = await make_gateway(_config(pki, issuer, upstream))
    token = issuer.mint(_thumb(pki, "b"))
    connector = aiohttp.TCPConnector(ssl=pki.client_context(A), limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(3):
            async with session.get(gw.url + "/api/x",
                                   headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 401
                await resp.read()
    lines = [r.decision for r in caplog.records if hasattr(r, "decision")]  # type: ignore[attr-defined]
    assert [line["reason"] for line in lines] == ["binding_mismatch"] * 3
    facts = [{k: v for k, v in line.items() if k.startswith(("token_", "expected_"))}
             for line in lines]
    assert facts[0]["token_cnf"] == "x5t#S256" and "expected_thumbprint" in facts[0]
    assert facts[1] == facts[0] and facts[2] == facts[0]
    assert len(calls) == 1
    assert upstream.seen == []
