"""Nothing a client can make for itself may vouch for another certificate (issue 17, item 1).

The attacks, end to end with real certificates and real TLS: a self-signed client certificate
with ``CA:TRUE`` (what ``openssl req -x509`` makes) in ``listen.client_ca_file`` is a trust
anchor, so its holder can issue itself a certificate with any other client's DN (token route)
or with the front proxy's DN (``trusted_proxies.subjects``). Every refusal asserts the answer
and that the upstream saw nothing.
"""

from __future__ import annotations

import base64
import datetime as dt
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gwtest import GatewayFactory, Issuer, Pki, Reply, Upstream, base_config
from mtls_gateway import pki as pki_mod
from mtls_gateway.anchors import bundle_problems, can_issue, is_ca, spki
from mtls_gateway.cert_headers import encode_client_cert
from mtls_gateway.config_load import load_config_text
from mtls_gateway.errors import ConfigError

VICTIM_DN = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mtls-gateway test"),
                       x509.NameAttribute(NameOID.COMMON_NAME, "client-a")])
PROXY_DN = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mtls-gateway test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "edge-proxy")])
CLIENT_A = {"client_id": "client-a", "token_endpoint_auth_method": "tls_client_auth",
            "tls_client_auth_subject_dn": "CN=client-a,O=mtls-gateway test"}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)


def openssl_req_x509(cn: str, *, ca: bool | None = True,
                     key_cert_sign: bool | None = None) -> pki_mod.CertKey:
    """A self-signed certificate as a client makes it. Default: ``openssl req -x509`` with the
    stock openssl.cnf (basicConstraints CA:TRUE, no keyUsage)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(_now()).not_valid_after(_now() + dt.timedelta(days=30)))
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None),
                                        critical=True)
    if key_cert_sign is not None:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=key_cert_sign, crl_sign=False,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
    builder = builder.add_extension(
        x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    return pki_mod.CertKey(builder.sign(key, hashes.SHA256()), key)


def issued_by(issuer: pki_mod.CertKey, subject: x509.Name,
              sans: list[x509.GeneralName] | None = None) -> pki_mod.CertKey:
    """What the attacker issues itself with the key of its own self-signed certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer.cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(_now()).not_valid_after(_now() + dt.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                              critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return pki_mod.CertKey(builder.sign(issuer.key, hashes.SHA256()), key)


def jwks_of(*certs: pki_mod.CertKey) -> dict[str, Any]:
    return {"keys": [{"kty": "EC", "x5c": [base64.b64encode(c.cert_der).decode()]}
                     for c in certs]}


@dataclass
class Attacker:
    root: pki_mod.CertKey           # its self-signed certificate, registered as a client
    bundle: Path                    # the listener bundle with the root appended (old README)


@pytest.fixture
def attacker(pki: Pki, tmp_path: Path) -> Attacker:
    root = openssl_req_x509("client-s")
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(pki.ca_file.read_bytes() + root.cert_pem)
    return Attacker(root, bundle)


async def connect_with(url: str, pki: Pki, ck: pki_mod.CertKey, tmp_path: Path, path: str, *,
                       method: str = "GET", data: Any = None,
                       headers: dict[str, str] | None = None) -> Reply:
    """One request on a new connection presenting ``ck`` (a certificate outside the test PKI)."""
    crt, key = ck.write(tmp_path, f"c-{ck.cert.serial_number}")
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    ctx.load_cert_chain(crt, key)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx,
                                                                    force_close=True)) as s, \
            s.request(method, url + path, data=data, headers=headers) as resp:
        return Reply(resp.status, resp.headers, await resp.read())


def load(config: dict[str, Any], tmp_path: Path) -> None:
    load_config_text(yaml.safe_dump(config), base_dir=tmp_path)


def token_config(pki: Pki, upstream: Upstream, bundle: Path,
                 clients: list[dict[str, Any]], **registry: Any) -> dict[str, Any]:
    config = base_config(pki, None, upstream)
    config["listen"]["client_ca_file"] = str(bundle)
    config["client_registries"] = {"partners": {"clients": clients, **registry}}
    config["routes"] = [{"name": "token", "path": "/token", "methods": ["POST"],
                         "auth": "mtls_client"}]
    return config


# --- attack (a): the token route ----------------------------------------------------------

def test_attack_a_the_old_readme_configuration_is_refused_at_start(
        pki: Pki, upstream: Upstream, attacker: Attacker, tmp_path: Path) -> None:
    """The configuration the old README produced (self-signed client appended to the bundle,
    registry without ca_file): refused, naming each hole with its YAML path."""
    client_s = {"client_id": "client-s", "token_endpoint_auth_method":
                "self_signed_tls_client_auth", "jwks": jwks_of(attacker.root)}
    config = token_config(pki, upstream, attacker.bundle, [client_s, CLIENT_A])
    with pytest.raises(ConfigError) as refused:
        load(config, tmp_path)
    text = "\n".join(refused.value.problems)
    assert "listen.client_ca_file" in text and "CN=client-s" in text
    assert "client_registries.partners.ca_file" in text


@pytest.mark.parametrize("shape", [{"ca": False}, {"ca": None},
                                   {"ca": True, "key_cert_sign": False}],
                         ids=["CA:FALSE", "no basicConstraints", "CA:TRUE without keyCertSign"])
@pytest.mark.parametrize("stack", ["openssl", "python"])   # two OpenSSL builds (tls_stack)
async def test_attack_a_end_to_end_a_pinned_self_signed_client_issues_nothing(
        make_gateway: GatewayFactory, pki: Pki, upstream: Upstream, tmp_path: Path,
        shape: dict[str, Any], stack: str) -> None:
    """The new way: the self-signed client is registered (jwks) and not in the bundle; the
    listener accepts exactly its certificate, which cannot issue (each shape can_issue calls
    non-issuing, checked against OpenSSL here): a certificate it signed with client-a's DN
    fails the handshake, and its own certificate is client-s only."""
    mine = openssl_req_x509("client-s", **shape)
    assert not can_issue(mine.cert)
    client_s = {"client_id": "client-s", "token_endpoint_auth_method":
                "self_signed_tls_client_auth", "jwks": jwks_of(mine)}
    config = token_config(pki, upstream, pki.ca_file, [client_s, CLIENT_A],
                          ca_file=str(pki.ca_file))
    config["listen"]["tls_stack"] = stack
    gw = await make_gateway(config)
    forged = issued_by(mine, VICTIM_DN)
    with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
        await connect_with(gw.url, pki, forged, tmp_path, "/token", method="POST",
                           data={"client_id": "client-a"})
    reply = await connect_with(gw.url, pki, mine, tmp_path, "/token", method="POST",
                               data={"client_id": "client-a"})
    assert (reply.status, reply.json()["reason"]) == (401, "client_cert_untrusted")
    assert upstream.seen == []
    reply = await connect_with(gw.url, pki, mine, tmp_path, "/token", method="POST",
                               data={"client_id": "client-s"})
    assert reply.status == 200, reply.body
    assert len(upstream.seen) == 1


async def test_attack_a_end_to_end_a_rogue_anchor_in_the_listener_bundle(
        make_gateway: GatewayFactory, pki: Pki, upstream: Upstream, tmp_path: Path) -> None:
    """Defence in depth: even a CA-looking certificate of a client's making in the listener
    bundle vouches for no name, because tls_client_auth chains to the registry's own ca_file."""
    rogue = openssl_req_x509("client-s", key_cert_sign=True)
    bundle = tmp_path / "bundle-rogue.crt"
    bundle.write_bytes(pki.ca_file.read_bytes() + rogue.cert_pem)
    gw = await make_gateway(token_config(pki, upstream, bundle, [CLIENT_A],
                                         ca_file=str(pki.ca_file)))
    forged = issued_by(rogue, VICTIM_DN)
    reply = await connect_with(gw.url, pki, forged, tmp_path, "/token", method="POST",
                               data={"client_id": "client-a"})
    assert (reply.status, reply.json()["reason"]) == (401, "client_cert_untrusted")
    assert upstream.seen == []
    reply = await gw.request("/token", method="POST", data={"client_id": "client-a"})
    assert reply.status == 200, reply.body          # the real client-a still gets through


# --- attack (b): front-proxy trust by subject ---------------------------------------------

def proxy_config(pki: Pki, issuer: Issuer, upstream: Upstream, bundle: Path,
                 **trusted: Any) -> dict[str, Any]:
    config = base_config(pki, issuer, upstream)
    config["listen"]["client_ca_file"] = str(bundle)
    config["listen"]["client_certificate"] = {
        "source": "header", "format": "rfc9440", "trusted_proxies": trusted}
    return config


@pytest.mark.parametrize("rule", ["subjects", "sans"])
def test_attack_b_proxy_identity_without_a_proxy_ca_is_refused_at_start(
        pki: Pki, issuer: Issuer, upstream: Upstream, attacker: Attacker, tmp_path: Path,
        rule: str) -> None:
    value = "CN=edge-proxy,O=mtls-gateway test" if rule == "subjects" else "dns:edge.example"
    config = proxy_config(pki, issuer, upstream, attacker.bundle, **{rule: [value]})
    with pytest.raises(ConfigError) as refused:
        load(config, tmp_path)
    text = "\n".join(refused.value.problems)
    assert "listen.client_certificate.trusted_proxies.ca_file" in text
    assert "listen.client_ca_file" in text          # the appended self-signed certificate


@pytest.mark.parametrize("rule", ["subjects", "sans"])
async def test_attack_b_end_to_end_a_self_made_proxy_certificate_is_not_the_proxy(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream,
        tmp_path: Path, rule: str) -> None:
    """The attacker holds a CA-looking self-signed certificate the listener trusts, issues
    itself the proxy's DN and SAN and states the victim's certificate in Client-Cert with the
    victim's (stolen) bound token: not a trusted hop, so no certificate, so 401."""
    rogue = openssl_req_x509("rogue", key_cert_sign=True)
    bundle = tmp_path / "bundle-rogue.crt"
    bundle.write_bytes(pki.ca_file.read_bytes() + rogue.cert_pem)
    san = "spiffe://cluster.local/ns/edge/sa/ingress"
    value = "CN=edge-proxy,O=mtls-gateway test" if rule == "subjects" else f"uri:{san}"
    gw = await make_gateway(proxy_config(pki, issuer, upstream, bundle, ca_file=str(pki.ca_file),
                                         **{rule: [value]}))
    fake_proxy = issued_by(rogue, PROXY_DN, [x509.UniformResourceIdentifier(san)])
    token = issuer.mint(pki.clients["a"].thumbprint)
    headers = {"Client-Cert": encode_client_cert(pki.clients["a"].der),
               "Authorization": f"Bearer {token}"}
    reply = await connect_with(gw.url, pki, fake_proxy, tmp_path, "/accounts", headers=headers)
    assert (reply.status, reply.json()["reason"]) == (401, "no_client_cert")
    assert upstream.seen == []
    # the real proxy, issued by the proxy CA, is still trusted
    reply = await gw.request("/accounts", cert="proxy", headers=headers)
    assert reply.status == 200, reply.body
    assert len(upstream.seen) == 1


# --- what may be a trust anchor -----------------------------------------------------------

@pytest.mark.parametrize(("kind", "ca", "issues"), [
    ("openssl req -x509 (CA:TRUE, no keyUsage)", False, True),
    ("CA:TRUE with keyCertSign", True, True),
    ("CA:TRUE, keyUsage without keyCertSign", False, False),
    ("CA:FALSE", False, False),
    ("no basicConstraints, no keyUsage", False, False),
    ("no basicConstraints, keyCertSign", False, True),
])
def test_what_is_a_ca_and_what_can_issue(kind: str, ca: bool, issues: bool) -> None:
    spec = {"openssl req -x509 (CA:TRUE, no keyUsage)": {"ca": True},
            "CA:TRUE with keyCertSign": {"ca": True, "key_cert_sign": True},
            "CA:TRUE, keyUsage without keyCertSign": {"ca": True, "key_cert_sign": False},
            "CA:FALSE": {"ca": False},
            "no basicConstraints, no keyUsage": {"ca": None},
            "no basicConstraints, keyCertSign": {"ca": None, "key_cert_sign": True}}[kind]
    cert = openssl_req_x509("x", **spec).cert   # type: ignore[arg-type]
    assert (is_ca(cert), can_issue(cert)) == (ca, issues)


def test_bundle_problems_name_each_entry(pki: Pki) -> None:
    ca = x509.load_pem_x509_certificate(pki.ca_file.read_bytes())
    client_made = openssl_req_x509("client-s").cert
    registered = openssl_req_x509("client-t", key_cert_sign=True)
    leaf = pki_mod.issue_client(pki_mod.make_ca("x"), "leaf").cert
    pin = pki_mod.self_signed_client("pinned").cert     # CA:FALSE: trusted as itself only
    bundle = [ca, client_made, registered.cert, leaf, pin]
    keys = {spki(registered.cert): "client-t"}
    strict = bundle_problems(bundle, keys)
    assert [p.split(" ", 2)[1] for p in strict] == ["2", "3", "4", "5"]
    assert "CN=client-s" in strict[0] and "keyCertSign" in strict[0]
    assert "client-t" in strict[1]
    listener = bundle_problems(bundle, keys, pins=True)
    assert [p.split(" ", 2)[1] for p in listener] == ["2", "3"]
    assert "can issue" in listener[0]
    assert bundle_problems([ca], {}) == []


# --- registered self-signed certificates: pinned, refused, or flagged by `check` ----------

def _registered(pki: Pki, upstream: Upstream, tmp_path: Path, client_ca: str,
                *clients: dict[str, Any], validity: str = "enforce") -> dict[str, Any]:
    config = token_config(pki, upstream, pki.ca_file, [*clients, CLIENT_A],
                          ca_file=str(pki.ca_file))
    if client_ca == "any":
        del config["listen"]["client_ca_file"]
        config["listen"].update(client_ca="any", client_cert_validity=validity)
    return config


def _self(client_id: str, ck: pki_mod.CertKey) -> dict[str, Any]:
    return {"client_id": client_id, "token_endpoint_auth_method": "self_signed_tls_client_auth",
            "jwks": jwks_of(ck)}


@pytest.mark.parametrize(("client_ca", "refused"), [("pki", True), ("any", False)])
def test_a_registered_certificate_that_can_issue_is_refused_under_pki(
        pki: Pki, upstream: Upstream, tmp_path: Path, client_ca: str, refused: bool) -> None:
    """openssl req -x509 makes CA:TRUE: the pki listener could only take it as an anchor."""
    config = _registered(pki, upstream, tmp_path, client_ca,
                         _self("client-s", openssl_req_x509("client-s")))
    if not refused:
        load(config, tmp_path)
        return
    with pytest.raises(ConfigError) as info:
        load(config, tmp_path)
    [problem] = info.value.problems
    assert problem.startswith("client_registries.partners.clients: client 'client-s'")
    assert "CA:FALSE" in problem and "client_ca: any" in problem


def test_registered_self_signed_certificates_are_pinned(
        pki: Pki, upstream: Upstream, tmp_path: Path) -> None:
    mine = openssl_req_x509("client-s", ca=False)
    config = _registered(pki, upstream, tmp_path, "pki", _self("client-s", mine))
    loaded = load_config_text(yaml.safe_dump(config), base_dir=tmp_path)
    assert loaded.listen.pinned_client_certs == (mine.cert_der,)


def _expired(cn: str) -> pki_mod.CertKey:
    return pki_mod.self_signed_client(cn, days=1, not_before=_now() - dt.timedelta(days=3))


@pytest.mark.parametrize(("client_ca", "validity", "client", "expected"), [
    ("pki", "enforce", "pinned", []),
    ("pki", "enforce", "expired", ["outside its validity period"]),
    ("any", "enforce", "expired", ["outside its validity period"]),
    ("any", "ignore", "expired", []),
    ("pki", "enforce", "jwks_uri", ["registers its certificate at jwks_uri"]),
    ("any", "enforce", "jwks_uri", []),
    ("pki", "enforce", "other_ca", ["neither self-signed"]),
    ("any", "enforce", "other_ca", []),
])
def test_check_flags_self_signed_clients_the_handshake_would_refuse(
        pki: Pki, upstream: Upstream, tmp_path: Path, client_ca: str, validity: str,
        client: str, expected: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from mtls_gateway.cli import main

    entry = {"pinned": lambda: _self("client-s", pki_mod.self_signed_client("client-s")),
             "expired": lambda: _self("client-s", _expired("client-s")),
             "jwks_uri": lambda: {"client_id": "client-s", "token_endpoint_auth_method":
                                  "self_signed_tls_client_auth",
                                  "jwks_uri": "https://client.test/jwks.json"},
             "other_ca": lambda: _self("client-s", pki_mod.issue_client(
                 pki_mod.make_ca("elsewhere"), "client-s"))}[client]()
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(_registered(pki, upstream, tmp_path, client_ca, entry,
                                               validity=validity)))
    assert main(["check", "--config", str(path)]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if ": warning: " in line]
    assert len(warnings) == len(expected), err
    for line, text in zip(warnings, expected, strict=True):
        assert "client_registries.partners: client 'client-s'" in line and text in line
