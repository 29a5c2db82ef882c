"""``mtls-gateway check`` warnings (mtls_gateway/config_advice.py): valid configurations that
will not do what the integrator meant."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gwtest import Pki
from mtls_gateway.cli import main
from mtls_gateway.config_advice import config_warnings
from mtls_gateway.config_load import load_config_text


def config(pki: Pki, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    secret = tmp_path / "secret"
    secret.write_text("s")
    return {
        "listen": {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key),
                   "client_ca_file": str(pki.ca_file)},
        "providers": {
            "corp": {"type": "jwt", "issuer": "https://i.test",
                     "audiences": ["https://api.test/"], "jwks_uri": "https://i.test/jwks"},
            "opaque": {"type": "introspection", "endpoint": "https://as.test/i",
                       "client_id": "gw", "client_secret_file": str(secret),
                       "audiences": "any"}},
        "upstream": {"url": "http://127.0.0.1:8080"},
        "routes": [{"name": "api", "path_prefix": "/", "auth": {"provider": "corp"}}],
        **extra,
    }


def warnings_for(pki: Pki, tmp_path: Path, data: dict[str, Any]) -> list[str]:
    return config_warnings(load_config_text(yaml.safe_dump(data), base_dir=tmp_path))


@pytest.mark.parametrize(("resource", "expected"), [
    ("https://api.test/", []),
    ("https://api.test", ["metadata.resource: 'https://api.test' is not among the audiences "
                          'of provider "corp" (https://api.test/) that guards route "api" (it '
                          "lists 'https://api.test/': aud values are compared exactly): a "
                          "client following RFC 9728 asks for a token for 'https://api.test' "
                          "and the route refuses it (wrong_audience)"]),
    ("https://other.test", ["metadata.resource: 'https://other.test' is not among the "
                            'audiences of provider "corp"']),
])
def test_advertised_resource_against_audiences(pki: Pki, tmp_path: Path, resource: str,
                                               expected: list[str]) -> None:
    got = warnings_for(pki, tmp_path, config(pki, tmp_path, metadata={"resource": resource}))
    assert len(got) == len(expected)
    for line, start in zip(got, expected, strict=True):
        assert line.startswith(start), line


def test_route_resource_checked_against_its_own_providers(pki: Pki, tmp_path: Path) -> None:
    data = config(pki, tmp_path, metadata={"resource": "https://api.test/"})
    data["routes"].insert(0, {"name": "pay", "path_prefix": "/pay",
                              "resource": "https://api.test/pay",
                              "auth": {"provider": ["corp", "opaque"]}})
    got = warnings_for(pki, tmp_path, data)
    # corp lacks https://api.test/pay; opaque (audiences: any) accepts every audience
    assert len(got) == 1 and got[0].startswith(
        "routes[0].resource: 'https://api.test/pay' is not among the audiences of provider "
        '"corp"'), got


def test_no_metadata_no_audience_warning(pki: Pki, tmp_path: Path) -> None:
    assert warnings_for(pki, tmp_path, config(pki, tmp_path)) == []


@pytest.mark.parametrize(("dn", "meant"), [
    ("C=US,O=Example,CN=client-1", "CN=client-1,O=Example,C=US"),
    ("CN=client-1,O=Example,C=US", None),
])
def test_reversed_subject_dn(pki: Pki, tmp_path: Path, dn: str, meant: str | None) -> None:
    data = config(pki, tmp_path, client_registries={"main": {
        "ca_file": str(pki.ca_file), "clients": [{
        "client_id": "c1", "token_endpoint_auth_method": "tls_client_auth",
        "tls_client_auth_subject_dn": dn}]}})
    data["routes"].insert(0, {"path": "/token", "auth": "mtls_client"})
    got = warnings_for(pki, tmp_path, data)
    if meant is None:
        assert got == []
    else:
        assert got == [f'client_registries.main: client "c1": tls_client_auth_subject_dn '
                       f"{dn!r} is written most general first (the certificate's order); "
                       "RFC 4514, which the gateway compares with, writes the most specific "
                       f'first: "{meant}"']


def test_check_prints_the_warnings(pki: Pki, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config(pki, tmp_path,
                                          metadata={"resource": "https://other.test"})))
    assert main(["check", "--config", str(path)]) == 0
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert err[0].startswith(f"mtls-gateway: {path}: warning: metadata.resource: "
                             "'https://other.test' is not among"), err
    assert captured.out.splitlines() == [f"{path}: OK (1 routes, 2 providers, 1 warnings)"]
