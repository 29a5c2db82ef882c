"""A reload keeps what still holds: keys, caches and breaker of unchanged providers, in a real
gateway process, during a JWKS and an introspection outage."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from introspection_server import AuthServer, introspection_config

from gwtest import AUDIENCE, GatewayProcess, Issuer, Pki, Upstream
from mtls_gateway.config_load import load_config
from mtls_gateway.gateway import Gateway
from mtls_gateway.metrics import Metrics
from mtls_gateway.reload_carry import carry_over, provider_files_digest


def write_atomically(path: Path, config: dict[str, Any]) -> None:
    """The safe way to change a watched file: a complete copy renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config))
    os.replace(tmp, path)


async def reloads(gw: GatewayProcess, result: str) -> int:
    async with aiohttp.ClientSession() as s, s.get(gw.admin_url + "/metrics") as resp:
        text = await resp.text()
    m = re.search(rf'mtls_gateway_config_reloads_total{{result="{result}"}} (\S+)', text)
    return int(float(m.group(1))) if m else 0


async def wait_reloads(gw: GatewayProcess, result: str, count: int) -> None:
    for _ in range(150):
        if await reloads(gw, result) >= count:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {result} reload #{count}:\n" + "\n".join(gw.output[-30:]))


async def get(session: aiohttp.ClientSession, url: str, token: str | None = None
              ) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.get(url, headers=headers) as resp:
        body = await resp.json(content_type=None) if resp.status != 200 else {}
        return resp.status, body.get("reason", "")


async def test_reload_during_outage_keeps_keys_caches_and_readiness(
        pki: Pki, issuer: Issuer, upstream: Upstream, auth_server: AuthServer,
        tmp_path: Path) -> None:
    config = introspection_config(pki, issuer, upstream, auth_server, tmp_path)
    config["reload_interval"] = "100ms"
    a = pki.clients["a"].thumbprint
    jwt_before = issuer.mint(a)
    opaque = auth_server.issue(a)
    async with GatewayProcess(config, tmp_path) as gw, aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=pki.client_context("a")),
            timeout=aiohttp.ClientTimeout(total=15)) as session:
        assert await get(session, gw.url + "/x", jwt_before) == (200, "")
        assert await get(session, gw.url + "/x", opaque) == (200, "")     # now cached
        # the authorization server goes down: JWKS and introspection both fail
        issuer.fail_with = 503
        await auth_server.stop()
        # an unrelated edit, plus a new provider whose keys cannot load
        config["routes"].insert(0, {"name": "status", "path": "/status", "auth": "none"})
        config["providers"]["later"] = {
            "type": "jwt", "issuer": "https://later.test", "audiences": [AUDIENCE],
            "jwks_uri": "https://127.0.0.1:1/jwks.json", "jwks_timeout": "500ms"}
        config["routes"].insert(0, {"name": "later", "path_prefix": "/later",
                                    "auth": {"provider": "later"}})
        write_atomically(gw.path, config)
        await wait_reloads(gw, "success", 1)
        assert await get(session, gw.url + "/status") == (200, "")
        assert await get(session, gw.url + "/x", jwt_before) == (200, "")   # verified cache
        assert await get(session, gw.url + "/x", issuer.mint(a)) == (200, "")   # last keys
        assert await get(session, gw.url + "/x", opaque) == (200, "")   # introspection cache
        # the new provider is down on its own routes only, and the pod stays in service
        later = issuer.mint(a, iss="https://later.test")
        assert await get(session, gw.url + "/later/x", later) == (503, "jwks_unavailable")
        assert await gw.wait_ready(200, seconds=1)
        # an audience change rebuilds the checks but keeps the key set
        config["providers"]["corp"]["audiences"] = [AUDIENCE, "https://other.test"]
        write_atomically(gw.path, config)
        await wait_reloads(gw, "success", 2)
        other = issuer.mint(a, aud="https://other.test")
        assert await get(session, gw.url + "/x", other) == (200, "")
        assert await reloads(gw, "failure") == 0
    assert "later" not in [s.path_qs.split("/")[1] for s in upstream.seen]


async def test_carry_over_by_definition_and_by_file_contents(
        pki: Pki, issuer: Issuer, upstream: Upstream, auth_server: AuthServer,
        tmp_path: Path) -> None:
    config = introspection_config(pki, issuer, upstream, auth_server, tmp_path)
    ca_copy = tmp_path / "as-ca.pem"
    ca_copy.write_bytes(pki.ca_file.read_bytes())
    config["providers"]["opaque"]["ca_file"] = str(ca_copy)
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config))
    metrics = Metrics()
    first = load_config(path)
    old = Gateway(first, metrics)
    files = provider_files_digest(first.providers)

    same = carry_over(old, load_config(path), metrics, files, files)
    assert sorted(same.kept) == ["corp", "opaque"] and not same.fresh
    assert same.verifiers["opaque"] is old.verifiers["opaque"]

    config["providers"]["corp"]["audiences"] = ["https://elsewhere.test"]
    config["providers"]["opaque"]["timeout"] = "2s"
    path.write_text(yaml.safe_dump(config))
    changed = carry_over(old, load_config(path), metrics, files, files)
    assert changed.keys_only == ["corp"] and changed.fresh == ["opaque"]
    assert changed.verifiers["corp"].keys is old.verifiers["corp"].keys   # type: ignore[attr-defined]

    config["providers"]["corp"]["jwks_uri"] = issuer.jwks_uri + "?v=2"
    path.write_text(yaml.safe_dump(config))
    assert carry_over(old, load_config(path), metrics, files, files).fresh == ["corp", "opaque"]

    # same definition, but a CA file rewritten in place: rebuilt
    ca_copy.write_bytes(pki.ca_file.read_bytes() + b"\n")
    rotated = provider_files_digest(first.providers)
    moved = carry_over(old, first, metrics, files, rotated)
    assert moved.kept == ["corp"] and moved.fresh == ["opaque"]

    # what was handed over is never closed by the retiring gateway
    old.release(moved.handed_over)
    assert old.owned == {"opaque"}
