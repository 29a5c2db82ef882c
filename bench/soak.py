"""Soak test: minutes of mixed valid and hostile traffic against a gateway process, with a
client-certificate rotation, a server-certificate rotation and a JWKS key rotation in the
middle. Not part of the test suite.

    .venv/bin/python bench/soak.py --minutes 5 [--concurrency 8]

Everything runs on 127.0.0.1: a JWKS issuer (HTTPS) and an upstream in this process, the
gateway as a separate process (``python -m mtls_gateway run``), started from a fresh PKI in
a temporary folder. Every request has an expected status (200, 400, 401, 413); any other
answer, or a connection error, is an *unexpected error*. The report gives request counts
per kind, unexpected errors (must be 0: the exit status is 1 otherwise), and the gateway's
RSS and open file descriptors after warm-up and at the end.

Timeline (fractions of the run): 0.4 the client switches to a new certificate (tokens bound
to it); 0.5 the issuer publishes a new signing key first and signs with it (the old key stays
published); 0.6 the gateway's server certificate and key are replaced on disk (hot reload);
0.7 to 0.85 the authorization server is down: its JWKS and its introspection endpoint answer
503; at 0.75, in the middle of that outage, the config is edited (a public route added, the
file replaced by an atomic rename): the reload keeps the last good keys and the caches, so
the traffic sees no difference (issue 20).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import yaml
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from yarl import URL

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mtls_gateway import pki  # noqa: E402
from mtls_gateway.thumbprint import x5t_s256  # noqa: E402

ISSUER, AUDIENCE = "https://soak-issuer.test", "https://api.test"
BODY_CAP = 256 * 1024


@dataclass
class Client:
    ctx: ssl.SSLContext
    thumbprint: str


@dataclass
class State:
    """What the traffic uses now; replaced as a whole at a rotation."""

    client: Client
    other: Client                   # another certificate of the same CA (binding mismatch)
    signing: tuple[str, Any]        # (kid, private key)
    published: list[tuple[str, Any]]
    tokens: dict[str, str] = field(default_factory=dict)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _client(ca: pki.CertKey, directory: Path, name: str, ca_file: Path) -> Client:
    leaf = pki.issue_client(ca, name)
    crt, key = leaf.write(directory, name)
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.load_cert_chain(crt, key)
    return Client(ctx, x5t_s256(leaf.cert_der))


def _mint(state: State, thumbprint: str, **override: Any) -> str:
    kid, key = state.signing
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "soak", "client_id": "soak",
              "iat": now, "exp": now + 600, "jti": uuid.uuid4().hex, "scope": "accounts:read",
              "cnf": {"x5t#S256": thumbprint}, **override}
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, key,
                      algorithm="RS256", headers={"kid": kid, "typ": "at+jwt"})


def _tokens(state: State, opaque: dict[str, dict[str, Any]]) -> dict[str, str]:
    now = int(time.time())
    token = uuid.uuid4().hex + uuid.uuid4().hex
    opaque[token] = {"active": True, "sub": "soak", "client_id": "soak", "iat": now,
                     "exp": now + 600, "scope": "accounts:read", "iss": ISSUER, "aud": AUDIENCE,
                     "cnf": {"x5t#S256": state.client.thumbprint}}
    return {"valid": _mint(state, state.client.thumbprint),
            "opaque": token,
            "other_cert": _mint(state, state.other.thumbprint),
            "expired": _mint(state, state.client.thumbprint, exp=now - 600, iat=now - 900),
            "wrong_aud": _mint(state, state.client.thumbprint, aud="https://elsewhere.test")}


# (kind, method, path, token key or literal, body size, expected status)
KINDS: list[tuple[str, str, str, str | None, int, int]] = [
    ("valid_get", "GET", "/api/accounts/1", "valid", 0, 200),
    ("valid_post", "POST", "/api/payments", "valid", 4096, 200),
    ("opaque", "GET", "/api/accounts/2", "opaque", 0, 200),
    ("public", "GET", "/public/health", None, 0, 200),
    ("no_token", "GET", "/api/accounts/1", None, 0, 401),
    ("other_cert", "GET", "/api/accounts/1", "other_cert", 0, 401),
    ("expired", "GET", "/api/accounts/1", "expired", 0, 401),
    ("wrong_aud", "GET", "/api/accounts/1", "wrong_aud", 0, 401),
    ("garbage", "GET", "/api/accounts/1", "=garbage", 0, 401),
    ("jwe", "GET", "/api/accounts/1", "=a.b.c.d.e", 0, 401),
    ("bad_path", "GET", "/api/a/%2e%2e/admin", "valid", 0, 400),
    ("too_large", "POST", "/api/upload", "valid", BODY_CAP + 1, 413),
]
WEIGHTS = [30, 10, 10, 10, 8, 6, 6, 4, 8, 4, 6, 2]


async def _traffic(stop: float, port: int, holder: dict[str, State], results: Counter[str],
                   unexpected: list[str]) -> None:
    session: aiohttp.ClientSession | None = None
    current: State | None = None
    rng = random.Random()  # noqa: S311 - picks a traffic mix, not a secret
    try:
        while time.monotonic() < stop:
            state = holder["state"]
            if state is not current:          # rotation: new certificate, new connections
                if session is not None:
                    await session.close()
                session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=state.client.ctx, limit=2),
                    timeout=aiohttp.ClientTimeout(total=30))
                current = state
            kind, method, path, token_key, size, expected = rng.choices(KINDS, WEIGHTS)[0]
            headers = {}
            if token_key is not None:
                token = token_key[1:] if token_key.startswith("=") else state.tokens[token_key]
                headers["Authorization"] = f"Bearer {token}"
            data = os.urandom(size) if size else None
            try:
                url = URL(f"https://127.0.0.1:{port}{path}", encoded=True)  # sent as written
                async with session.request(method, url, headers=headers, data=data) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                status = -1
                if kind == "too_large":   # the gateway may close while the body is sent
                    results[kind] += 1
                    continue
                unexpected.append(f"{kind}: {type(exc).__name__}: {exc}")
            results[kind] += 1
            if status != expected and status != -1:
                unexpected.append(f"{kind}: expected {expected}, got {status}")
    finally:
        if session is not None:
            await session.close()


def _proc_stats(pid: int) -> tuple[float, int]:
    rss_kb = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def _start_gateway(config_file: Path, err: Path) -> subprocess.Popen[bytes]:
    with err.open("wb") as stderr:
        return subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "mtls_gateway", "run", "--config", str(config_file)],
            stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, "SOAK_SECRET": "s"})


async def soak(minutes: float, concurrency: int) -> int:
    work = Path(tempfile.mkdtemp(prefix="mtls-soak-"))
    ca = pki.make_ca("soak CA")
    ca_file, _ = ca.write(work, "ca")
    server_cert, server_key = pki.issue_server(ca).write(work, "server")
    keys = [("k1", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
            ("k2", rsa.generate_private_key(public_exponent=65537, key_size=2048))]
    state = State(_client(ca, work, "client-a", ca_file), _client(ca, work, "client-b", ca_file),
                  keys[0], [keys[0]])
    opaque: dict[str, dict[str, Any]] = {}
    state.tokens = _tokens(state, opaque)
    holder = {"state": state}
    outage = {"on": False}

    # the issuer's JWKS and introspection (HTTPS) and the upstream (plain HTTP), in this process
    async def jwks(_: web.Request) -> web.Response:
        if outage["on"]:
            return web.Response(status=503, text="down")
        published = holder["state"].published
        return web.json_response({"keys": [
            {**json.loads(RSAAlgorithm.to_jwk(k.public_key())), "kid": kid, "alg": "RS256",
             "use": "sig"} for kid, k in published]})

    async def upstream(request: web.Request) -> web.Response:
        size = 0
        async for chunk in request.content.iter_chunked(65536):
            size += len(chunk)
        return web.json_response({"ok": True, "size": size})

    issuer_app, upstream_app = web.Application(), web.Application(client_max_size=1 << 30)
    async def introspect(request: web.Request) -> web.Response:
        form = await request.post()
        if outage["on"]:
            return web.Response(status=503, text="down")
        return web.json_response(opaque.get(str(form.get("token")), {"active": False}))

    issuer_app.router.add_get("/jwks", jwks)
    issuer_app.router.add_post("/introspect", introspect)
    upstream_app.router.add_route("*", "/{p:.*}", upstream)
    runners = []
    ports = {}
    for name, app, tls in (("issuer", issuer_app, True), ("upstream", upstream_app, False)):
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        ctx = None
        if tls:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(server_cert, server_key)
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
        ports[name] = runner.addresses[0][1]
        runners.append(runner)

    port, admin = _free_port(), _free_port()
    config = {
        "listen": {"host": "127.0.0.1", "port": port, "cert_file": str(server_cert),
                   "key_file": str(server_key), "client_ca_file": str(ca_file),
                   "client_cert": "required"},
        "admin": {"enabled": True, "host": "127.0.0.1", "port": admin},
        "logging": {"level": "WARNING"},
        "reload_interval": "1s",
        "limits": {"max_body_size": BODY_CAP},
        "providers": {"corp": {
            "type": "jwt", "issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": ["RS256"],
            "jwks_uri": f"https://127.0.0.1:{ports['issuer']}/jwks",
            "jwks_ca_file": str(ca_file), "jwks_refetch_cooldown": "1s"},
            "opaque": {
                "type": "introspection", "client_id": "soak", "client_secret_env": "SOAK_SECRET",
                "endpoint": f"https://127.0.0.1:{ports['issuer']}/introspect",
                "ca_file": str(ca_file), "issuer": ISSUER, "audiences": [AUDIENCE],
                "cache": {"ttl": "10m", "negative_ttl": "10m"}}},
        "upstream": {"url": f"http://127.0.0.1:{ports['upstream']}"},
        "routes": [{"name": "public", "path_prefix": "/public", "auth": "none"},
                   {"name": "api", "path_prefix": "/api",
                    "auth": {"provider": ["corp", "opaque"], "scopes": ["accounts:read"]}}],
    }
    config_file = work / "gateway.yaml"
    config_file.write_text(yaml.safe_dump(config))
    gateway = _start_gateway(config_file, work / "gateway.err")
    try:
        async with aiohttp.ClientSession() as probe:
            for _ in range(200):
                try:
                    async with probe.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            else:
                print("gateway did not become ready; see", work / "gateway.err")
                return 2

        results: Counter[str] = Counter()
        unexpected: list[str] = []
        duration = minutes * 60
        started = time.monotonic()
        stop = started + duration
        # warm-up (5% of the run, at least 5 s), then the baseline
        warm = min(max(5.0, duration * 0.05), duration / 4)
        tasks = [asyncio.create_task(_traffic(stop, port, holder, results, unexpected))
                 for _ in range(concurrency)]
        await asyncio.sleep(warm)
        rss0, fds0 = _proc_stats(gateway.pid)
        print(f"after warm-up ({warm:.0f}s): gateway RSS {rss0:.1f} MiB, {fds0} open fds",
              flush=True)

        async def at(fraction: float) -> None:
            await asyncio.sleep(max(0.0, started + duration * fraction - time.monotonic()))

        await at(0.4)
        new = State(_client(ca, work, "client-a-rotated", ca_file), state.other,
                    state.signing, state.published)
        new.tokens = _tokens(new, opaque)
        holder["state"] = new
        print(f"t={time.monotonic() - started:.0f}s client certificate rotated", flush=True)
        await at(0.5)
        rotated = State(new.client, new.other, keys[1], [keys[1], keys[0]])
        holder["state"] = rotated   # publish first: the JWKS serves k2 before any token uses it
        await asyncio.sleep(0)
        rotated.tokens = _tokens(rotated, opaque)
        print(f"t={time.monotonic() - started:.0f}s JWKS key rotated (k2 signs, k1 kept)",
              flush=True)
        await at(0.6)
        fresh = pki.issue_server(ca)
        tmp_dir = work / "rotate"
        fresh.write(tmp_dir, "server")
        os.replace(tmp_dir / "server.key", server_key)
        os.replace(tmp_dir / "server.crt", server_cert)
        print(f"t={time.monotonic() - started:.0f}s server certificate rotated on disk",
              flush=True)
        await at(0.7)
        outage["on"] = True
        print(f"t={time.monotonic() - started:.0f}s authorization server down (JWKS and "
              "introspection answer 503)", flush=True)
        await at(0.75)
        config["routes"].insert(0, {"name": "status", "path": "/status", "auth": "none"})
        (work / "gateway.yaml.tmp").write_text(yaml.safe_dump(config))
        os.replace(work / "gateway.yaml.tmp", config_file)
        print(f"t={time.monotonic() - started:.0f}s config edited during the outage (a "
              "public route added)", flush=True)
        await at(0.85)
        outage["on"] = False
        print(f"t={time.monotonic() - started:.0f}s authorization server back", flush=True)
        await asyncio.gather(*tasks)
        await asyncio.sleep(1.0)            # let the gateway settle (idle connections close)
        rss1, fds1 = _proc_stats(gateway.pid)
        total = sum(results.values())
        elapsed = time.monotonic() - started
        print(f"\nran {elapsed:.0f}s, {total} requests ({total / elapsed:.0f}/s), "
              f"concurrency {concurrency}")
        for kind, *_ in KINDS:
            print(f"  {kind:12s} {results[kind]}")
        print(f"unexpected errors: {len(unexpected)}")
        for line in Counter(unexpected).most_common(10):
            print("  ", line)
        print(f"gateway RSS: {rss0:.1f} MiB after warm-up -> {rss1:.1f} MiB at the end "
              f"({rss1 - rss0:+.1f} MiB)")
        print(f"gateway open fds: {fds0} after warm-up -> {fds1} at the end")
        async with aiohttp.ClientSession() as probe, probe.get(
                f"http://127.0.0.1:{admin}/metrics") as resp:
            reloads = {line.split('"')[1]: float(line.split()[-1])
                       for line in (await resp.text()).splitlines()
                       if line.startswith("mtls_gateway_config_reloads_total{")}
        print(f"reloads: {reloads}")
        edited = reloads.get("success", 0) >= 2 and not reloads.get("failure", 0)
        return 0 if not unexpected and edited and gateway.poll() is None else 1
    finally:
        gateway.send_signal(signal.SIGTERM)
        try:
            gateway.wait(30)
        except subprocess.TimeoutExpired:
            gateway.kill()
        for runner in runners:
            await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    sys.exit(asyncio.run(soak(args.minutes, args.concurrency)))


if __name__ == "__main__":
    main()
