"""A real front proxy terminates the client's mutual TLS and passes the certificate on.

nginx (URL-encoded PEM in ``X-SSL-Client-Cert``) and HAProxy (RFC 9440 ``Client-Cert``)
from Debian are started on loopback in front of the gateway, once over plain HTTP
(trusted by source address) and once over mutual TLS (trusted by the proxy's own
certificate). Every refusal asserts the answer and that the upstream saw nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from debian_tools import debian_program
from gwtest import GatewayFactory, Issuer, Pki, Reply, Upstream, base_config, free_port
from mtls_gateway.cert_headers import encode_client_cert

PROXY_URI = "spiffe://cluster.local/ns/edge/sa/ingress"


def _nginx_conf(pki: Pki, d: Path, port: int, gateway_port: int, mtls: bool) -> str:
    upstream_tls = f"""
            proxy_ssl_certificate {pki.clients['proxy'].cert};
            proxy_ssl_certificate_key {pki.clients['proxy'].key};
            proxy_ssl_trusted_certificate {pki.ca_file};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;""" if mtls else ""
    temp = " ".join(f"{kind}_temp_path {d}/{kind};"
                    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    {temp}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {pki.server_cert};
        ssl_certificate_key {pki.server_key};
        ssl_client_certificate {pki.ca_file};
        ssl_verify_client on;
        location / {{
            proxy_pass {'https' if mtls else 'http'}://127.0.0.1:{gateway_port};
            proxy_http_version 1.1;
            proxy_set_header X-SSL-Client-Cert $ssl_client_escaped_cert;{upstream_tls}
        }}
    }}
}}
"""


def _haproxy_conf(pki: Pki, d: Path, port: int, gateway_port: int, mtls: bool) -> str:
    server_pem, proxy_pem = d / "server.pem", d / "proxy.pem"
    server_pem.write_bytes(pki.server_cert.read_bytes() + pki.server_key.read_bytes())
    proxy = pki.clients["proxy"]
    proxy_pem.write_bytes(proxy.cert.read_bytes() + proxy.key.read_bytes())
    backend_tls = (f" ssl crt {proxy_pem} ca-file {pki.ca_file} verify required sni str(localhost)"
                   if mtls else "")
    return f"""
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend edge
    bind 127.0.0.1:{port} ssl crt {server_pem} ca-file {pki.ca_file} verify required
    http-request del-header Client-Cert
    http-request set-header Client-Cert :%[ssl_c_der,base64]: if {{ ssl_c_used }}
    default_backend gateway
backend gateway
    server gw 127.0.0.1:{gateway_port}{backend_tls}
"""


PROXIES: dict[str, tuple[str, str, Callable[..., str], list[str], str]] = {
    # name: (program, Debian package, config writer, argv after the program, format)
    "nginx": ("nginx", "nginx-light", _nginx_conf, ["-e", "stderr", "-c"], "pem"),
    "haproxy": ("haproxy", "haproxy", _haproxy_conf, ["-db", "-f"], "rfc9440"),
}

FrontProxy = Callable[[str, int, bool], Awaitable[str]]


@pytest.fixture
async def front_proxy(pki: Pki, tmp_path: Path) -> AsyncIterator[FrontProxy]:
    """``await front_proxy(name, gateway_port, mtls)`` starts it; the base URL of its port."""
    running: list[asyncio.subprocess.Process] = []

    async def start(name: str, gateway_port: int, mtls: bool) -> str:
        program, package, write_conf, argv, _ = PROXIES[name]
        binary = await asyncio.to_thread(debian_program, program, package)
        d = tmp_path / name
        d.mkdir()
        port = free_port()
        conf = d / f"{name}.conf"
        conf.write_text(write_conf(pki, d, port, gateway_port, mtls))
        with (d / "stderr").open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                binary, *argv, str(conf), stdout=asyncio.subprocess.DEVNULL, stderr=stderr)
        running.append(proc)
        for _ in range(200):
            if proc.returncode is not None:
                pytest.fail(f"{name} exited: {(d / 'stderr').read_text()}")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return f"https://127.0.0.1:{port}"
            await asyncio.sleep(0.05)
        pytest.fail(f"{name} did not listen on {port}")

    yield start
    for proc in running:
        if proc.returncode is None:
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _get(pki: Pki, url: str, cert: str, token: str,
               headers: list[tuple[str, str]] | None = None) -> Reply:
    connector = aiohttp.TCPConnector(ssl=pki.client_context(cert), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s, \
            s.get(url, headers=[("Authorization", f"Bearer {token}"), *(headers or [])]) as r:
        return Reply(r.status, r.headers, await r.read())


def _config(pki: Pki, issuer: Issuer, upstream: Upstream, fmt: str,
            mtls: bool) -> dict[str, Any]:
    config = base_config(pki, issuer, upstream)
    trusted = ({"sans": [f"uri:{PROXY_URI}"], "ca_file": str(pki.ca_file)} if mtls
               else {"cidrs": ["127.0.0.1/32"]})
    config["listen"].update(tls=mtls, client_cert="required", client_certificate={
        "source": "header", "format": fmt, "trusted_proxies": trusted})
    return config


@pytest.mark.parametrize("mtls", [False, True], ids=["plain-to-gateway", "mtls-to-gateway"])
@pytest.mark.parametrize("name", sorted(PROXIES))
async def test_front_proxy_end_to_end(
        make_gateway: GatewayFactory, front_proxy: FrontProxy, pki: Pki, issuer: Issuer,
        upstream: Upstream, name: str, mtls: bool) -> None:
    fmt = PROXIES[name][4]
    gw = await make_gateway(_config(pki, issuer, upstream, fmt, mtls))
    edge = await front_proxy(name, gw.server.port, mtls)
    a, b = pki.clients["a"], pki.clients["b"]
    token = issuer.mint(a.thumbprint)

    ok = await _get(pki, edge + "/accounts/1", "a", token)
    assert ok.status == 200, ok.body
    assert [s.path_qs for s in upstream.seen] == ["/accounts/1"]
    assert upstream.seen[0].headers["x-client-cert-thumbprint"] == [a.thumbprint]

    # A stolen token presented with another certificate through the same proxy.
    stolen = await _get(pki, edge + "/accounts/1", "b", token)
    assert stolen.status == 401
    assert stolen.json()["reason"] == "binding_mismatch"
    # b forges the proxy's header to claim a's certificate: the proxy overwrites it.
    forged = await _get(pki, edge + "/accounts/1", "b", token, [
        ("X-SSL-Client-Cert", "x"), ("Client-Cert", encode_client_cert(a.der))])
    assert forged.status == 401
    assert forged.json()["reason"] == "binding_mismatch"
    # b asks the proxy to drop the certificate header as hop-by-hop. HAProxy 2.6 obeys (it
    # removes headers named in Connection after set-header); nginx sets its own Connection.
    # Either way no weaker check follows: without the header there is no certificate.
    hop = await _get(pki, edge + "/accounts/1", "b", issuer.mint(b.thumbprint), [
        ("Connection", "X-SSL-Client-Cert, Client-Cert")])
    if name == "haproxy":
        assert hop.status == 401
        assert hop.json()["reason"] == "no_client_cert"
        assert len(upstream.seen) == 1
    else:   # the proxy kept its header: b's own token with b's own certificate passes
        assert hop.status == 200, hop.body
        assert upstream.seen[-1].headers["x-client-cert-thumbprint"] == [b.thumbprint]
        assert len(upstream.seen) == 2


async def test_bypassing_the_front_proxy_earns_nothing(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream) -> None:
    """A client that reaches the gateway directly, with a valid certificate of the same CA,
    cannot state a certificate in the header: it is not the proxy."""
    gw = await make_gateway(_config(pki, issuer, upstream, "rfc9440", mtls=True))
    token = issuer.mint(pki.clients["a"].thumbprint)
    reply = await gw.request("/accounts/1", cert="b", token=token, headers=[
        ("Client-Cert", encode_client_cert(pki.clients["a"].der))])
    assert reply.status == 401
    assert reply.json()["reason"] == "no_client_cert"
    assert upstream.seen == []
