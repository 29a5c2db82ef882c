"""``--workers 2``: two processes serve one port; the parent's admin port sums them."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from pathlib import Path

import aiohttp
import pytest

from gwtest import GatewayProcess, Pki, Upstream, base_config

TIMEOUT = aiohttp.ClientTimeout(total=15)


@pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT load spreading is Linux's")
async def test_two_workers_share_one_port(pki: Pki, upstream: Upstream, tmp_path: Path) -> None:
    config = base_config(pki, None, upstream)
    config["routes"] = [{"name": "all", "path_prefix": "/", "auth": "none"}]
    requests = 60
    async with GatewayProcess(config, tmp_path, "--workers", "2") as gw, \
            aiohttp.ClientSession() as plain:
        for _ in range(requests):  # a new connection each time: the kernel picks a worker
            connector = aiohttp.TCPConnector(ssl=pki.client_context("a"), force_close=True)
            async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as s, \
                    s.get(gw.url + "/w") as resp:
                assert resp.status == 200
        # A request is counted just after its answer is written, so the last one may not
        # be counted yet when its answer arrives: read until it is (bounded).
        for _ in range(50):
            async with plain.get(gw.admin_url + "/metrics") as resp:
                metrics = await resp.text()
            total = sum(float(m) for m in re.findall(
                r'^mtls_gateway_requests_total\{[^}]*route="all"[^}]*\} (\S+)$', metrics,
                re.M))
            if total >= requests:
                break
            await asyncio.sleep(0.1)
        assert total == requests          # the parent sums both workers' counters
        assert await gw.stop() == 0
        pids = {line["pid"] for line in gw.log("mtls_gateway.access")}
        assert len(pids) == 2             # both workers served requests
        assert len(upstream.seen) == requests


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit may wait for a reaper we do not control)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
async def test_workers_stop_when_the_parent_is_killed(pki: Pki, upstream: Upstream,
                                                      tmp_path: Path) -> None:
    """SIGKILL (the OOM killer) leaves the parent no time to stop its workers: the kernel
    tells them, and they must not go on serving the port unsupervised."""
    config = base_config(pki, None, upstream)
    config["routes"] = [{"name": "all", "path_prefix": "/", "auth": "none"}]
    async with GatewayProcess(config, tmp_path, "--workers", "2") as gw:
        for _ in range(50):
            workers = {r["pid"] for r in gw.log("mtls_gateway.app")
                       if r["message"].startswith("gateway listening")}
            if len(workers) == 2:
                break
            await asyncio.sleep(0.1)
        assert len(workers) == 2 and gw.proc.pid not in workers
        assert all(_running(pid) for pid in workers)
        gw.proc.kill()
        # wait() also waits for the output pipe, which workers that live on keep open
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(gw.proc.wait(), 30)
        for _ in range(300):
            if not any(_running(pid) for pid in workers):
                break
            await asyncio.sleep(0.1)
        assert not any(_running(pid) for pid in workers)
