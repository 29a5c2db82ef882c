"""``mtls-gateway explain`` answers what the running gateway answers (explain.py).

Every refusal reason explain can predict is one row: the same request (real certificates,
real signed tokens, real DPoP proofs) goes to ``explain`` and to a real gateway on a
mutual-TLS socket, lane on and off, and status, reason and ``WWW-Authenticate`` must be the
same. The CLI's exit codes, ``--json``, stdin and ``--offline`` are checked on a config with
inline keys.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa

from dpop_client import DpopKey
from gwtest import (
    GatewayFactory,
    Issuer,
    Pki,
    Upstream,
    base_config,
)
from mtls_gateway.cli import main
from mtls_gateway.config_load import load_config
from mtls_gateway.explain import explain, peer_from_pem


@pytest.fixture(params=[True, False], ids=["lane", "aiohttp"])
def fast_lane(request: pytest.FixtureRequest) -> bool:
    value: bool = request.param
    return value


def _config(pki: Pki, issuer: Issuer, upstream: Upstream) -> dict[str, Any]:
    config = base_config(pki, issuer, upstream)
    config["routes"] = [
        {"name": "public", "path_prefix": "/public", "auth": "none"},
        {"name": "api", "path_prefix": "/api", "auth": {"provider": "corp"}},
        {"name": "scoped", "path_prefix": "/scoped",
         "auth": {"provider": "corp", "scopes": ["accounts:write"]}},
        {"name": "dpop", "path_prefix": "/dpop",
         "auth": {"provider": "corp", "sender_constraint": "dpop"}},
    ]
    return config


@dataclass
class Ctx:
    issuer: Issuer
    pki: Pki
    key: DpopKey          # the client's DPoP key
    url: str              # the gateway's base URL (a DPoP proof's htu)


def _foreign_signature(c: Ctx) -> str:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(c.issuer.claims(c.pki.clients["a"].thumbprint), other,
                      algorithm="RS256", headers={"kid": "rsa-1", "typ": "at+jwt"})


def _dpop_token(c: Ctx) -> str:
    return c.issuer.mint(None, cnf={"jkt": c.key.thumbprint})


Token = Callable[[Ctx], str | None]
A = "a"

#: id -> (path, client certificate, token, scheme, proof(ctx, token) or None, reason)
CASES: dict[str, tuple[str, str | None, Token, str, Any, str]] = {
    "allowed": ("/api/x", A, lambda c: c.issuer.mint(c.pki.clients["a"].thumbprint),
                "Bearer", None, "allowed"),
    "public_route": ("/public/x", None, lambda c: None, "Bearer", None, "public_route"),
    "no_route": ("/nowhere", A, lambda c: c.issuer.mint(c.pki.clients["a"].thumbprint),
                 "Bearer", None, "no_route"),
    "no_token": ("/api/x", A, lambda c: None, "Bearer", None, "no_token"),
    "malformed_authorization": ("/api/x", A, lambda c: "not a token!", "Bearer", None,
                                "malformed_authorization"),
    "token_malformed": ("/api/x", A, lambda c: "not-a-jwt", "Bearer", None,
                        "token_malformed"),
    "token_expired": ("/api/x", A, lambda c: c.issuer.mint(
        c.pki.clients["a"].thumbprint, exp=int(time.time()) - 3600), "Bearer", None,
        "token_expired"),
    "token_not_yet_valid": ("/api/x", A, lambda c: c.issuer.mint(
        c.pki.clients["a"].thumbprint, nbf=int(time.time()) + 3600), "Bearer", None,
        "token_not_yet_valid"),
    "wrong_issuer": ("/api/x", A, lambda c: c.issuer.mint(
        c.pki.clients["a"].thumbprint, iss="https://evil.test"), "Bearer", None,
        "wrong_issuer"),
    "wrong_audience": ("/api/x", A, lambda c: c.issuer.mint(
        c.pki.clients["a"].thumbprint, aud="https://other.test"), "Bearer", None,
        "wrong_audience"),
    "bad_signature": ("/api/x", A, _foreign_signature, "Bearer", None, "bad_signature"),
    "unknown_key": ("/api/x", A, lambda c: jwt.encode(
        c.issuer.claims(c.pki.clients["a"].thumbprint), c.issuer.key("rsa-1").private,
        algorithm="RS256", headers={"kid": "ghost", "typ": "at+jwt"}), "Bearer", None,
        "unknown_key"),
    "alg_not_allowed": ("/api/x", A, lambda c: jwt.encode(
        c.issuer.claims(c.pki.clients["a"].thumbprint), c.issuer.key("rsa-1").private,
        algorithm="PS256", headers={"kid": "rsa-1", "typ": "at+jwt"}), "Bearer", None,
        "alg_not_allowed"),
    "wrong_typ": ("/api/x", A, lambda c: c.issuer.mint(
        c.pki.clients["a"].thumbprint, headers={"typ": "dpop+jwt"}), "Bearer", None,
        "wrong_typ"),
    "missing_claim": ("/api/x", A, lambda c: c.issuer.mint(
        c.pki.clients["a"].thumbprint, aud=None), "Bearer", None, "missing_claim"),
    "no_client_cert": ("/api/x", None, lambda c: c.issuer.mint(
        c.pki.clients["a"].thumbprint), "Bearer", None, "no_client_cert"),
    "binding_missing": ("/api/x", A, lambda c: c.issuer.mint(None), "Bearer", None,
                        "binding_missing"),
    "binding_mismatch": ("/api/x", A, lambda c: c.issuer.mint(
        c.pki.clients["b"].thumbprint), "Bearer", None, "binding_mismatch"),
    "insufficient_scope": ("/scoped/x", A, lambda c: c.issuer.mint(
        c.pki.clients["a"].thumbprint), "Bearer", None, "insufficient_scope"),
    "dpop_allowed": ("/dpop/x", A, _dpop_token, "DPoP",
                     lambda c, t: c.key.proof("GET", c.url + "/dpop/x", t), "allowed"),
    "dpop_proof_missing": ("/dpop/x", A, _dpop_token, "DPoP", None, "dpop_proof_missing"),
    "dpop_bearer_downgrade": ("/dpop/x", A, _dpop_token, "Bearer", None,
                              "dpop_bearer_downgrade"),
    "dpop_jkt_mismatch": ("/dpop/x", A, _dpop_token, "DPoP", lambda c, t: DpopKey.generate(
        ).proof("GET", c.url + "/dpop/x", t), "dpop_jkt_mismatch"),
    "dpop_htm_mismatch": ("/dpop/x", A, _dpop_token, "DPoP",
                          lambda c, t: c.key.proof("POST", c.url + "/dpop/x", t),
                          "dpop_htm_mismatch"),
    "dpop_htu_mismatch": ("/dpop/x", A, _dpop_token, "DPoP",
                          lambda c, t: c.key.proof("GET", c.url + "/dpop/elsewhere", t),
                          "dpop_htu_mismatch"),
    "dpop_binding_missing": ("/dpop/x", A, lambda c: c.issuer.mint(
        c.pki.clients["a"].thumbprint), "DPoP",
        lambda c, t: c.key.proof("GET", c.url + "/dpop/x", t), "dpop_binding_missing"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_explain_answers_what_the_gateway_answers(
        case: str, make_gateway: GatewayFactory, pki: Pki, issuer: Issuer,
        upstream: Upstream) -> None:
    path, cert, make_token, scheme, make_proof, reason = CASES[case]
    gw = await make_gateway(_config(pki, issuer, upstream))
    ctx = Ctx(issuer, pki, DpopKey.generate(), gw.url)
    token = make_token(ctx)
    headers: list[tuple[str, str]] = []
    if token is not None:
        headers.append(("Authorization", f"{scheme} {token}"))
    proof_for_explain = proof_for_gateway = None
    if make_proof is not None:
        assert token is not None
        proof_for_explain, proof_for_gateway = make_proof(ctx, token), make_proof(ctx, token)
        headers.append(("DPoP", proof_for_gateway))

    explained = await explain(
        load_config(gw.config_path), "GET", path, token=token, scheme=scheme,
        dpop_proof=proof_for_explain, host=gw.url.removeprefix("https://"),
        peer=peer_from_pem(pki.clients[cert].cert.read_bytes()) if cert else None)
    reply = await gw.request(path, cert=cert, headers=headers)

    assert reply.status == explained.status, (reply.body, explained)
    assert explained.reason == reason
    if reply.status < 400:
        assert len(upstream.seen) == 1          # (explain itself sent nothing upstream)
        assert explained.exit_code == 0
    else:
        assert reply.json()["reason"] == reason
        assert upstream.seen == []
        assert explained.exit_code == 1
    assert reply.headers.getall("WWW-Authenticate", []) == explained.www_authenticate
    steps = [c.step for c in explained.checks]
    if reason not in ("no_route",):
        assert steps[0] == "route"
    if reason.startswith(("allowed", "public")):
        assert all(c.verdict != "fail" for c in explained.checks), explained.checks
    else:
        assert explained.checks[-1].verdict == "fail"
        assert explained.checks[-1].values["reason"] == reason
    if token is not None:
        assert token not in explained.as_json()


@pytest.mark.parametrize("fast_lane", [True], ids=["lane"])
async def test_every_check_is_listed_with_the_values_compared(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream) -> None:
    gw = await make_gateway(_config(pki, issuer, upstream))
    expired = issuer.mint(pki.clients["a"].thumbprint, exp=int(time.time()) - 3600)
    out = await explain(load_config(gw.config_path), "GET", "/api/x", token=expired,
                        peer=peer_from_pem(pki.clients["a"].cert.read_bytes()))
    checks = {c.step: c for c in out.checks}
    assert checks["header"].values["alg"] == "RS256" and checks["header"].values["kid"] == "rsa-1"
    assert checks["signature"].verdict == "pass"
    assert checks["exp"].verdict == "fail" and checks["exp"].values["exp"] < time.time()
    assert checks["exp"].values["leeway"] == load_config(gw.config_path).providers[
        "corp"].leeway
    assert out.checks[-1].values["token_cnf"] == "x5t#S256"

    good = issuer.mint(pki.clients["a"].thumbprint)
    out = await explain(load_config(gw.config_path), "GET", "/scoped/x", token=good,
                        peer=peer_from_pem(pki.clients["a"].cert.read_bytes()))
    checks = {c.step: c for c in out.checks}
    assert [checks[s].verdict for s in ("signature", "exp", "nbf", "iss", "aud")] == ["pass"] * 5
    assert checks["iss"].values == {"token": "https://issuer.test",
                                    "expected": "https://issuer.test"}
    assert checks["sender_constraint"].values["token_x5t_s256"] == \
        checks["sender_constraint"].values["certificate_x5t_s256"] == pki.clients["a"].thumbprint
    assert out.checks[-1].values["expected_scope"] == ["accounts:write"]
    assert out.reason == "insufficient_scope"


# --- the command line: inline keys, no network ---------------------------------------------

@pytest.fixture
def inline(pki: Pki, issuer: Issuer, upstream: Upstream, tmp_path: Path) -> Path:
    """A config whose provider has its keys inline (``issuer`` only mints here)."""
    config = _config(pki, issuer, upstream)
    corp = config["providers"]["corp"]
    del corp["jwks_uri"], corp["jwks_ca_file"], corp["jwks_refetch_cooldown"]
    corp["jwks"] = {"keys": [k.public_jwk() for k in issuer.keys]}
    config["providers"]["remote"] = {
        "type": "jwt", "issuer": "https://remote.test", "audiences": ["https://api.test"],
        "algorithms": ["RS256"], "jwks_uri": "https://127.0.0.1:9/jwks.json"}
    config["routes"].append({"name": "remote", "path_prefix": "/remote",
                             "auth": {"provider": "remote"}})
    path = tmp_path / "inline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_exit_codes_json_and_stdin(inline: Path, pki: Pki, issuer: Issuer,
                                       capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    good = issuer.mint(pki.clients["a"].thumbprint)
    base = ["explain", "--config", str(inline), "--cert", str(pki.clients["a"].cert)]
    assert main([*base, "--token", good, "GET", "/api/x"]) == 0
    text = capsys.readouterr().out
    assert "answer    200 allowed" in text and "[pass] signature" in text
    assert good not in text and good.split(".")[2] not in text

    import io
    monkeypatch.setattr("sys.stdin", io.StringIO(issuer.mint(pki.clients["b"].thumbprint)))
    assert main([*base, "--token-file", "-", "--json", "GET", "/api/x"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert (doc["status"], doc["reason"], doc["allowed"]) == (401, "binding_mismatch", False)
    assert doc["www_authenticate"][0].startswith('Bearer realm="')

    # keys that cannot be fetched: the gateway's own answer, 503 jwks_unavailable
    remote = issuer.mint(pki.clients["a"].thumbprint, iss="https://remote.test")
    assert main([*base, "--token", remote, "GET", "/remote/x"]) == 1
    assert "answer    503 jwks_unavailable" in capsys.readouterr().out
    assert main([*base, "GET", "/nowhere"]) == 1
    assert "answer    404 no_route" in capsys.readouterr().out
    assert main(["explain", "--config", str(inline), "--cert", "/nonexistent.pem",
                 "GET", "/api/x"]) == 2
    assert main(["explain", "--config", str(inline.parent / "missing.yaml"),
                 "GET", "/api/x"]) == 2


def test_offline_says_which_checks_it_could_not_make(
        inline: Path, pki: Pki, issuer: Issuer, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["explain", "--config", str(inline), "--cert", str(pki.clients["a"].cert),
            "--offline"]
    # inline keys: decided offline too
    assert main([*base, "--token", issuer.mint(pki.clients["a"].thumbprint),
                 "GET", "/api/x"]) == 0
    capsys.readouterr()
    # keys behind jwks_uri: the header is checked, the rest is said to be not checked
    token = issuer.mint(pki.clients["a"].thumbprint, iss="https://remote.test")
    assert main([*base, "--token", token, "GET", "/remote/x"]) == 3
    out = capsys.readouterr().out
    assert "[pass       ] header" in out
    assert "undetermined offline" in out and "https://127.0.0.1:9/jwks.json" in out
    # a refusal that needs no keys is still decided
    assert main([*base, "--token", issuer.mint(pki.clients["a"].thumbprint, iss="x",
                                                headers={"typ": "dpop+jwt"}),
                 "GET", "/remote/x"]) == 1
    assert "answer    401 wrong_typ" in capsys.readouterr().out


def test_a_token_endpoint_is_a_usage_error(pki: Pki, upstream: Upstream, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    config = base_config(pki, None, upstream)
    config["client_registries"] = {"partners": {"clients": [], "ca_file": str(pki.ca_file)}}
    config["routes"] = [{"name": "token", "path": "/token", "methods": ["POST"],
                         "auth": {"mtls_client": {"registry": "partners"}}}]
    path = tmp_path / "token.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["explain", "--config", str(path), "POST", "/token"]) == 2
    assert "token endpoint" in capsys.readouterr().err
