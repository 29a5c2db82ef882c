"""Config loading: every problem reported at once with its YAML path; defaults; docs."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from gwtest import Pki
from mtls_gateway import config_load
from mtls_gateway.config import AuthNone, AuthPolicy, JwtProvider
from mtls_gateway.config_load import load_config, load_config_text, parse_duration
from mtls_gateway.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def _valid(pki: Pki) -> dict[str, Any]:
    return {
        "listen": {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key),
                   "client_ca_file": str(pki.ca_file)},
        "providers": {"corp": {"type": "jwt", "issuer": "https://i.test",
                               "audiences": ["https://api.test"],
                               "jwks_uri": "https://i.test/jwks"}},
        "upstream": {"url": "http://127.0.0.1:8080"},
        "routes": [{"path_prefix": "/public", "auth": "none"},
                   {"path_prefix": "/", "auth": {"provider": "corp"}}],
    }


def _load(data: dict[str, Any], tmp_path: Path) -> Any:
    return load_config_text(yaml.safe_dump(data), base_dir=tmp_path)


def _problems(data: dict[str, Any], tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        _load(data, tmp_path)
    return info.value.problems


def test_defaults_are_strict(pki: Pki, tmp_path: Path) -> None:
    config = _load(_valid(pki), tmp_path)
    assert config.listen.client_cert == "required"
    assert (config.listen.min_tls_version, config.listen.max_tls_version) == ("1.2", "1.3")
    provider = config.providers["corp"]
    assert isinstance(provider, JwtProvider)
    assert provider.algorithms == ("RS256", "PS256", "ES256")
    assert provider.leeway == 30 and provider.jwks_refetch_cooldown == 30
    assert isinstance(config.routes[0].auth, AuthNone)
    auth = config.routes[1].auth
    assert isinstance(auth, AuthPolicy) and auth.binding == "required"
    assert auth.providers == ("corp",)
    assert config.upstream.pass_authorization is True
    assert config.admin.host == "127.0.0.1"


def _mutate(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(data)
    keys = re.findall(r"[^.\[\]]+", path)
    node = data
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    last = keys[-1]
    if value is _DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


_DELETE = object()


@pytest.mark.parametrize(("path", "value", "expected"), [
    ("routes[1].auth.provider", "other", 'routes[1].auth.provider: unknown provider "other"'),
    ("routes[1].auth.binding", "maybe", "routes[1].auth.binding: must be one of"),
    ("routes[1].auth", _DELETE, "routes[1].auth: is required"),
    ("routes[0].auth", "public", 'routes[0].auth: expected "none"'),
    ("routes[0].methods", ["GET", "FETCH"], "routes[0].methods: unknown HTTP method 'FETCH'"),
    ("routes[0].path_regex", "([", "routes[0].path_prefix: set exactly one of"),
    ("providers.corp.algorithms", ["HS256"], "providers.corp.algorithms: 'HS256' is not allowed"),
    ("providers.corp.algorithms", ["none"], "providers.corp.algorithms: 'none' is not allowed"),
    ("providers.corp.jwks_uri", "http://i.test/jwks", "providers.corp.jwks_uri: must be an "
                                                      "absolute https URL"),
    ("providers.corp.jwks", {"keys": []}, "providers.corp.jwks_uri: set exactly one of"),
    ("providers.corp.issuer", _DELETE, "providers.corp.issuer: is required"),
    ("providers.corp.leeway", "soon", "providers.corp.leeway: expected a duration"),
    ("providers.corp.type", "saml", "providers.corp.type: must be one of jwt, introspection"),
    ("providers.corp.colour", "blue", "providers.corp.colour: unknown field"),
    ("listen.port", 70000, "listen.port: must be between 0 and 65535"),
    ("listen.client_cert", "sometimes", "listen.client_cert: must be one of required, optional"),
    ("listen.cert_file", "/nonexistent.pem", "listen.cert_file: cannot read /nonexistent.pem"),
    ("listen.min_tls_version", "1.0", "listen.min_tls_version: must be one of 1.2, 1.3"),
    ("upstream.url", "ftp://x", "upstream.url: must be an absolute http or https URL"),
    ("upstream.identity_headers", {"subject": "Bad Header"}, "upstream.identity_headers.subject"),
    ("upstream.identity_headers", {"subject": "Authorization"},
     "upstream.identity_headers.subject: 'Authorization' cannot carry identity"),
    ("routes[0]", {"path_regex": "([", "auth": "none"},
     "routes[0].path_regex: invalid regular expression"),
    ("routes[0]", {"path": "x", "auth": "none"}, "routes[0].path: must start with /"),
    ("realm", 'a"b', "realm: must not contain quotes"),
    ("routes", [], "routes: expected a non-empty list"),
    ("listn", {}, "listn: unknown field"),
])
def test_each_problem_has_its_yaml_path(pki: Pki, tmp_path: Path, path: str, value: Any,
                                        expected: str) -> None:
    problems = _problems(_mutate(_valid(pki), path, value), tmp_path)
    assert any(p.startswith(expected) for p in problems), problems


@pytest.mark.parametrize(("chain", "expected"), [
    (["corp", "corp2"], '"corp2" can never be reached: "corp" claims every JWT of issuer'),
    (["opaque", "corp"], '"opaque" (introspection) takes every token, so it must come last'),
])
def test_provider_chains_without_unreachable_members(pki: Pki, tmp_path: Path,
                                                     chain: list[str], expected: str) -> None:
    data = _valid(pki)
    data["providers"]["corp2"] = {**data["providers"]["corp"], "audiences": ["https://b.test"]}
    secret = tmp_path / "secret"
    secret.write_text("s")
    data["providers"]["opaque"] = {"type": "introspection", "endpoint": "https://as.test/i",
                                   "client_id": "gw", "client_secret_file": str(secret)}
    data["routes"][1]["auth"]["provider"] = chain
    problems = _problems(data, tmp_path)
    assert problems == [f"routes[1].auth.provider: {expected} https://i.test"
                        if "issuer" in expected else f"routes[1].auth.provider: {expected}"]


def test_every_problem_is_listed_at_once(pki: Pki, tmp_path: Path) -> None:
    data = _valid(pki)
    data["listen"]["port"] = "x"
    data["providers"]["corp"]["algorithms"] = ["HS256"]
    data["routes"][1]["auth"]["provider"] = "corp2"
    data["upstream"]["read_timeout"] = "-1"
    problems = _problems(data, tmp_path)
    paths = [p.split(":")[0] for p in problems]
    assert paths == ["listen.port", "providers.corp.algorithms", "upstream.read_timeout",
                     "routes[1].auth.provider"]


def test_key_not_matching_certificate_is_refused(pki: Pki, tmp_path: Path) -> None:
    data = _valid(pki)
    data["listen"]["key_file"] = str(pki.clients["a"].key)
    assert any(p.startswith("listen.key_file: does not match")
               for p in _problems(data, tmp_path))


def test_bad_pem_files_are_reported(pki: Pki, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    data = _valid(pki)
    data["listen"]["client_ca_file"] = str(junk)
    data["listen"]["key_file"] = str(junk)
    problems = _problems(data, tmp_path)
    assert any(p.startswith("listen.client_ca_file:") and "PEM" in p for p in problems)
    assert any(p.startswith("listen.key_file:") and "private key" in p for p in problems)


def test_relative_paths_resolve_against_the_config_file(pki: Pki, tmp_path: Path) -> None:
    data = _valid(pki)
    data["listen"].update(cert_file="server.crt", key_file="server.key", client_ca_file="ca.crt")
    config_path = pki.dir / "relative.yaml"
    config_path.write_text(yaml.safe_dump(data))
    assert load_config(config_path).listen.cert_file == pki.server_cert


def test_yaml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="yaml"):
        load_config_text("listen: [", base_dir=tmp_path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize(("text", "seconds"), [
    (30, 30.0), ("30s", 30.0), ("500ms", 0.5), ("5m", 300.0), ("1h", 3600.0), ("1.5s", 1.5),
])
def test_parse_duration(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", -1, True, "5 days"])
def test_parse_duration_refuses(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_shipped_gateway_yaml_documents_every_field(pki: Pki, tmp_path: Path) -> None:
    """Each field name the loader reads appears in the commented reference gateway.yaml."""
    text = (REPO / "gateway.yaml").read_text()
    # Load the reference itself with real files swapped in, so its structure is validated.
    data = yaml.safe_load(text)
    data["listen"].update(cert_file=str(pki.server_cert), key_file=str(pki.server_key),
                          client_ca_file=str(pki.ca_file))
    secret = tmp_path / "secret"
    secret.write_text("s3cret")
    data["providers"]["as-introspection"]["client_secret_file"] = str(secret)
    config = load_config_text(yaml.safe_dump(data), base_dir=tmp_path)
    assert [r.name for r in config.routes] == ["health", "accounts"]
    missing = sorted(f for f in config_load.KNOWN_FIELDS
                     if not re.search(rf"^\s*#?\s*-?\s*{re.escape(f)}:", text, re.MULTILINE))
    assert missing == []


# --- listen.client_ca: any (issue 7) --------------------------------------------------------

def _any(pki: Pki, **listen: Any) -> dict[str, Any]:
    data = _valid(pki)
    del data["listen"]["client_ca_file"]
    data["listen"].update({"client_ca": "any", **listen})
    return data


def test_client_ca_defaults_to_pki_and_any_needs_no_ca_file(pki: Pki, tmp_path: Path) -> None:
    config = _load(_valid(pki), tmp_path)
    assert (config.listen.client_ca, config.listen.client_cert_validity) == ("pki", "enforce")
    config = _load(_any(pki), tmp_path)
    assert (config.listen.client_ca, config.listen.client_ca_file) == ("any", None)
    assert config.listen.client_cert_validity == "enforce"
    assert config.listen.client_ca_file not in config.watched_files()
    ignore = _load(_any(pki, client_cert_validity="ignore"), tmp_path)
    assert ignore.listen.client_cert_validity == "ignore"


@pytest.mark.parametrize(("change", "expected"), [
    (lambda d: d["listen"].update(client_ca="all"),
     "listen.client_ca: must be one of pki, any (got 'all')"),
    (lambda d: d["listen"].update(client_cert_validity="lenient"),
     "listen.client_cert_validity: must be one of enforce, ignore (got 'lenient')"),
    (lambda d: d["listen"].update(client_ca_file="ca.crt"),
     "listen.client_ca_file: is not used with client_ca: any"),
    (lambda d: d["routes"][1]["auth"].update(binding="optional"),
     "routes[1].auth.binding: optional is refused with listen.client_ca: any"),
    (lambda d: d["routes"][1]["auth"].update(binding="off"),
     "routes[1].auth.binding: off is refused with listen.client_ca: any"),
])
def test_client_ca_any_problems(pki: Pki, tmp_path: Path, change: Any, expected: str) -> None:
    data = _any(pki)
    change(data)
    problems = _problems(data, tmp_path)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


@pytest.mark.parametrize(("listen", "expected"), [
    ({"client_cert_validity": "ignore"},
     "listen.client_cert_validity: ignore needs client_ca: any"),
    ({"client_ca_file": None}, "listen.client_ca_file: is required"),
])
def test_client_ca_pki_problems(pki: Pki, tmp_path: Path, listen: dict[str, Any],
                                expected: str) -> None:
    data = _valid(pki)
    data["listen"].update(listen)
    problems = _problems(data, tmp_path)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_client_ca_any_allows_public_and_bound_routes_only(pki: Pki, tmp_path: Path) -> None:
    data = _any(pki)
    data["routes"] = [{"path_prefix": "/public", "auth": "none"},
                      {"path_prefix": "/a", "auth": {"provider": "corp", "binding": "required"}},
                      {"path_prefix": "/b", "auth": {"provider": "corp", "binding": "off"}},
                      {"path_prefix": "/c", "auth": {"provider": "corp", "binding": "optional"}}]
    problems = _problems(data, tmp_path)
    assert [p.split(":")[0] for p in problems] == ["routes[2].auth.binding",
                                                   "routes[3].auth.binding"]
    data["routes"] = data["routes"][:2]
    assert len(_load(data, tmp_path).routes) == 2
