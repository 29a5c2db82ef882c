"""Memory of the gateway: idle mutual-TLS connections, and many distinct tokens.

    .venv/bin/python bench/memory.py connections [--count 10000] [--haproxy | --tls-stack python]
    .venv/bin/python bench/memory.py tokens [--count 1000000]
    .venv/bin/python bench/memory.py churn [--count 2000] [--rounds 6] [--no-trim]

``connections``: the gateway started as a user would (``mtls-gateway run``, pinned to one core
like in run.py) behind the bench's upstream; ``bench/mtlsload -idle`` opens ``--count``
keep-alive mutual-TLS connections, each sends one request with alice's bound ES256 token
(so the connection's thumbprint is computed and the token verified), then stays idle. The
gateway's resident memory (VmRSS) is read before and once all connections are up; the
result is MiB per 1,000 connections. RLIMIT_NOFILE is raised to its hard limit first.
``--haproxy``: the same against HAProxy with bench/haproxy.cfg.template (maxconn raised to
the count), for comparison.

``churn``: the gateway started as for ``connections``; ``--rounds`` times, ``--count``
mutual-TLS connections are opened (a Python client in this process, 200 handshakes at a
time), each sends one request with alice's bound ES256 token, and all are closed again.
The gateway's RSS is printed with the connections open and again once they are closed and
the gateway had ``TRIM_INTERVAL`` + 2 s to trim (mtls_gateway/memtrim.py); flat means the
memory comes back. ``--no-trim`` runs the gateway with ``MTLS_GATEWAY_MALLOC_TRIM=0`` (the
behaviour before memtrim.py), for comparison.

``tokens``: in one process, the gateway's own ``JwtVerifier`` (built from a config by
``Gateway``, default ``verify_cache_size``) verifies ``--count`` distinct valid ES256 tokens
(each a fresh signature: every one is a cache miss, then an insert). Resident memory and the
cache's size are printed every 10 %; the cache never holds more than its bound.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from jwt.algorithms import ECAlgorithm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (
    AUDIENCE,
    ISSUER,
    SCOPE,
    Material,
    Procs,
    free_port,
    gateway_config,
    haproxy_config,
    make_material,
    pick_loadgen,
    pinning,
    start_gateway,
    start_helper,
    wait_for,
)

from mtls_gateway.config_load import load_config
from mtls_gateway.decision_log import token_digest
from mtls_gateway.gateway import Gateway
from mtls_gateway.metrics import Metrics


def rss_mib(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def tree_rss_mib(pid: int) -> float:
    from run import _tree

    return sum(rss_mib(p) for p in _tree(pid))


# --- idle connections ---------------------------------------------------------------------


def _quiet_config(m: Material, up_port: int) -> dict[str, Any]:
    """The bench gateway's config for memory runs: no introspection provider, WARNING logs."""
    config = gateway_config(m, f"http://127.0.0.1:{up_port}", "https://127.0.0.1:9/")
    del config["providers"]["opaque"]
    config["routes"] = [r for r in config["routes"] if r["name"] != "opaque"]
    config["logging"]["level"] = "WARNING"
    return config

def connections(count: int, timeout: float, haproxy: bool = False,
                tls_stack: str = "openssl") -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < count + 200:
        print(f"RLIMIT_NOFILE hard limit {hard} is below {count} connections + 200")
        return 2
    pin = pinning(True)
    loadgen = pick_loadgen("go", pin.load)
    with tempfile.TemporaryDirectory(prefix="mtls-gateway-memory-") as tmp:
        work = Path(tmp)
        procs = Procs(work)
        try:
            m = make_material(work / "pki")
            _up, up_port = start_helper(procs, pin.load, "upstream", "upstream")
            config = _quiet_config(m, up_port)
            config["listen"]["tls_stack"] = tls_stack
            if haproxy:
                port = free_port()
                text = haproxy_config(m, port, up_port).replace("maxconn 4000",
                                                                f"maxconn {count + 100}")
                (work / "haproxy.cfg").write_text(text)
                exe = shutil.which("haproxy")
                if exe is None:
                    print("haproxy is not installed")
                    return 2
                gateway = procs.start("haproxy", [*pin.sut, exe, "-db", "-f",
                                                  str(work / "haproxy.cfg")])
                wait_for("haproxy", gateway, r"", 2)
                time.sleep(1)
                if not gateway.alive():
                    print(gateway.log.read_text()[-2000:])
                    return 2
            else:
                gateway, port = start_gateway(procs, pin.sut, "gateway", config,
                                              work / "gw.yaml")
            time.sleep(1)
            before = rss_mib(gateway.pid)
            cert, key = m.certs["alice"]
            argv = [*loadgen.argv, "-url", f"https://127.0.0.1:{port}/jwt/x", "-cert", str(cert),
                    "-key", str(key), "-ca", str(m.ca), "-token-file", str(m.tokens["es256"]),
                    "-c", str(count), "-d", f"{int(timeout) + 60}s", "-idle"]
            started = time.monotonic()
            gen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,  # noqa: S603
                                   text=True)
            assert gen.stdout is not None
            ready = ""
            os.set_blocking(gen.stdout.fileno(), False)
            while time.monotonic() - started < timeout and gen.poll() is None:
                line = gen.stdout.readline()
                if line.startswith("IDLE READY"):
                    ready = line.strip()
                    break
                time.sleep(0.2)
            took = time.monotonic() - started
            time.sleep(2)
            after = rss_mib(gateway.pid)
            open_fds = len(list(Path(f"/proc/{gateway.pid}/fd").iterdir()))
            gen.terminate()
            gen.wait(30)
            ok = ready.startswith("IDLE READY")
            what = "haproxy" if haproxy else f"gateway (tls_stack: {tls_stack})"
            print(f"{what} pid {gateway.pid}: {count} idle keep-alive mTLS connections "
                  f"{'established' if ok else 'NOT all established'} in {took:.1f}s "
                  f"(one ES256 request each); {what} fds open: {open_fds}")
            print(f"{what} RSS: {before:.1f} MiB before, {after:.1f} MiB with the connections "
                  f"open: +{after - before:.1f} MiB = "
                  f"{(after - before) / count * 1000:.2f} MiB per 1,000 connections")
            return 0 if ok else 1
        finally:
            procs.stop_all()


# --- connection churn ----------------------------------------------------------------------

async def _one_connection(port: int, ctx: ssl.SSLContext, token: str,
                          gate: asyncio.Semaphore) -> asyncio.StreamWriter | None:
    async with gate:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                           server_hostname="localhost")
            writer.write(f"GET /jwt/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}"
                         "\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            return writer if head.startswith(b"HTTP/1.1 200") else None
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            return None


def churn(count: int, rounds: int, trim: bool) -> int:
    from mtls_gateway.memtrim import TRIM_INTERVAL

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    pin = pinning(True)
    with tempfile.TemporaryDirectory(prefix="mtls-gateway-memory-") as tmp:
        work = Path(tmp)
        procs = Procs(work)
        try:
            m = make_material(work / "pki")
            _up, up_port = start_helper(procs, pin.load, "upstream", "upstream")
            config = _quiet_config(m, up_port)
            env = {**os.environ, "MTLS_GATEWAY_MALLOC_TRIM": "1" if trim else "0"}
            gateway, port = start_gateway(procs, pin.sut, "gateway", config, work / "gw.yaml",
                                          env=env)
            time.sleep(1)
            cert, key = m.certs["alice"]
            ctx = ssl.create_default_context(cafile=str(m.ca))
            ctx.load_cert_chain(cert, key)
            token = m.tokens["es256"].read_text().strip()
            print(f"gateway pid {gateway.pid}, malloc_trim {'on' if trim else 'OFF'}: "
                  f"RSS at start {rss_mib(gateway.pid):.1f} MiB")

            async def one_round() -> int:
                gate = asyncio.Semaphore(200)
                writers = await asyncio.gather(*(_one_connection(port, ctx, token, gate)
                                                 for _ in range(count)))
                ok = [w for w in writers if w is not None]
                print(f"  {len(ok)}/{count} connections open: RSS "
                      f"{rss_mib(gateway.pid):7.1f} MiB", end="", flush=True)
                for w in ok:
                    w.close()
                await asyncio.gather(*(w.wait_closed() for w in ok), return_exceptions=True)
                return len(ok)

            for i in range(rounds):
                opened = asyncio.run(one_round())
                time.sleep(TRIM_INTERVAL + 2)
                print(f"; round {i + 1}: all closed, RSS {rss_mib(gateway.pid):7.1f} MiB",
                      flush=True)
                if opened != count:
                    return 1
            return 0
        finally:
            procs.stop_all()


# --- many tokens ----------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def tokens(count: int) -> int:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="mem-ec", use="sig", alg="ES256")
    with tempfile.TemporaryDirectory(prefix="mtls-gateway-memory-") as tmp:
        m = make_material(Path(tmp) / "pki")
        config = gateway_config(m, "http://127.0.0.1:9", "https://127.0.0.1:9/")
        config["providers"]["jwt"]["jwks"] = {"keys": [jwk]}
        path = Path(tmp) / "gw.yaml"
        path.write_text(yaml.safe_dump(config))
        verifier = Gateway(load_config(path), Metrics()).verifiers["jwt"]
    bound = verifier.provider.verify_cache_size       # type: ignore[attr-defined]
    cache = verifier._verified                        # type: ignore[attr-defined]
    header = _b64(json.dumps({"alg": "ES256", "typ": "at+jwt", "kid": "mem-ec"},
                             separators=(",", ":")).encode())
    now = int(time.time())
    base = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "client_id": "alice", "iat": now,
            "exp": now + 3600, "scope": SCOPE, "cnf": {"x5t#S256": "A" * 43}}
    start_rss = rss_mib()
    print(f"verify_cache_size (the bound): {bound}; RSS at start {start_rss:.1f} MiB")

    async def run() -> None:
        started = time.monotonic()
        step = max(1, count // 10)
        for i in range(1, count + 1):
            payload = _b64(json.dumps({**base, "jti": str(i)}, separators=(",", ":")).encode())
            signing_input = f"{header}.{payload}".encode()
            r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
            token = f"{header}.{payload}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
            await verifier.verify(token, token_digest(token))
            if i % step == 0:
                print(f"  {i:>9} distinct tokens: RSS {rss_mib():7.1f} MiB, cache entries "
                      f"{len(cache):>6} (bound {bound}), {time.monotonic() - started:6.0f}s",
                      flush=True)
        assert len(cache) <= bound, "cache exceeded its bound"

    asyncio.run(run())
    print(f"signatures checked: {verifier.verifications}; cache entries at the end: "
          f"{len(cache)} <= {bound}; RSS {start_rss:.1f} -> {rss_mib():.1f} MiB")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("connections", "tokens", "churn"))
    p.add_argument("--rounds", type=int, default=6, help="churn: rounds (default 6)")
    p.add_argument("--no-trim", action="store_true",
                   help="churn: run the gateway with MTLS_GATEWAY_MALLOC_TRIM=0")
    p.add_argument("--count", type=int, default=None,
                   help="connections (default 10000) or distinct tokens (default 1000000)")
    p.add_argument("--haproxy", action="store_true",
                   help="connections: measure HAProxy (bench/haproxy.cfg.template) instead")
    p.add_argument("--tls-stack", choices=("openssl", "python"), default="openssl",
                   help="connections: the gateway's listen.tls_stack (default openssl)")
    p.add_argument("--timeout", type=float, default=240,
                   help="connections: seconds allowed to open them all (default 240)")
    args = p.parse_args()
    if args.what == "churn":
        return churn(args.count or 2_000, args.rounds, not args.no_trim)
    if args.what == "connections":
        return connections(args.count or 10_000, args.timeout, args.haproxy, args.tls_stack)
    return tokens(args.count or 1_000_000)


if __name__ == "__main__":
    sys.exit(main())
