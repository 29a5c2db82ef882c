"""``--workers 2``: two processes serve one port; the parent's admin port sums them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml

from gwtest import Pki, Upstream, base_config

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT load spreading is Linux's")
async def test_two_workers_share_one_port(pki: Pki, upstream: Upstream, tmp_path: Path) -> None:
    config = base_config(pki, None, upstream)
    config["routes"] = [{"name": "all", "path_prefix": "/", "auth": "none"}]
    config["listen"]["port"] = _free_port()
    config["admin"] = {"enabled": True, "host": "127.0.0.1", "port": _free_port()}
    config["reload_interval"] = "0s"
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mtls_gateway", "run", "--config", str(path), "--workers", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=REPO)
    admin = f"http://127.0.0.1:{config['admin']['port']}"
    url = f"https://127.0.0.1:{config['listen']['port']}/w"
    requests = 60
    try:
        async with aiohttp.ClientSession() as plain:
            for _ in range(150):
                with contextlib.suppress(aiohttp.ClientError):  # not listening yet
                    async with plain.get(admin + "/readyz") as resp:
                        if resp.status == 200:
                            break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("workers never became ready")
            for _ in range(requests):  # a new connection each time: the kernel picks a worker
                connector = aiohttp.TCPConnector(ssl=pki.client_context("a"), force_close=True)
                async with aiohttp.ClientSession(connector=connector) as s, s.get(url) as resp:
                    assert resp.status == 200
            # A request is counted just after its answer is written, so the last one may not
            # be counted yet when its answer arrives: read until it is (bounded).
            for _ in range(50):
                async with plain.get(admin + "/metrics") as resp:
                    metrics = await resp.text()
                total = sum(float(m) for m in re.findall(
                    r'^mtls_gateway_requests_total\{[^}]*route="all"[^}]*\} (\S+)$', metrics,
                    re.M))
                if total >= requests:
                    break
                await asyncio.sleep(0.1)
        assert total == requests          # the parent sums both workers' counters
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert proc.stdout is not None
        lines = [json.loads(line) for line in (await proc.stdout.read()).decode().splitlines()
                 if line.startswith("{")]
        pids = {line["pid"] for line in lines if line.get("logger") == "mtls_gateway.access"}
        assert len(pids) == 2             # both workers served requests
        assert len(upstream.seen) == requests
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
