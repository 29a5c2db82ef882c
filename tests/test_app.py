"""The gateway process: hot reload of config and TLS material, and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from cryptography import x509

from gwtest import GatewayProcess, Issuer, Pki, RunningGateway, Upstream, base_config
from mtls_gateway import pki as pki_mod
from mtls_gateway.pki import CertKey


class Material:
    """TLS files in a folder laid out like a Kubernetes Secret volume (..data symlink)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0

    def publish(self, files: dict[str, bytes]) -> None:
        """Atomically swap the whole set, as the kubelet does."""
        self.generation += 1
        target = self.root / f"..gen{self.generation}"
        target.mkdir()
        for name, data in files.items():
            (target / name).write_bytes(data)
        tmp_link = self.root / "..data_tmp"
        tmp_link.symlink_to(target.name)
        os.replace(tmp_link, self.root / "..data")
        for name in files:
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")


def _files(server: CertKey, *client_cas: CertKey) -> dict[str, bytes]:
    return {"tls.crt": server.cert_pem, "tls.key": server.key_pem,
            "ca.crt": b"".join(ca.cert_pem for ca in client_cas)}


@pytest.fixture
def cas() -> dict[str, Any]:
    ca1, ca2 = pki_mod.make_ca("rotation CA 1"), pki_mod.make_ca("rotation CA 2")
    return {"ca1": ca1, "ca2": ca2, "server1": pki_mod.issue_server(ca1),
            "server2": pki_mod.issue_server(ca2), "client1": pki_mod.issue_client(ca1, "c1"),
            "client2": pki_mod.issue_client(ca2, "c2")}


def _client_ctx(tmp: Path, client: CertKey, *trust: CertKey) -> ssl.SSLContext:
    name = client.cert.subject.rfc4514_string().replace(",", "_").replace("=", "-")
    crt, key = client.write(tmp / "clients", name)
    ctx = ssl.create_default_context(cadata="".join(t.cert_pem.decode() for t in trust))
    ctx.check_hostname = False
    ctx.load_cert_chain(crt, key)
    return ctx


class Conn:
    """A raw keep-alive HTTP/1.1 connection, to prove an old connection survives a reload."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, ctx: ssl.SSLContext) -> Conn:
        return cls(*await asyncio.open_connection("127.0.0.1", port, ssl=ctx))

    def server_issuer(self) -> str:
        der = self.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).issuer.rfc4514_string()

    async def get(self, path: str) -> int:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


async def _handshake_ok(port: int, ctx: ssl.SSLContext) -> bool:
    """A new connection completes a request (TLS 1.3 reports a refused cert on first read)."""
    try:
        conn = await Conn.open(port, ctx)
        try:
            return await conn.get("/public/x") == 200
        finally:
            conn.close()
    except (ssl.SSLError, ConnectionError, IndexError, asyncio.IncompleteReadError):
        return False


async def _start(make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream,
                 material: Material, stack: str = "openssl", **extra: Any) -> RunningGateway:
    config = base_config(pki, issuer, upstream)
    config["listen"].update(cert_file=str(material.root / "tls.crt"),
                            key_file=str(material.root / "tls.key"),
                            client_ca_file=str(material.root / "ca.crt"), tls_stack=stack)
    config.update(extra)
    gw: RunningGateway = await make_gateway(config)
    return gw


@pytest.mark.parametrize("stack", ["openssl", "python"])     # listen.tls_stack
async def test_rotated_server_cert_and_client_ca(make_gateway: Any, pki: Pki, issuer: Issuer,
                                                upstream: Upstream, tmp_path: Path,
                                                cas: dict[str, Any], stack: str) -> None:
    material = Material(tmp_path / "secret")
    material.root.mkdir()
    material.publish(_files(cas["server1"], cas["ca1"]))
    gw = await _start(make_gateway, pki, issuer, upstream, material, stack,
                      reload_interval="100ms")
    port = gw.server.port
    trust_both = (cas["ca1"], cas["ca2"])
    c1 = _client_ctx(tmp_path, cas["client1"], *trust_both)
    c2 = _client_ctx(tmp_path, cas["client2"], *trust_both)
    old = await Conn.open(port, c1)
    assert await old.get("/public/a") == 200
    assert "rotation CA 1" in old.server_issuer()
    assert not await _handshake_ok(port, c2)

    gateway_before = gw.server.gateway
    material.publish(_files(cas["server2"], cas["ca2"]))       # the kubelet swaps the Secret
    reloads = gw.server.metrics.config_reloads.labels("success")
    for _ in range(50):
        if reloads._value.get() >= 1:
            break
        await asyncio.sleep(0.1)
    assert reloads._value.get() == 1
    assert gw.server.gateway is gateway_before    # TLS only: routes, verifiers, caches kept

    new = await Conn.open(port, c2)
    assert await new.get("/public/b") == 200                     # the new CA's client is in
    assert "rotation CA 2" in new.server_issuer()               # and sees the new certificate
    new.close()
    assert not await _handshake_ok(port, c1)                     # the removed CA's client is out
    assert await old.get("/public/c") == 200                     # the old connection lives on
    old.close()
    assert [s.path_qs for s in upstream.seen] == ["/public/a", "/public/b", "/public/c"]


@pytest.mark.parametrize("stack", ["openssl", "python"])
@pytest.mark.parametrize("broken", ["garbage-cert", "key-mismatch", "half-yaml", "bad-route"])
async def test_broken_material_is_refused_and_old_kept(make_gateway: Any, pki: Pki,
                                                      issuer: Issuer, upstream: Upstream,
                                                      tmp_path: Path, cas: dict[str, Any],
                                                      broken: str,
                                                      caplog: pytest.LogCaptureFixture,
                                                      stack: str) -> None:
    material = Material(tmp_path / "secret")
    material.root.mkdir()
    material.publish(_files(cas["server1"], cas["ca1"]))
    gw = await _start(make_gateway, pki, issuer, upstream, material, stack,
                      reload_interval="0s")
    c1 = _client_ctx(tmp_path, cas["client1"], cas["ca1"])
    if broken == "garbage-cert":
        material.publish({**_files(cas["server1"], cas["ca1"]), "tls.crt": b"-----BEGIN CERT"})
    elif broken == "key-mismatch":
        material.publish({**_files(cas["server2"], cas["ca1"]),
                          "tls.key": cas["server1"].key_pem})
    else:
        text = gw.config_path.read_text()
        gw.config_path.write_text(text[: len(text) // 2] + "\n  - [" if broken == "half-yaml"
                                  else text.replace("provider: corp", "provider: nobody"))
    assert await gw.server.reload("test") is False
    assert "reload (test) refused" in caplog.text
    assert gw.server.metrics.config_reloads.labels("failure")._value.get() == 1
    assert await _handshake_ok(gw.server.port, c1)


async def test_config_reload_changes_routes_for_new_requests(
        make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream) -> None:
    gw = await make_gateway(base_config(pki, issuer, upstream))
    assert (await gw.request("/open/x", cert=None)).status == 401
    config = yaml.safe_load(gw.config_path.read_text())
    config["routes"].insert(0, {"name": "open", "path_prefix": "/open", "auth": "none"})
    gw.config_path.write_text(yaml.safe_dump(config))
    before = gw.server.gateway
    assert await gw.server.reload("test") is True
    assert gw.server.gateway is not before
    assert (await gw.request("/open/x", cert=None)).status == 200


@pytest.mark.skipif(sys.platform != "linux", reason="signals and SO_REUSEPORT as on Linux")
async def test_sigterm_drains_in_flight_then_exits_and_sighup_reloads(
        pki: Pki, upstream: Upstream, tmp_path: Path) -> None:
    config = base_config(pki, None, upstream)
    config["routes"] = [{"name": "all", "path_prefix": "/", "auth": "none"}]
    config.update(shutdown_delay="1s", shutdown_grace="10s")
    async with GatewayProcess(config, tmp_path) as gw, aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=pki.client_context("a")),
            timeout=aiohttp.ClientTimeout(total=15)) as session:
        # SIGHUP reloads (config with a new route)
        config["routes"].insert(0, {"name": "closed", "path": "/closed",
                                    "auth": {"provider": "nobody"}})
        config["providers"] = {"nobody": {"type": "jwt", "issuer": "https://n.test",
                                          "audiences": ["x"], "jwks": {"keys": []}}}
        gw.write_config()
        gw.proc.send_signal(signal.SIGHUP)
        # the new config has an empty JWKS: refused, so the old one stays
        await asyncio.sleep(0.5)
        async with session.get(gw.url + "/closed") as resp:
            assert resp.status == 200
        slow = asyncio.create_task(session.get(gw.url + "/slow?s=2"))
        await asyncio.sleep(0.3)
        gw.proc.send_signal(signal.SIGTERM)
        assert await gw.wait_ready(503)
        resp = await slow
        assert resp.status == 200           # the in-flight request finished
        resp.release()
        assert await gw.stop(seconds=20, terminate=False) == 0
        out = "\n".join(gw.output)
        assert "reload (SIGHUP) refused" in out and '"stopped"' in out
    assert [s.path_qs for s in upstream.seen] == ["/closed", "/slow?s=2"]




# --- reload failures and half-written files (issue 20) ----------------------------------------

async def _reloads(gw: GatewayProcess, result: str) -> int:
    async with aiohttp.ClientSession() as s, s.get(gw.admin_url + "/metrics") as resp:
        text = await resp.text()
    m = re.search(rf'mtls_gateway_config_reloads_total{{result="{result}"}} (\S+)', text)
    return int(float(m.group(1))) if m else 0


async def _wait_reloads(gw: GatewayProcess, result: str, count: int) -> None:
    for _ in range(150):
        if await _reloads(gw, result) >= count:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {result} reload #{count}:\n" + "\n".join(gw.output[-30:]))


def _write_atomically(path: Path, config: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config))
    os.replace(tmp, path)


async def test_watcher_survives_a_config_that_fails_to_start(
        pki: Pki, upstream: Upstream, tmp_path: Path) -> None:
    """A reload that fails (here: an introspection client key not matching its certificate)
    is logged and counted, the old config keeps serving, and later edits are picked up."""
    config = base_config(pki, None, upstream)
    config["routes"] = [{"name": "all", "path_prefix": "/", "auth": "none"}]
    config["reload_interval"] = "100ms"
    async with GatewayProcess(config, tmp_path) as gw, aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=pki.client_context("a")),
            timeout=aiohttp.ClientTimeout(total=15)) as session:
        broken = yaml.safe_load(yaml.safe_dump(config))
        broken["providers"] = {"opaque": {
            "type": "introspection", "endpoint": "https://127.0.0.1:1/introspect",
            "client_id": "gw", "auth_method": "tls_client_auth",
            "client_cert_file": str(pki.clients["a"].cert),
            "client_key_file": str(pki.clients["b"].key)}}      # b's key, a's certificate
        broken["routes"].insert(0, {"name": "closed", "path": "/closed",
                                    "auth": {"provider": "opaque"}})
        _write_atomically(gw.path, broken)
        await _wait_reloads(gw, "failure", 1)
        async with session.get(gw.url + "/closed") as resp:
            assert resp.status == 200                   # the old config still serves
        config["routes"].insert(0, {"name": "gone", "path": "/gone",
                                    "auth": {"provider": "nobody"}})
        config["providers"] = {"nobody": {"type": "jwt", "issuer": "https://n.test",
                                          "audiences": ["x"], "jwks_uri": "https://n.test/k"}}
        config["providers"]["nobody"]["jwks_uri"] = "https://127.0.0.1:1/jwks"
        config["providers"]["nobody"]["jwks_timeout"] = "200ms"
        _write_atomically(gw.path, config)
        await _wait_reloads(gw, "success", 1)
        async with session.get(gw.url + "/gone") as resp:
            assert resp.status == 401                   # the later edit is live
        out = "\n".join(gw.output)
        assert "reload (files changed) refused" in out
        assert "Traceback" not in out


async def test_unexpected_reload_error_is_counted_and_watching_goes_on(
        make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    gw = await make_gateway(base_config(pki, issuer, upstream))
    gw.server.settle_seconds = 0.05
    config = yaml.safe_load(gw.config_path.read_text())
    config["providers"]["second"] = {**config["providers"]["corp"],
                                     "issuer": "https://second.test"}     # corp: unchanged
    config["routes"].insert(0, {"name": "second", "path_prefix": "/second",
                                "auth": {"provider": "second"}})
    gw.config_path.write_text(yaml.safe_dump(config))
    corp = gw.server.gateway.verifiers["corp"]

    async def boom(self: object) -> None:
        raise RuntimeError("a bug while starting a verifier")

    monkeypatch.setattr("mtls_gateway.jwks.JwksSource.start", boom)
    before = gw.server.gateway
    assert await gw.server.reload("test") is False
    assert "a bug while starting a verifier" in caplog.text
    assert gw.server.metrics.config_reloads.labels("failure")._value.get() == 1
    assert gw.server.gateway is before
    monkeypatch.undo()
    # the failed gateway did not close the verifier it was handed (it still refreshes)
    session = corp.keys._document._session    # type: ignore[attr-defined]
    assert session is not None and not session.closed
    assert (await gw.request("/x", token=issuer.mint(pki.clients["a"].thumbprint))).status \
        == 200
    config["routes"].insert(0, {"name": "open", "path_prefix": "/open", "auth": "none"})
    gw.config_path.write_text(yaml.safe_dump(config))
    assert await gw.server.reload("test") is True
    assert (await gw.request("/open/x", cert=None)).status == 200


async def test_half_written_config_is_never_loaded(
        pki: Pki, issuer: Issuer, upstream: Upstream, tmp_path: Path) -> None:
    """A writer that truncates and writes in two steps: the part before ``scopes:`` is valid
    YAML on its own, and must not be loaded (it would let a token without the scope in)."""
    config = base_config(pki, issuer, upstream)
    config["routes"][1]["path_prefix"] = "/api"
    config["reload_interval"] = "100ms"
    token = issuer.mint(pki.clients["a"].thumbprint, scope="accounts:read")
    async with GatewayProcess(config, tmp_path) as gw, aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=pki.client_context("a")),
            timeout=aiohttp.ClientTimeout(total=15)) as session:
        routes = config.pop("routes")
        routes.append({"name": "admin", "path_prefix": "/admin",
                       "auth": {"provider": "corp", "scopes": ["admin"]}})
        text = yaml.safe_dump({**config, "routes": routes}, sort_keys=False)
        cut = text.index("    scopes:")
        seen: list[int] = []
        done = asyncio.Event()

        async def probe() -> None:
            while not done.is_set():
                async with session.get(gw.url + "/admin/x",
                                       headers={"Authorization": f"Bearer {token}"}) as resp:
                    seen.append(resp.status)
                await asyncio.sleep(0.05)

        prober = asyncio.create_task(probe())
        with gw.path.open("w") as f:           # truncate, write a part, pause, write the rest
            f.write(text[:cut])
            f.flush()
            await asyncio.sleep(0.4)
            f.write(text[cut:])
        await _wait_reloads(gw, "success", 1)
        await asyncio.sleep(0.2)
        done.set()
        await prober
        assert 200 not in seen, seen
        assert seen[-1] == 403
    assert not [s for s in upstream.seen if s.path_qs.startswith("/admin")]


@pytest.mark.parametrize(("stack", "applies"), [("openssl", True), ("python", False)])
async def test_reload_of_client_cert_and_tls_stack_on_the_pki_listener(
        make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream,
        caplog: pytest.LogCaptureFixture, stack: str, applies: bool) -> None:
    """The openssl stack rebuilds its whole context on reload, so client_cert applies to new
    handshakes; Python's ssl keeps the verify mode it was bound with (a restart, as logged).
    A changed tls_stack keeps the running stack until a restart, and says so."""
    config = base_config(pki, issuer, upstream)
    config["listen"].update(tls_stack=stack, client_cert="optional")
    gw = await make_gateway(config)
    site_before = gw.server._tls
    assert (await gw.request("/public/a", cert=None)).status == 200
    config["listen"].update(client_cert="required",
                            tls_stack="python" if stack == "openssl" else "openssl")
    gw.config_path.write_text(yaml.safe_dump(config))
    with caplog.at_level(logging.WARNING, logger="mtls_gateway.app"):
        assert await gw.server.reload("test") is True
    assert gw.server._tls is site_before                      # the stack chosen at start
    assert "listen.tls_stack changed in the config; it takes effect after a restart" \
        in caplog.text
    assert ("listen.client_cert changed" in caplog.text) is not applies
    try:
        status: int | None = (await gw.request("/public/b", cert=None)).status
    except (aiohttp.ClientError, ssl.SSLError, ConnectionError):
        status = None
    assert status == (None if applies else 200)
    assert (await gw.request("/public/c", cert="a")).status == 200
    assert [s.path_qs for s in upstream.seen] == (
        ["/public/a", "/public/c"] if applies else ["/public/a", "/public/b", "/public/c"])
