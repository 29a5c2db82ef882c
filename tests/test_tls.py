"""The TLS side: the peer certificate is read once per connection, on real connections."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import aiohttp
import pytest

from gwtest import Issuer, Pki, RunningGateway, base_config, count_certificate_reads


@pytest.mark.parametrize("stack", ["openssl", "python"])
async def test_thumbprint_computed_once_per_connection(
        make_gateway: Any, issuer: Issuer, pki: Pki, upstream: Any,
        monkeypatch: pytest.MonkeyPatch, stack: str) -> None:
    config = base_config(pki, issuer, upstream)
    config["listen"]["tls_stack"] = stack
    gateway: RunningGateway = await make_gateway(config)
    calls = count_certificate_reads(
        monkeypatch, "mtls_gateway.tls_any" if stack == "openssl" else "mtls_gateway.tls")
    token = issuer.mint(pki.clients["a"].thumbprint)
    connector = aiohttp.TCPConnector(ssl=pki.client_context("a"), limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(5):   # one keep-alive connection, five requests
            async with session.get(gateway.url + "/x",
                                   headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 200
    assert len(calls) == 1
    await gateway.request("/x", token=token)   # a new connection reads its own certificate
    assert len(calls) == 2


@pytest.mark.parametrize("stack", ["openssl", "python"])
@pytest.mark.parametrize(("versions", "client_max", "ok"), [
    (("1.2", "1.3"), ssl.TLSVersion.TLSv1_2, True),
    (("1.3", "1.3"), ssl.TLSVersion.TLSv1_2, False),
    (("1.2", "1.2"), ssl.TLSVersion.TLSv1_3, True),   # negotiates down to 1.2
])
async def test_tls_versions(make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Any,
                            versions: tuple[str, str], client_max: ssl.TLSVersion,
                            ok: bool, stack: str) -> None:
    config = base_config(pki, issuer, upstream)
    config["listen"].update(min_tls_version=versions[0], max_tls_version=versions[1],
                            tls_stack=stack)
    gw = await make_gateway(config)
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    ctx.load_cert_chain(pki.clients["a"].cert, pki.clients["a"].key)
    ctx.maximum_version = client_max
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", gw.server.port, ssl=ctx,
                                                  server_hostname="localhost")
        version = writer.get_extra_info("ssl_object").version()
        writer.close()
        connected = True
    except (ssl.SSLError, ConnectionError):
        connected, version = False, None
    assert connected is ok
    if ok:
        assert version == f"TLSv{versions[1] if client_max == ssl.TLSVersion.TLSv1_3 else '1.2'}"


@pytest.mark.parametrize("stack", ["openssl", "python"])
async def test_required_client_cert_refuses_handshake_without_one(
        make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Any, stack: str) -> None:
    config = base_config(pki, issuer, upstream)
    config["listen"].update(client_cert="required", tls_stack=stack)
    gw = await make_gateway(config)
    with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
        await gw.request("/public/x", cert=None)
    assert (await gw.request("/public/x", cert="a")).status == 200
    assert [s.path_qs for s in upstream.seen] == ["/public/x"]


def test_a_certificate_is_parsed_once_however_often_it_reconnects(
        pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    from mtls_gateway import tls

    parsed: list[bytes] = []
    real = tls.x509.load_der_x509_certificate

    def counting(der: bytes) -> Any:
        parsed.append(der)
        return real(der)

    monkeypatch.setattr(tls.x509, "load_der_x509_certificate", counting)
    monkeypatch.setattr(tls, "_DESCRIBED", tls.LRUCache(maxsize=2))
    a, b, c = (pki.clients[n].der for n in ("a", "b", "stranger"))
    first = tls.describe_certificate(a)
    assert tls.describe_certificate(bytes(a)) is first          # equal DER, new bytes object
    assert first.thumbprint == pki.clients["a"].thumbprint and "CN=" in first.subject
    for der in (b, c, a):                                       # bounded: a was evicted
        tls.describe_certificate(der)
    assert parsed == [a, b, c, a]
