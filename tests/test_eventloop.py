"""The event loop: uvloop when installed and not turned off, asyncio's own otherwise; the
gateway enforces the same binding on both, with each kind of listener (a real
``mtls-gateway run`` process each)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gwtest import Issuer, Pki, Upstream, base_config
from mtls_gateway import eventloop
from mtls_gateway.cert_headers import encode_client_cert

REPO = Path(__file__).resolve().parent.parent
uvloop = pytest.importorskip("uvloop", reason="uvloop comes with the test extras; "
                                              "pip install -e '.[test]'")


@pytest.mark.parametrize(("env", "expected"), [
    (None, "uvloop"), ("1", "uvloop"), ("yes", "uvloop"),
    ("0", "asyncio"), ("off", "asyncio"), ("false", "asyncio"), (" No ", "asyncio"),
])
def test_loop_choice(monkeypatch: pytest.MonkeyPatch, env: str | None, expected: str) -> None:
    if env is None:
        monkeypatch.delenv(eventloop.UVLOOP_ENV, raising=False)
    else:
        monkeypatch.setenv(eventloop.UVLOOP_ENV, env)

    async def which() -> str:
        return eventloop.loop_name(asyncio.get_running_loop())

    assert eventloop.run(which()) == expected


def test_without_uvloop_installed_the_standard_loop_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(eventloop.UVLOOP_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "uvloop", None)   # import uvloop -> ImportError
    assert eventloop.loop_factory() is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listener(config: dict[str, Any], mode: str) -> None:
    """pki: CPython ssl; any: the pyOpenSSL transport (tls_any.py); header: plain HTTP behind
    a trusted front proxy (RFC 9440 Client-Cert)."""
    if mode == "any":
        del config["listen"]["client_ca_file"]
        config["listen"]["client_ca"] = "any"
    elif mode == "header":
        config["listen"] = {"tls": False, "client_certificate": {
            "source": "header", "format": "rfc9440",
            "trusted_proxies": {"cidrs": ["127.0.0.1/32"]}}}


@pytest.mark.parametrize("mode", ["pki", "any", "header"])
@pytest.mark.parametrize("env", ["1", "0"])
async def test_gateway_process_on_each_loop_enforces_the_binding(
        pki: Pki, issuer: Issuer, upstream: Upstream, tmp_path: Path, env: str,
        mode: str) -> None:
    config = base_config(pki, issuer, upstream)
    _listener(config, mode)
    config["listen"]["port"] = _free_port()
    config["admin"] = {"enabled": True, "host": "127.0.0.1", "port": _free_port()}
    config["reload_interval"] = "0s"
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mtls_gateway", "run", "--config", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=REPO,
        env={**os.environ, eventloop.UVLOOP_ENV: env})
    url = f"{'http' if mode == 'header' else 'https'}://127.0.0.1:{config['listen']['port']}/api"
    token = issuer.mint(pki.clients["a"].thumbprint)
    try:
        async with aiohttp.ClientSession() as plain:
            for _ in range(150):
                with contextlib.suppress(aiohttp.ClientError):
                    async with plain.get(f"http://127.0.0.1:{config['admin']['port']}/readyz") \
                            as resp:
                        if resp.status == 200:
                            break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("gateway never became ready")
        statuses = {}
        for cert in ("a", "b"):     # keep-alive: both requests on one connection per cert
            headers = {"Authorization": f"Bearer {token}"}
            if mode == "header":
                headers["Client-Cert"] = encode_client_cert(pki.clients[cert].der)
            connector = aiohttp.TCPConnector(
                ssl=False if mode == "header" else pki.client_context(cert))
            async with aiohttp.ClientSession(connector=connector) as s:
                for _ in range(2):
                    async with s.get(url, headers=headers) as r:
                        statuses.setdefault(cert, []).append(r.status)
        assert statuses == {"a": [200, 200], "b": [401, 401]}
        assert [seen.path_qs for seen in upstream.seen] == ["/api", "/api"]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert proc.stdout is not None
        lines = [json.loads(line) for line in (await proc.stdout.read()).decode().splitlines()
                 if line.startswith("{")]
        loops = [line["message"] for line in lines if line.get("logger") ==
                 "mtls_gateway.eventloop"]
        assert loops == [f"event loop: {'uvloop' if env == '1' else 'asyncio'}"]
        reasons = [line["reason"] for line in lines if line.get("logger") ==
                   "mtls_gateway.access"]
        assert reasons == ["allowed", "allowed", "binding_mismatch", "binding_mismatch"]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

