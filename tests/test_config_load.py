"""Config loading: every problem reported at once with its YAML path; defaults; docs."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
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
                                   "client_id": "gw", "client_secret_file": str(secret),
                                   "audiences": "any"}
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


_HEADER = {"source": "header", "format": "xfcc", "trusted_proxies": {"cidrs": ["127.0.0.1/32"]}}


@pytest.mark.parametrize(("client_certificate", "listen", "expected"), [
    ({"source": "header"}, {},
     "listen.client_certificate.trusted_proxies: source: header needs at least one trust rule"),
    ({"source": "tls", "format": "xfcc"}, {},
     "listen.client_certificate.format: only applies with source: header"),
    ({**_HEADER, "format": "der"}, {}, "listen.client_certificate.format: must be one of"),
    ({**_HEADER, "header": "Bad Header"}, {},
     "listen.client_certificate.header: 'Bad Header' is not a valid header name"),
    ({**_HEADER, "header": "Authorization"}, {},
     "listen.client_certificate.header: 'Authorization' cannot carry a certificate"),
    ({**_HEADER, "chain_header": "X-Chain"}, {},
     "listen.client_certificate.chain_header: only the rfc9440 format"),
    ({**_HEADER, "trusted_proxies": {"cidrs": ["10.0.0.1/8"]}}, {},
     "listen.client_certificate.trusted_proxies.cidrs: '10.0.0.1/8' is not a network"),
    ({**_HEADER, "trusted_proxies": {"cidrs": ["0.0.0.0/0"]}}, {},
     "listen.client_certificate.trusted_proxies.cidrs: a /0 network trusts every address"),
    ({**_HEADER, "trusted_proxies": {"subjects": ["not a dn"]}}, {},
     "listen.client_certificate.trusted_proxies.subjects: 'not a dn' is not an RFC 4514"),
    ({**_HEADER, "trusted_proxies": {"sans": ["spiffe://x"]}}, {},
     "listen.client_certificate.trusted_proxies.sans: 'spiffe://x' must be one of dns:"),
    ({**_HEADER, "trusted_proxies": {"sans": ["ip:300.1.1.1"]}}, {},
     "listen.client_certificate.trusted_proxies.sans: 'ip:300.1.1.1' is not an IP address"),
    ({**_HEADER, "trusted_proxies": {"cidr": ["10.0.0.0/8"]}}, {},
     "listen.client_certificate.trusted_proxies.cidr: unknown field"),
    (None, {"tls": False}, "listen.tls: a plain-HTTP listener has no client certificate"),
    ({**_HEADER, "trusted_proxies": {"sans": ["dns:edge"]}}, {"tls": False},
     "listen.tls: trusted_proxies subjects/sans need the front proxy's mutual TLS"),
])
def test_client_certificate_problems(pki: Pki, tmp_path: Path, client_certificate: Any,
                                     listen: dict[str, Any], expected: str) -> None:
    data = _valid(pki)
    data["listen"].update(listen)
    if client_certificate is not None:
        data["listen"]["client_certificate"] = client_certificate
    problems = _problems(data, tmp_path)
    assert any(p.startswith(expected) for p in problems), problems


def test_header_source_defaults_and_plain_listener(pki: Pki, tmp_path: Path) -> None:
    data = _valid(pki)
    data["listen"] = {"tls": False, "client_certificate": {
        "source": "header", "trusted_proxies": {"cidrs": ["127.0.0.1/32", "::1/128"]}}}
    config = _load(data, tmp_path)
    source = config.listen.client_certificate
    assert (source.format, source.header, source.chain_header) == (
        "rfc9440", "Client-Cert", "Client-Cert-Chain")
    assert [str(n) for n in source.trusted.cidrs] == ["127.0.0.1/32", "::1/128"]
    assert config.listen.cert_file is None and config.watched_files() == ()
    for fmt, header in (("xfcc", "X-Forwarded-Client-Cert"), ("pem", "X-SSL-Client-Cert")):
        data["listen"]["client_certificate"]["format"] = fmt
        source = _load(data, tmp_path).listen.client_certificate
        assert (source.header, source.chain_header) == (header, None)
    assert _load(_valid(pki), tmp_path).listen.client_certificate is None   # tls: the default


# --- token endpoint routes, client registries, metadata (issue 10) -------------------------

_CLIENT_A = {"client_id": "client-a", "token_endpoint_auth_method": "tls_client_auth",
             "tls_client_auth_subject_dn": "CN=client-a,O=mtls-gateway test"}


def _with_token_route(pki: Pki, **registry: Any) -> dict[str, Any]:
    data = _valid(pki)
    data["client_registries"] = {"partners": registry or {"clients": [_CLIENT_A],
                                                          "ca_file": str(pki.ca_file)}}
    data["routes"].insert(0, {"name": "token", "path": "/token", "methods": ["POST"],
                              "auth": {"mtls_client": {"registry": "partners"}}})
    data["metadata"] = {"resource": "https://api.test"}
    return data


def test_token_route_registry_and_metadata(pki: Pki, tmp_path: Path) -> None:
    from mtls_gateway.config import AuthMtlsClient, ClientRegistration

    config = _load(_with_token_route(pki), tmp_path)
    auth = config.routes[0].auth
    assert auth == AuthMtlsClient("partners", "X-Auth-Client-Id", 65536)
    registry = config.client_registries["partners"]
    assert registry.clients == (ClientRegistration(
        "client-a", "tls_client_auth", subject_dn="CN=client-a,O=mtls-gateway test"),)
    assert (registry.jwks_refresh_interval, registry.jwks_max_age) == (300.0, 3600.0)
    assert config.metadata is not None
    assert config.metadata.authorization_servers == ("https://i.test",)   # provider issuers
    assert config.metadata.as_metadata is None


def test_auth_mtls_client_shorthand_and_registry_file(pki: Pki, tmp_path: Path) -> None:
    clients = tmp_path / "clients.yaml"
    clients.write_text(yaml.safe_dump({"clients": [_CLIENT_A]}))
    data = _with_token_route(pki, file="clients.yaml", ca_file=str(pki.ca_file))
    data["routes"][0]["auth"] = "mtls_client"
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(data))
    config = load_config(path)
    assert config.routes[0].auth.registry == "partners"  # type: ignore[union-attr]
    assert config.client_registries["partners"].clients[0].client_id == "client-a"
    assert clients in config.watched_files()   # edits to the registry reload it


_SELF = {"client_id": "client-s", "token_endpoint_auth_method": "self_signed_tls_client_auth",
         "jwks_uri": "https://client-s.test/jwks"}


@pytest.mark.parametrize(("path", "value", "expected"), [
    ("routes[0].auth.mtls_client.registry", "nope",
     'routes[0].auth.mtls_client.registry: unknown client registry "nope"'),
    ("routes[0].auth.mtls_client.client_header", "Client-Cert",
     "routes[0].auth.mtls_client.client_header: 'Client-Cert' cannot name the client"),
    ("routes[0].auth.mtls_client.client_header", "Bad Header",
     "routes[0].auth.mtls_client.client_header: 'Bad Header' is not a valid header name"),
    ("routes[0].auth.mtls_client.max_body_bytes", 10,
     "routes[0].auth.mtls_client.max_body_bytes: must be between 1024"),
    ("routes[0].auth.mtls_client.colour", "x", "routes[0].auth.mtls_client.colour: unknown"),
    ("client_registries.partners.clients[0].tls_client_auth_san_dns", "a.test",
     "client_registries.partners.clients[0].token_endpoint_auth_method: tls_client_auth needs "
     "exactly one of"),
    ("client_registries.partners.clients[0].tls_client_auth_subject_dn", _DELETE,
     "client_registries.partners.clients[0].token_endpoint_auth_method: tls_client_auth needs"),
    ("client_registries.partners.clients[0].tls_client_auth_subject_dn", "cn=x,bogus",
     "client_registries.partners.clients[0].tls_client_auth_subject_dn: 'bogus' is not"),
    ("client_registries.partners.clients[0]",
     {**_CLIENT_A, "tls_client_auth_subject_dn": None, "tls_client_auth_san_ip": "300.1.1.1"},
     "client_registries.partners.clients[0].tls_client_auth_san_ip:"),
    ("client_registries.partners.clients[0].token_endpoint_auth_method", "client_secret_basic",
     "client_registries.partners.clients[0].token_endpoint_auth_method: must be one of"),
    ("client_registries.partners.clients[0].redirect_uris", [],
     "client_registries.partners.clients[0].redirect_uris: unknown field"),
    ("client_registries.partners.clients", [_CLIENT_A, _CLIENT_A],
     'client_registries.partners.clients[1].client_id: client "client-a" is registered twice'),
    ("client_registries.partners.clients", [{**_SELF, "jwks": {"keys": []}}],
     "client_registries.partners.clients[0].jwks: no key in the JWK Set"),
    ("client_registries.partners.clients", [{**_SELF, "jwks_uri": "http://c.test/jwks"}],
     "client_registries.partners.clients[0].jwks_uri: must be an absolute https URL"),
    ("client_registries.partners.clients", [{**_SELF, "tls_client_auth_san_dns": "a.test"}],
     "client_registries.partners.clients[0].tls_client_auth_san_dns: tls_client_auth_* values"),
    ("client_registries.partners.clients", [{k: v for k, v in _SELF.items() if k != "jwks_uri"}],
     "client_registries.partners.clients[0].token_endpoint_auth_method: "
     "self_signed_tls_client_auth needs exactly one of jwks, jwks_uri"),
    ("client_registries.partners.file", "clients.yaml",
     "client_registries.partners.clients: set exactly one of clients (inline) and file"),
    ("client_registries.partners.jwks_max_age", "1m",
     "client_registries.partners.jwks_max_age: must not be shorter than jwks_refresh_interval"),
    ("client_registries.partners.ca_file", "/nonexistent.pem",
     "client_registries.partners.ca_file: cannot read"),
    ("client_registries.bad name", {"clients": []},
     "client_registries.bad name: registry names use"),
    ("metadata.resource", "http://api.test", "metadata.resource: must be an absolute https URL"),
    ("metadata.resource", "https://api.test/#x", "metadata.resource: must have no query or"),
    ("metadata.authorization_servers", ["http://as.test"],
     "metadata.authorization_servers[0]: must be an https URL"),
    ("metadata.authorization_server_metadata", {"mtls_endpoint_aliases": {"token_endpoint": "x"}},
     "metadata.authorization_server_metadata.mtls_endpoint_aliases.token_endpoint: must be an"),
    ("metadata.authorization_server_metadata", {"paths": ["nope"]},
     "metadata.authorization_server_metadata.paths: 'nope' must start with /"),
    ("metadata.colour", "x", "metadata.colour: unknown field"),
])
def test_token_endpoint_problems_have_their_yaml_path(pki: Pki, tmp_path: Path, path: str,
                                                      value: Any, expected: str) -> None:
    problems = _problems(_mutate(_with_token_route(pki), path, value), tmp_path)
    assert any(p.startswith(expected) for p in problems), problems


def test_mtls_client_shorthand_needs_one_registry(pki: Pki, tmp_path: Path) -> None:
    data = _with_token_route(pki)
    data["client_registries"]["more"] = {"clients": []}
    data["client_registries"]["partners"]["ca_file"] = str(pki.ca_file)
    data["routes"][0]["auth"] = "mtls_client"
    assert _problems(data, tmp_path) == [
        "routes[0].auth: mtls_client without options needs exactly one entry in "
        "client_registries (found 2); name it with mtls_client.registry"]


def test_registry_file_problems(pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "list.yaml").write_text(yaml.safe_dump([_CLIENT_A]))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"clients": [{"client_id": "x"}]}))
    for name, expected in (("list.yaml", 'expected a mapping with one key, "clients"'),
                           ("bad.yaml", "bad.yaml:clients[0].token_endpoint_auth_method: is "
                                        "required")):
        problems = _problems(_with_token_route(pki, file=name), tmp_path)
        assert any(expected in p for p in problems), problems


def test_token_endpoint_fields_are_documented(pki: Pki, tmp_path: Path) -> None:
    """Every field of the new sections appears in the commented reference gateway.yaml."""
    data = _with_token_route(pki, clients=[_CLIENT_A, _SELF], ca_file=str(pki.ca_file))
    data["routes"][0]["auth"]["mtls_client"].update(client_header="X-C", max_body_bytes=2048)
    data["metadata"].update(authorization_server_metadata={}, resource_name="n")
    _load(data, tmp_path)
    text = (REPO / "gateway.yaml").read_text()
    fields = ["client_registries", "mtls_client", "registry", "client_header", "max_body_bytes",
              "clients", "file", "ca_file", "jwks_ca_file", "jwks_refresh_interval",
              "jwks_timeout", "jwks_max_age", "client_id", "token_endpoint_auth_method",
              "tls_client_auth_subject_dn", "tls_client_auth_san_dns", "tls_client_auth_san_uri",
              "tls_client_auth_san_ip", "tls_client_auth_san_email", "jwks", "jwks_uri",
              "metadata", "resource", "authorization_servers", "scopes_supported",
              "resource_name", "resource_documentation", "authorization_server_metadata",
              "paths", "mtls_endpoint_aliases"]
    assert set(fields) <= config_load.KNOWN_FIELDS
    missing = [f for f in fields
               if not re.search(rf"^\s*#?\s*-?\s*{re.escape(f)}:", text, re.MULTILINE)]
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


def test_tls_stack_defaults_to_openssl_and_python_is_pki_only(pki: Pki, tmp_path: Path) -> None:
    assert _load(_valid(pki), tmp_path).listen.tls_stack == "openssl"
    data = _valid(pki)
    data["listen"]["tls_stack"] = "python"
    assert _load(data, tmp_path).listen.tls_stack == "python"
    assert _load(_any(pki, tls_stack="openssl"), tmp_path).listen.tls_stack == "openssl"


@pytest.mark.parametrize(("data_of", "expected"), [
    (lambda pki: _any(pki, tls_stack="python"),
     "listen.tls_stack: python cannot serve client_ca: any"),
    (lambda pki: {**_valid(pki), "listen": {**_valid(pki)["listen"], "tls_stack": "ssl"}},
     "listen.tls_stack: must be one of openssl, python (got 'ssl')"),
])
def test_tls_stack_problems(pki: Pki, tmp_path: Path, data_of: Any, expected: str) -> None:
    problems = _problems(data_of(pki), tmp_path)
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


@pytest.mark.parametrize(("change", "expected"), [
    (lambda d: d["listen"].update(tls=False, client_certificate=_HEADER),
     "listen.client_ca: any needs tls: true"),
    (lambda d: d["listen"].update(client_certificate={
        **_HEADER, "trusted_proxies": {"subjects": ["CN=edge"]}}),
     "listen.client_ca: any cannot identify a front proxy by subject or SAN"),
    (lambda d: d["listen"].update(client_certificate={
        **_HEADER, "trusted_proxies": {"sans": ["dns:edge"]}}),
     "listen.client_ca: any cannot identify a front proxy by subject or SAN"),
])
def test_client_ca_any_with_header_source(pki: Pki, tmp_path: Path, change: Any,
                                          expected: str) -> None:
    data = _any(pki)
    change(data)
    problems = _problems(data, tmp_path)
    assert any(p.startswith(expected) for p in problems), problems


def test_client_ca_any_header_source_by_cidr_loads(pki: Pki, tmp_path: Path) -> None:
    data = _any(pki)
    data["listen"]["client_certificate"] = _HEADER
    assert _load(data, tmp_path).listen.client_certificate is not None


_SELF_SIGNED = {"client_id": "self", "token_endpoint_auth_method": "self_signed_tls_client_auth",
                "jwks_uri": "https://client.test/jwks.json"}


@pytest.mark.parametrize(("clients", "ca_file", "expected"), [
    ([_CLIENT_A], False, ["client_registries.partners.ca_file: is required when the registry "
                          "has tls_client_auth clients (client-a)"]),
    ([_CLIENT_A], True, []),
    ([_SELF_SIGNED], False, []),
])
@pytest.mark.parametrize("client_ca", ["any", "pki"])
def test_tls_client_auth_needs_registry_ca_in_every_mode(
        pki: Pki, tmp_path: Path, clients: list[dict[str, Any]], ca_file: bool,
        expected: list[str], client_ca: str) -> None:
    registry: dict[str, Any] = {"clients": clients}
    if ca_file:
        registry["ca_file"] = str(pki.ca_file)
    data = _with_token_route(pki, **registry)
    if client_ca == "any":
        del data["listen"]["client_ca_file"]
        data["listen"]["client_ca"] = "any"
    try:
        problems = _load(data, tmp_path) and []
    except ConfigError as exc:
        problems = exc.problems
    assert [p.split(": a registered")[0] for p in problems] == expected


# --- introspection audiences, routes[].resource, subject DN forms (issue 21) ----------------

def _with_introspection(pki: Pki, tmp_path: Path, **fields: Any) -> dict[str, Any]:
    data = _valid(pki)
    secret = tmp_path / "secret"
    secret.write_text("s")
    data["providers"]["opaque"] = {"type": "introspection", "endpoint": "https://as.test/i",
                                   "client_id": "gw", "client_secret_file": str(secret),
                                   **fields}
    data["routes"][1]["auth"]["provider"] = ["corp", "opaque"]
    return data


@pytest.mark.parametrize(("audiences", "loaded", "problem"), [
    (None, None, "providers.opaque.audiences: is required: list the resource identifiers"),
    ([], None, "providers.opaque.audiences: must list at least one audience (or be: any)"),
    ("all", ("all",), None),          # a string is one audience, not a keyword
    ("any", (), None),                # () after loading: any audience, said explicitly
    (["https://api.test"], ("https://api.test",), None),
])
def test_introspection_needs_audiences(pki: Pki, tmp_path: Path, audiences: Any,
                                       loaded: tuple[str, ...] | None,
                                       problem: str | None) -> None:
    fields = {} if audiences is None else {"audiences": audiences}
    data = _with_introspection(pki, tmp_path, **fields)
    if problem is None:
        assert _load(data, tmp_path).providers["opaque"].audiences == loaded
    else:
        problems = _problems(data, tmp_path)
        assert len(problems) == 1 and problems[0].startswith(problem), problems


@pytest.mark.parametrize(("resource", "with_metadata", "auth", "problem"), [
    ("https://api.test/accounts", True, None, None),
    ("https://api.test/accounts", False, None, "routes[1].resource: needs the metadata section"),
    ("https://api.test", True, None, "routes[1].resource: needs a path"),
    ("https://api.test/x?y=1", True, None, "routes[1].resource: must have no query"),
    ("https://api.test/root", True, None, "routes[1].resource: equals metadata.resource"),
    ("https://api.test/accounts", True, "none", "routes[1].resource: only a route with token"),
])
def test_route_resource(pki: Pki, tmp_path: Path, resource: str, with_metadata: bool,
                        auth: str | None, problem: str | None) -> None:
    data = _valid(pki)
    data["routes"][1]["resource"] = resource
    if auth is not None:
        data["routes"][1]["auth"] = auth
    if with_metadata:
        data["metadata"] = {"resource": "https://api.test/root"}
    if problem is None:
        assert _load(data, tmp_path).routes[1].resource == resource
    else:
        problems = _problems(data, tmp_path)
        assert any(p.startswith(problem) for p in problems), problems


def _registry_with_dn(pki: Pki, dn: str) -> dict[str, Any]:
    data = _valid(pki)
    data["client_registries"] = {"main": {"ca_file": data["listen"]["client_ca_file"],
                                          "clients": [{
        "client_id": "c1", "token_endpoint_auth_method": "tls_client_auth",
        "tls_client_auth_subject_dn": dn}]}}
    data["routes"].insert(0, {"path": "/token", "auth": "mtls_client"})
    return data


def test_subject_dn_in_openssl_form_names_the_rfc4514_form(pki: Pki, tmp_path: Path) -> None:
    problems = _problems(_registry_with_dn(pki, "/C=US/O=Example, Inc./CN=client-1"), tmp_path)
    assert problems == [
        "client_registries.main.clients[0].tls_client_auth_subject_dn: '/C=US/O=Example, "
        "Inc./CN=client-1' is OpenSSL's /C=../O=../CN=.. form, not RFC 4514 (it would never "
        'match); you meant: "CN=client-1,O=Example\\, Inc.,C=US"']


# --- YAML as written, and what would fail at run time (issue 20) ------------------------------

_ROUTES_TEXT = """
routes:
  - path_prefix: /
    auth:
      provider: corp
      binding: {first}
      binding: {second}
"""


def _text(pki: Pki, routes: str) -> str:
    data = _valid(pki)
    del data["routes"]
    return yaml.safe_dump(data) + routes


def test_duplicate_keys_are_errors_with_their_path(pki: Pki, tmp_path: Path) -> None:
    text = _text(pki, _ROUTES_TEXT.format(first="required", second="optional"))
    with pytest.raises(ConfigError) as info:
        load_config_text(text, base_dir=tmp_path)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("routes[0].auth.binding: duplicate key")


@pytest.mark.parametrize(("written", "read"), [
    ("off", "off"), ("Off", None), ("on", None), ("yes", None), ("no", None),
])
def test_yaml_1_1_booleans_stay_strings(pki: Pki, tmp_path: Path, written: str,
                                        read: str | None) -> None:
    text = _text(pki, f"routes:\n  - path_prefix: /\n    auth:\n      provider: corp\n"
                      f"      binding: {written}\n")
    if read is None:        # a string, refused by name, never a surprise boolean
        with pytest.raises(ConfigError, match=f"must be one of required, optional, off "
                                              f"\\(got '{written}'\\)"):
            load_config_text(text, base_dir=tmp_path)
    else:
        policy = load_config_text(text, base_dir=tmp_path).routes[0].auth
        assert isinstance(policy, AuthPolicy) and policy.binding == read


@pytest.mark.parametrize(("written", "expected"), [
    ("true", True), ("True", True), ("FALSE", False), ("false", False)])
def test_true_and_false_are_booleans(pki: Pki, tmp_path: Path, written: str,
                                     expected: bool) -> None:
    text = yaml.safe_dump(_valid(pki)) + f"fast_lane: {written}\n"
    assert load_config_text(text, base_dir=tmp_path).fast_lane is expected


@pytest.mark.parametrize("written", ["yes", "no", "on", "off"])
def test_yes_no_for_a_boolean_field_says_true_or_false(pki: Pki, tmp_path: Path,
                                                       written: str) -> None:
    text = yaml.safe_dump(_valid(pki)) + f"fast_lane: {written}\n"
    with pytest.raises(ConfigError, match="fast_lane: expected true or false"):
        load_config_text(text, base_dir=tmp_path)


def test_deeply_nested_yaml_is_a_message(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nested deeper than 64 levels"):
        load_config_text("a: " + "[" * 5000 + "]" * 5000, base_dir=tmp_path)


def test_non_utf8_config_and_secret_files(pki: Pki, tmp_path: Path) -> None:
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(yaml.safe_dump(_valid(pki)).encode() + b"realm: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 0xe9 on line \d+\)"):
        load_config(bad)
    secret = tmp_path / "secret"
    secret.write_bytes(b"s\xff\xfecret")
    data = _valid(pki)
    data["providers"]["opaque"] = {"type": "introspection", "endpoint": "https://as.test/i",
                                   "client_id": "gw", "client_secret_file": str(secret)}
    assert any(p.startswith("providers.opaque.client_secret_file:") and "not UTF-8" in p
               for p in _problems(data, tmp_path))


def test_admin_port_equal_to_listen_port(pki: Pki, tmp_path: Path) -> None:
    data = _valid(pki)
    data["listen"]["port"] = 8443
    data["admin"] = {"port": 8443}
    assert any(p.startswith("admin.port: is the same as listen.port (8443)")
               for p in _problems(data, tmp_path))


def test_introspection_client_key_must_match_its_certificate(pki: Pki, tmp_path: Path) -> None:
    data = _valid(pki)
    data["providers"]["opaque"] = {
        "type": "introspection", "endpoint": "https://as.test/i", "client_id": "gw",
        "auth_method": "tls_client_auth", "client_cert_file": str(pki.clients["a"].cert),
        "client_key_file": str(pki.clients["b"].key), "audiences": "any"}
    assert any(p.startswith("providers.opaque.client_key_file:") and "does not match" in p
               for p in _problems(data, tmp_path))
    data["providers"]["opaque"]["client_key_file"] = str(pki.clients["a"].key)
    _load(data, tmp_path)


def test_client_ca_file_must_hold_a_ca(pki: Pki, tmp_path: Path) -> None:
    data = _valid(pki)
    data["listen"]["client_ca_file"] = str(pki.clients["a"].cert)   # a leaf, not its CA
    assert any(p.startswith("listen.client_ca_file:") and "holds no CA certificate" in p
               for p in _problems(data, tmp_path))


def test_validating_a_config_does_not_import_aiohttp(pki: Pki, tmp_path: Path) -> None:
    """``mtls-gateway check`` and config reloads parse DNs, key sets and registry files
    with pure modules (dn.py, keyset.py, registry_files.py): no HTTP stack is loaded."""
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    data = _with_token_route(pki, ca_file=str(pki.ca_file), clients=[_CLIENT_A])
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    data["providers"]["corp"] = {"type": "jwt", "issuer": "https://i.test",
                                 "audiences": ["https://api.test"],
                                 "jwks": {"keys": [{**jwk, "kid": "k1", "alg": "RS256"}]}}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    script = ("import sys; from pathlib import Path; "
              "from mtls_gateway.config_load import load_config; "
              f"config = load_config(Path({str(path)!r})); "
              "assert config.client_registries['partners'].clients; "
              "print(sorted(m for m in sys.modules if m.split('.')[0] == 'aiohttp'))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- DPoP (issue 19): the dpop section and the route fields ----------------------------------

def _dpop_route(pki: Pki, **auth: Any) -> dict[str, Any]:
    data = _valid(pki)
    data["routes"][1]["auth"].update(auth)
    return data


def test_dpop_defaults(pki: Pki, tmp_path: Path) -> None:
    config = _load(_dpop_route(pki, sender_constraint="dpop"), tmp_path)
    auth = config.routes[1].auth
    assert (auth.sender_constraint, auth.dpop_nonce, auth.binding) == ("dpop", False,
                                                                        "required")
    assert config.dpop.replay_store == "memory"
    assert (config.dpop.iat_max_age, config.dpop.iat_max_skew) == (60.0, 5.0)
    assert "HS256" not in config.dpop.algorithms and "ES256" in config.dpop.algorithms
    assert _load(_valid(pki), tmp_path).routes[1].auth.sender_constraint == "mtls"


def test_dpop_section_loads(pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "nonce"
    secret.write_text("s" * 40 + "\n")
    monkeypatch.setenv("REDIS_PW", "pw")
    data = _dpop_route(pki, sender_constraint="mtls_or_dpop", dpop_nonce=True)
    data["dpop"] = {"algorithms": ["ES256"], "iat_max_age": "2m", "iat_max_skew": 0,
                    "replay_store": "rediss://redis.internal:6380/1",
                    "replay_store_password_env": "REDIS_PW", "nonce_secret_file": "nonce",
                    "external_origins": ["https://api.example.com"]}
    config = _load(data, tmp_path)
    assert config.dpop.nonce_secret == b"s" * 40
    assert config.dpop.replay_store_password == "pw"
    assert (config.dpop.iat_max_age, config.dpop.iat_max_skew) == (120.0, 0.0)
    assert "pw" not in repr(config.dpop) and "sss" not in repr(config.dpop)


@pytest.mark.parametrize(("auth", "dpop", "expected"), [
    ({"sender_constraint": "both"}, None,
     "routes[1].auth.sender_constraint: must be one of mtls, dpop, mtls_or_dpop"),
    ({"sender_constraint": "dpop", "binding": "optional"}, None,
     "routes[1].auth.binding: optional is refused with sender_constraint: dpop"),
    ({"dpop_nonce": True}, None,
     "routes[1].auth.dpop_nonce: needs sender_constraint: dpop or mtls_or_dpop"),
    ({"sender_constraint": "dpop", "dpop_nonce": True}, None,
     "dpop.nonce_secret_file: is required: routes routes[1] set dpop_nonce"),
    ({"sender_constraint": "dpop", "dpop_nonce": True}, {"iat_max_age": "1m"},
     "dpop.nonce_secret_file: is required: routes routes[1] set dpop_nonce"),
    ({}, {"nonce_secret": "inline"}, "dpop.nonce_secret: inline secrets are refused"),
    ({}, {"algorithms": ["HS256"]}, "dpop.algorithms: 'HS256' is not allowed"),
    ({}, {"algorithms": ["none"]}, "dpop.algorithms: 'none' is not allowed"),
    ({}, {"replay_store": "memcached://x"}, "dpop.replay_store: must be \"memory\" or a"),
    ({}, {"replay_store": "redis://:secret@r:6379/0"},
     "dpop.replay_store: must not contain a password"),
    ({}, {"external_origins": ["https://api.example.com/v1"]},
     "dpop.external_origins[0]: must be scheme://host[:port] with nothing else"),
    ({}, {"iat_max_age": 0}, "dpop.iat_max_age: must be greater than zero"),
    ({}, {"replay_cache_size": 10}, "dpop.replay_cache_size: must be between 1000"),
    ({}, {"unknown": 1}, "dpop.unknown: unknown field"),
])
def test_dpop_problems_have_their_yaml_path(pki: Pki, tmp_path: Path, auth: dict[str, Any],
                                            dpop: dict[str, Any] | None, expected: str) -> None:
    data = _dpop_route(pki, **auth)
    if dpop is not None:
        data["dpop"] = dpop
    problems = _problems(data, tmp_path)
    assert any(p.startswith(expected) for p in problems), problems


def test_dpop_nonce_secret_too_short(pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "short").write_text("tiny")
    data = _dpop_route(pki, sender_constraint="dpop", dpop_nonce=True)
    data["dpop"] = {"nonce_secret_file": "short"}
    assert "dpop.nonce_secret_file: the nonce secret must be at least 32 bytes" in \
        _problems(data, tmp_path)
