"""Throughput and latency of mtls-gateway against HAProxy 2.6 doing the same job, as ratios
measured in the same run.

    .venv/bin/python bench/run.py --repeat 3 [--extra] [--duration 5] [--connections 32]

Everything runs on this machine, on 127.0.0.1 only: a throwaway PKI, static JWKS (RS256 and
ES256 keys), an RFC 7662 introspection server, a raw keep-alive upstream, HAProxy with
``bench/haproxy.cfg.template`` (mTLS, jwt_verify ES256, claims, x5t#S256 binding, upstream
reuse), and the gateway under test started as a user would (``mtls-gateway run --config``),
each in its own process. Load comes from ``bench/mtlsload`` (Go, built into ``bench/.build/``:
keep-alive, new connection per request, resumed sessions, paced rate), or from
``bench/pyload.py`` when Go is missing (labelled as such).

On a machine with 2 or more cores the server under test is pinned to one core and the load
generator, upstream and introspection server to another (``taskset``), so each row is one
server process on one core: its figure is what that one core can do. The issue-8 targets
are printed at the end, each the median of per-round values.

Every loop is bounded (per-scenario duration, subprocess timeouts, servers that stop by
themselves); the exit status is non-zero if any request got an unexpected status or failed.
See bench/README.md for what each row means and how to read the ratios.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import hashlib
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from mtls_gateway import pki
from mtls_gateway.thumbprint import x5t_s256

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
BUILD = BENCH / ".build"
#: bench's copy of shared/tools/mtlsload, with -rate, -idle and http:// added.
MTLSLOAD_SRC = BENCH / "mtlsload"
PYTHON = sys.executable
GATEWAY_BIN = Path(PYTHON).parent / "mtls-gateway"

ISSUER = "https://issuer.bench.local"
AUDIENCE = "https://api.bench.local"
SCOPE = "bench:read"
CLIENT_ID = "mtls-gateway"
START_TIMEOUT = 30.0   # seconds a server gets to start listening


# --- material: PKI, keys, tokens ----------------------------------------------------------------

@dataclass(frozen=True)
class Material:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    certs: dict[str, tuple[Path, Path]]   # client name -> (cert, key)
    tokens: dict[str, Path]               # token kind -> file with the token
    jwks: dict[str, Any]
    introspection_tokens: Path            # JSON {opaque token: introspection answer}
    secret_file: Path
    es256_public_pem: Path                # the issuer's ES256 key, for HAProxy's jwt_verify
    server_pem: Path                      # server certificate + key in one file (HAProxy)
    dpop_key: Path | None = None          # the client's P-256 DPoP key (PEM), for dpop-es256
    issuer_key: Path | None = None        # the issuer's P-256 key (PEM): jwt-fresh-es256 mints


def make_material(directory: Path) -> Material:
    """CA, server certificate, clients alice (the token holder) and bob (same CA, another key),
    an RSA-2048 and a P-256 signing key, and tokens bound to alice's certificate."""
    ca = pki.make_ca("mtls-gateway bench CA")
    ca_file, ca_key = ca.write(directory, "ca")
    server_cert, server_key = pki.issue_server(ca).write(directory, "server")
    certs: dict[str, tuple[Path, Path]] = {}
    thumbprints: dict[str, str] = {}
    for name in ("alice", "bob"):
        leaf = pki.issue_client(ca, name)
        certs[name] = leaf.write(directory, name)
        thumbprints[name] = x5t_s256(leaf.cert_der)
    ca_key.unlink()

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_jwk = json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key()))
    rsa_jwk.update(kid="bench-rsa", use="sig", alg="RS256")
    ec_jwk = json.loads(ECAlgorithm.to_jwk(ec_key.public_key()))
    ec_jwk.update(kid="bench-ec", use="sig", alg="ES256")

    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "client_id": "alice",
              "iat": now, "nbf": now, "exp": now + 3600, "scope": SCOPE,
              "cnf": {"x5t#S256": thumbprints["alice"]}}
    tokens: dict[str, Path] = {}
    # DPoP (RFC 9449): the client's own key; its token is bound to the key's thumbprint.
    dpop_key = ec.generate_private_key(ec.SECP256R1())
    dpop_key_file = _write_private_key(directory / "dpop-key.pem", dpop_key)
    dpop_claims = {**claims, "cnf": {"jkt": _jwk_thumbprint(dpop_key.public_key())}}
    for kind, key, alg, kid, body in (("rs256", rsa_key, "RS256", "bench-rsa", claims),
                                      ("es256", ec_key, "ES256", "bench-ec", claims),
                                      ("dpop-es256", ec_key, "ES256", "bench-ec", dpop_claims)):
        token = jwt.encode({**body, "jti": uuid.uuid4().hex}, key, algorithm=alg,
                           headers={"kid": kid, "typ": "at+jwt"})
        tokens[kind] = directory / f"token-{kind}.txt"
        tokens[kind].write_text(token + "\n")
    opaque = secrets.token_urlsafe(32)
    tokens["opaque"] = directory / "token-opaque.txt"
    tokens["opaque"].write_text(opaque + "\n")
    introspection_tokens = directory / "introspection-tokens.json"
    introspection_tokens.write_text(json.dumps(
        {opaque: {"active": True, **claims, "iss": ISSUER, "token_type": "Bearer"}}))
    secret_file = directory / "introspection-secret"
    secret_file.touch(mode=0o600)
    secret_file.write_text(secrets.token_urlsafe(24) + "\n")
    es256_pem = directory / "issuer-es256.pub.pem"
    es256_pem.write_bytes(ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    server_pem = directory / "server.pem"
    server_pem.write_bytes(server_cert.read_bytes() + server_key.read_bytes())
    issuer_key_file = _write_private_key(directory / "issuer-es256.key.pem", ec_key)
    return Material(directory, ca_file, server_cert, server_key, certs, tokens,
                    {"keys": [rsa_jwk, ec_jwk]}, introspection_tokens, secret_file,
                    es256_pem, server_pem, dpop_key_file, issuer_key_file)


def _write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    """``key`` as unencrypted PKCS#8 PEM in ``path``, readable by its owner only."""
    path.touch(mode=0o600)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _jwk_thumbprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 thumbprint of a P-256 key (members crv, kty, x, y in that order)."""
    jwk = json.loads(ECAlgorithm.to_jwk(public_key))
    canonical = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def es256_verify_us(rounds: int = 5, n: int = 2000) -> float:
    """One ES256 signature verification alone, in CPU microseconds: the call the gateway makes
    for a DPoP proof (pyjwt's ECAlgorithm.verify on a parsed key), the median of ``rounds``."""
    alg = ECAlgorithm(ECAlgorithm.SHA256)
    key = ec.generate_private_key(ec.SECP256R1())
    message = b"eyJ0eXAiOiJkcG9wK2p3dCJ9.eyJqdGkiOiJ4In0"
    signature = alg.sign(message, key)
    public = key.public_key()
    samples = []
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(n):
            if not alg.verify(message, public, signature):
                raise RuntimeError("ES256 verification failed")
        samples.append((time.process_time() - started) / n * 1e6)
    return sorted(samples)[len(samples) // 2]


def haproxy_config(m: Material, port: int, upstream_port: int) -> str:
    """bench/haproxy.cfg.template with this run's files, ports and claims filled in."""
    text = (BENCH / "haproxy.cfg.template").read_text()
    for name, value in (("PORT", port), ("SERVER_PEM", m.server_pem), ("CA", m.ca),
                        ("PUBKEY", m.es256_public_pem), ("ISSUER", ISSUER),
                        ("AUDIENCE", AUDIENCE), ("SCOPE", SCOPE), ("LEEWAY", 0),
                        ("UPSTREAM_PORT", upstream_port)):
        text = text.replace(f"@@{name}@@", str(value))
    assert "@@" not in text, "unfilled field in haproxy.cfg.template"
    return text


def gateway_config(m: Material, upstream_url: str, introspection_url: str) -> dict[str, Any]:
    """Three routes in front of one upstream: public, bound JWT, bound opaque token."""
    bound = {"binding": "required", "scopes": [SCOPE]}
    return {
        "realm": "bench",
        "listen": {"host": "127.0.0.1", "port": 0, "cert_file": str(m.server_cert),
                   "key_file": str(m.server_key), "client_ca_file": str(m.ca),
                   "client_cert": "required"},
        "admin": {"enabled": True, "host": "127.0.0.1", "port": 0},
        "logging": {"level": "INFO"},
        "providers": {
            "jwt": {"type": "jwt", "issuer": ISSUER, "audiences": [AUDIENCE],
                    "algorithms": ["RS256", "ES256"], "jwks": m.jwks,
                    "require_typ_at_jwt": True, "leeway": "0s"},
            "opaque": {"type": "introspection", "endpoint": introspection_url,
                       "client_id": CLIENT_ID, "auth_method": "client_secret_basic",
                       "client_secret_file": str(m.secret_file), "ca_file": str(m.ca),
                       "issuer": ISSUER, "audiences": [AUDIENCE],
                       "cache": {"maxsize": 1000, "ttl": "10m"}},
        },
        "upstream": {"url": upstream_url, "max_connections": 100},
        "routes": [
            {"name": "none", "path_prefix": "/none", "auth": "none"},
            {"name": "jwt", "path_prefix": "/jwt", "auth": {"provider": "jwt", **bound}},
            {"name": "opaque", "path_prefix": "/opaque",
             "auth": {"provider": "opaque", **bound}},
            {"name": "dpop", "path_prefix": "/dpop",
             "auth": {"provider": "jwt", "sender_constraint": "dpop", **bound}},
        ],
        # every proof of the window (65 s) is remembered: room for the fastest row
        "dpop": {"replay_cache_size": 1_000_000},
    }


# --- processes ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pinning:
    load: list[str]    # prefix for the load generator, upstream and introspection server
    sut: list[str]     # prefix for the server under test
    note: str
    both: list[str] = field(default_factory=list)   # prefix for --workers 2: both cores


def pinning(enabled: bool) -> Pinning:
    cpus = sorted(os.sched_getaffinity(0))
    taskset = shutil.which("taskset")
    if not enabled:
        return Pinning([], [], "no pinning (--no-pin)")
    if taskset is None or len(cpus) < 2:
        return Pinning([], [], f"no pinning ({len(cpus)} core(s), taskset "
                               f"{'found' if taskset else 'missing'})")
    load, sut = str(cpus[0]), str(cpus[-1])
    return Pinning([taskset, "-c", load], [taskset, "-c", sut],
                   f"server under test on core {sut}; load generator, upstream and "
                   f"introspection server on core {load}", [taskset, "-c", f"{load},{sut}"])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def rss_mb(self) -> float:
        """Resident memory of the process (from /proc), in MiB."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process and its live descendants (``--workers``)
        so far, from /proc."""
        total = 0.0
        for pid in _tree(self.pid):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):
                todo.extend(int(c) for c in children.read_text().split())
    return out


class Procs:
    """Every process this run starts; all are stopped (by their own pid) on exit."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[Proc] = []

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Proc:
        log = self.logs / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT,  # noqa: S603
                                     stdin=subprocess.DEVNULL, cwd=REPO,
                                     env={**os.environ, **(env or {})})
        proc = Proc(name, popen, log)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            if proc.alive():
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 25
        for proc in reversed(self.started):
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(5)


def wait_for(what: str, proc: Proc, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
    """Wait until the process's log shows ``pattern``; fail if it dies or takes too long."""
    deadline = time.monotonic() + timeout
    regex = re.compile(pattern)
    while time.monotonic() < deadline:
        text = proc.log.read_text(errors="replace")
        found = regex.search(text)
        if found:
            return found
        if not proc.alive():
            raise RuntimeError(f"{what} exited with {proc.popen.returncode}:\n{text[-3000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start within {timeout:.0f}s:\n"
                       f"{proc.log.read_text(errors='replace')[-3000:]}")


def free_port() -> int:
    """A port that was free a moment ago (for a gateway that does not log its address)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_haproxy(procs: Procs, prefix: list[str], m: Material, upstream_port: int,
                  path: Path) -> tuple[Proc, int]:
    """HAProxy with bench/haproxy.cfg.template, once it accepts TCP connections."""
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        raise RuntimeError("haproxy not found (apt-get install -y --no-install-recommends "
                           "haproxy), or leave out the hap-* rows with --no-haproxy")
    port = free_port()
    path.write_text(haproxy_config(m, port, upstream_port))
    check = subprocess.run([haproxy, "-c", "-q", "-f", str(path)],  # noqa: S603
                           capture_output=True, text=True, timeout=30, check=False)
    if check.returncode != 0:
        raise RuntimeError(f"haproxy -c rejected {path}:\n{check.stdout}{check.stderr}")
    proc = procs.start("haproxy", [*prefix, haproxy, "-db", "-f", str(path)])
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return proc, port
        if not proc.alive():
            raise RuntimeError(f"haproxy exited:\n{proc.log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)
    raise RuntimeError("haproxy did not start listening")


def haproxy_version() -> str:
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        return "haproxy not installed"
    out = subprocess.run([haproxy, "-v"], capture_output=True, text=True,  # noqa: S603
                         timeout=10, check=False).stdout
    return out.splitlines()[0] if out else "haproxy ?"


def start_helper(procs: Procs, prefix: list[str], name: str, *args: str) -> tuple[Proc, int]:
    proc = procs.start(name, [*prefix, PYTHON, str(BENCH / "servers.py"), *args,
                              "--max-seconds", "1800"])
    port = int(wait_for(name, proc, r"LISTENING (\d+)").group(1))
    return proc, port


def start_gateway(procs: Procs, prefix: list[str], name: str,
                  config: dict[str, Any], path: Path, *extra: str,
                  env: dict[str, str] | None = None) -> tuple[Proc, int]:
    """``mtls-gateway run --config`` as a user would; returns once /readyz says ready."""
    config["listen"]["port"], config["admin"]["port"] = free_port(), free_port()
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = procs.start(name, [*prefix, str(GATEWAY_BIN), "run", "--config", str(path), *extra],
                       env)
    port, admin = config["listen"]["port"], config["admin"]["port"]
    deadline = time.monotonic() + START_TIMEOUT
    while True:  # readiness: keys loaded
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            pass
        if not proc.alive():
            raise RuntimeError(f"{name} exited with {proc.popen.returncode}:\n"
                               f"{proc.log.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} never became ready")
        time.sleep(0.1)


# --- load generator -------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoadGen:
    argv: list[str]
    kind: str          # "go" or "python"
    note: str

    @property
    def resume(self) -> bool:
        return self.kind == "go"


def build_mtlsload() -> tuple[Path | None, str]:
    """Build shared/tools/mtlsload into bench/.build/ (rebuilt when its sources change)."""
    go = shutil.which("go")
    if go is None:
        return None, "go not found (apt-get install -y golang-go)"
    if not (MTLSLOAD_SRC / "main.go").is_file():
        return None, f"{MTLSLOAD_SRC} not found"
    BUILD.mkdir(parents=True, exist_ok=True)
    binary, stamp = BUILD / "mtlsload", BUILD / "mtlsload.stamp"
    sources = [*sorted(MTLSLOAD_SRC.glob("*.go")), MTLSLOAD_SRC / "go.mod"]
    digest = ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sources)
    if binary.is_file() and stamp.is_file() and stamp.read_text() == digest:
        return binary, "cached build"
    print(f"building mtlsload into {BUILD} (first run: about 30 s) ...", flush=True)
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOPROXY": "off",
           "GOCACHE": str(BUILD / "gocache"), "GOPATH": str(BUILD / "gopath")}
    try:
        done = subprocess.run([go, "build", "-trimpath", "-o", str(binary), "."],  # noqa: S603
                              cwd=MTLSLOAD_SRC, env=env, capture_output=True, text=True,
                              timeout=300, check=False)
    except subprocess.TimeoutExpired:
        return None, "go build timed out"
    if done.returncode != 0:
        return None, f"go build failed: {done.stderr.strip()[-500:]}"
    stamp.write_text(digest)
    return binary, "built now"


def pick_loadgen(choice: str, prefix: list[str]) -> LoadGen:
    python_gen = LoadGen([*prefix, PYTHON, str(BENCH / "pyload.py")], "python",
                         "PYTHON FALLBACK load generator (bench/pyload.py): slower than the "
                         "Go tool, so the fastest rows may measure the load generator")
    if choice == "python":
        return python_gen
    binary, how = build_mtlsload()
    if binary is None:
        if choice == "go":
            raise RuntimeError(f"cannot build mtlsload: {how}")
        return LoadGen(python_gen.argv, "python", f"{python_gen.note}; Go unavailable: {how}")
    return LoadGen([*prefix, str(binary)], "go", f"mtlsload (Go, bench/mtlsload; {how})")


# --- scenarios ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    target: str               # "gateway", "haproxy", "direct", "gateway-w2", ...
    path: str
    token: str | None         # "rs256", "es256", "opaque" or None
    cert: str = "alice"
    mode: str = "keepalive"   # "keepalive", "vary", "fresh", "newconn", "resume" or "rate"
    # ("vary": keep-alive with a different target on every request, so no head repeats;
    # "fresh": keep-alive with a new token on every request, pyload -mint-key)
    expect: int = 200
    ref: str = "gw-none"      # the row its ratio is taken against
    extra: bool = False       # diagnostic row, run with --extra or --only
    rate: float = 0.0         # mode "rate": requests/s in total (paced, not saturating)
    loadgen: str = ""         # "python": always bench/pyload.py (it signs DPoP proofs)


RATE = 1000.0   # requests/s of the latency rows (the issue's "moderate fixed load")

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("gw-none", "gateway, auth: none route (BASELINE)", "gateway", "/none/x", None),
    # --- the issue's comparison: the same job natively in HAProxy 2.6, one core each
    Scenario("hap-es256", "HAProxy 2.6: mTLS + jwt_verify ES256 + claims + x5t binding",
             "haproxy", "/jwt/x", "es256", ref="hap-es256"),
    Scenario("gw-es256", "gateway, bound JWT ES256 (verified-token cache hit)", "gateway",
             "/jwt/x", "es256", ref="hap-es256"),
    Scenario("hap-vary", "HAProxy, as hap-es256 with a new target (query) on every request",
             "haproxy", "/jwt/x", "es256", mode="vary", ref="hap-vary"),
    Scenario("vary-es256", "gateway, as gw-es256 with a new target (query) on every request",
             "gateway", "/jwt/x", "es256", mode="vary", ref="hap-vary"),
    Scenario("hap-refuse", "HAProxy: ES256 token, wrong cert -> 401", "haproxy", "/jwt/x",
             "es256", cert="bob", expect=401, ref="hap-es256"),
    Scenario("refuse-es256", "gateway: ES256 token, wrong cert -> 401", "gateway", "/jwt/x",
             "es256", cert="bob", expect=401, ref="hap-refuse"),
    Scenario("hap-new", "HAProxy: new conn + full mTLS handshake per request, ES256",
             "haproxy", "/jwt/x", "es256", mode="newconn", ref="hap-new"),
    Scenario("new-es256", "gateway: new conn + full mTLS handshake per request, ES256",
             "gateway", "/jwt/x", "es256", mode="newconn", ref="hap-new"),
    Scenario("hap-resume", "HAProxy: new conn, TLS session resumed, ES256", "haproxy",
             "/jwt/x", "es256", mode="resume", ref="hap-resume"),
    Scenario("resume-es256", "gateway: new conn, TLS session resumed, ES256", "gateway",
             "/jwt/x", "es256", mode="resume", ref="hap-resume"),
    Scenario("lat-direct", f"{RATE:.0f} req/s straight to the upstream (plain HTTP)", "direct",
             "/x", None, mode="rate", rate=RATE, ref="lat-direct"),
    Scenario("lat-gw", f"{RATE:.0f} req/s through the gateway, ES256 keep-alive", "gateway",
             "/jwt/x", "es256", mode="rate", rate=RATE, ref="lat-direct"),
    Scenario("lat-hap", f"{RATE:.0f} req/s through HAProxy, ES256 keep-alive", "haproxy",
             "/jwt/x", "es256", mode="rate", rate=RATE, ref="lat-direct"),
    Scenario("w2-es256", "gateway --workers 2 on both cores (shared with the load side)",
             "gateway-w2", "/jwt/x", "es256", ref="gw-es256"),
    Scenario("direct", "upstream alone, plain HTTP keep-alive (the ceiling)", "direct", "/x",
             None, ref="hap-es256"),
    # --- the gateway against itself (--extra)
    Scenario("upstream-tls", "upstream alone over mTLS, no proxy", "upstream-tls", "/x", None,
             extra=True),
    Scenario("plain-proxy", "plain aiohttp mTLS proxy, no auth", "plain-proxy", "/x", None,
             extra=True),
    Scenario("raw-proxy", "the floor: a bare asyncio mTLS proxy (no checks, no log)",
             "raw-proxy", "/x", None, ref="hap-es256", extra=True),
    Scenario("raw-new", "the floor, new conn + full mTLS handshake per request", "raw-proxy",
             "/x", None, mode="newconn", ref="hap-new", extra=True),
    Scenario("raw-resume", "the floor, new conn, TLS session resumed", "raw-proxy", "/x",
             None, mode="resume", ref="hap-resume", extra=True),
    Scenario("gw-rs256", "gateway, bound JWT RS256", "gateway", "/jwt/x", "rs256", extra=True),
    Scenario("gw-opaque", "gateway, opaque token, introspection cache warm", "gateway",
             "/opaque/x", "opaque", extra=True),
    Scenario("refuse-cert", "refusal: RS256 token, wrong cert -> 401", "gateway", "/jwt/x",
             "rs256", cert="bob", expect=401, extra=True),
    Scenario("refuse-notoken", "refusal: no token -> 401", "gateway", "/jwt/x", None,
             expect=401),
    Scenario("new-none", "new TLS conn per request, auth: none", "gateway", "/none/x", None,
             mode="newconn", ref="new-none", extra=True),
    Scenario("new-rs256", "new TLS conn per request, bound JWT RS256", "gateway", "/jwt/x",
             "rs256", mode="newconn", ref="new-none", extra=True),
    Scenario("resume-rs256", "new conn, TLS session resumed, JWT RS256", "gateway", "/jwt/x",
             "rs256", mode="resume", ref="new-none", extra=True),
    Scenario("nolog-none", "auth: none, gateway with logging.level WARNING", "gateway-nolog",
             "/none/x", None, extra=True),
    Scenario("nolog-es256", "bound JWT ES256, logging.level WARNING", "gateway-nolog",
             "/jwt/x", "es256", ref="gw-es256", extra=True),
    Scenario("lat-gw-nolog", f"{RATE:.0f} req/s through the gateway, logging.level WARNING",
             "gateway-nolog", "/jwt/x", "es256", mode="rate", rate=RATE, ref="lat-direct",
             extra=True),
    Scenario("nolane-none", "auth: none, gateway with fast_lane: false (all through aiohttp)",
             "gateway-nolane", "/none/x", None, extra=True),
    Scenario("nolane-es256", "bound JWT ES256, fast_lane: false", "gateway-nolane",
             "/jwt/x", "es256", ref="gw-es256", extra=True),
    Scenario("asyncio-none", "auth: none, gateway on asyncio's loop (MTLS_GATEWAY_UVLOOP=0)",
             "gateway-asyncio", "/none/x", None, extra=True),
    Scenario("asyncio-es256", "bound JWT ES256, gateway on asyncio's loop", "gateway-asyncio",
             "/jwt/x", "es256", ref="gw-es256", extra=True),
    # --- DPoP (issue 19): a fresh ES256 proof per request, as real clients send. Both rows are
    # driven by bench/pyload.py (it signs the proofs), so they compare with each other.
    # (the reference varies its target: a DPoP head, with its fresh proof, never repeats)
    Scenario("dpop-ref-es256", "gateway, bound JWT ES256, a new target per request (pyload: "
             "reference of dpop-es256)", "gateway", "/jwt/x", "es256", mode="vary",
             ref="gw-es256", loadgen="python"),
    Scenario("dpop-es256", "gateway, DPoP-bound JWT ES256 + fresh ES256 proof per request",
             "gateway", "/dpop/x", "dpop-es256", ref="dpop-ref-es256", loadgen="python"),
    # the reference plus one ES256 verification per request (bench/extra_verify): what one
    # verification costs in the request path, where it shares the caches with the rest
    Scenario("xverify-es256", "dpop-ref-es256 + one extra ES256 verification per request "
             "(bench/extra_verify: the verification in the request path)", "gateway-xverify",
             "/jwt/x", "es256", mode="vary", ref="dpop-ref-es256", loadgen="python"),
    # a never-seen token on every request: its verification through PyJWT, uncached
    Scenario("jwt-fresh-es256", "gateway, a new bound JWT ES256 on every request (pyload "
             "-mint-key: one token verification per request)", "gateway", "/jwt/x", "es256",
             mode="fresh", ref="dpop-ref-es256", loadgen="python"),
    Scenario("pyssl-es256", "bound JWT ES256, gateway on listen.tls_stack: python (CPython ssl)",
             "gateway-pyssl", "/jwt/x", "es256", ref="hap-es256", extra=True),
    Scenario("pyssl-new", "tls_stack: python, new conn + full mTLS handshake per request",
             "gateway-pyssl", "/jwt/x", "es256", mode="newconn", ref="hap-new", extra=True),
    Scenario("pyssl-resume", "tls_stack: python, new conn, TLS session resumed",
             "gateway-pyssl", "/jwt/x", "es256", mode="resume", ref="hap-resume", extra=True),
    Scenario("gw-none-2", "gateway, auth: none again (drift check)", "gateway", "/none/x", None,
             ref="gw-none"),
)


def select(only: set[str], extra: bool, resume: bool, skip: set[str] = frozenset()
           ) -> list[Scenario]:
    """The rows to run, in table order, each with the row its ratio is taken against
    (targets in ``skip`` left out, with the rows compared against them)."""
    by_key = {s.key: s for s in SCENARIOS}
    wanted = set(only) if only else {s.key for s in SCENARIOS if extra or not s.extra}
    wanted = {k for k in wanted if by_key[k].target not in skip}
    wanted.add("gw-none")
    for key in list(wanted):
        ref = by_key[key].ref
        while ref not in wanted:
            wanted.add(ref)
            ref = by_key[ref].ref
    return [s for s in SCENARIOS if s.key in wanted and s.target not in skip
            and (resume or s.mode not in ("resume", "rate"))]


@dataclass
class Outcome:
    scenario: Scenario
    result: dict[str, Any]
    ok: bool
    problem: str
    sut_cpu: float            # seconds of CPU the server under test used in the window
    window: float             # seconds the window lasted
    aux_cpu: float            # CPU seconds of upstream + introspection in the window
    load_cpu: float           # CPU share of the load generator over its lifetime (1 = a core)
    output: str = field(repr=False, default="")
    spread: tuple[float, ...] = ()   # with --repeat: req/s of every round

    @property
    def rps(self) -> float:
        return float(self.result.get("rps", 0.0))

    @property
    def cpu_us_per_request(self) -> float:
        served = self.rps * self.window
        return self.sut_cpu / served * 1e6 if served else float("nan")


def run_scenario(s: Scenario, loadgen: LoadGen, m: Material, ports: dict[str, int],
                 sut: dict[str, Proc], aux: list[Proc], connections: int, duration: float,
                 warmup: float, profiler: Profiler | None = None,
                 both_cores: Sequence[str] = ()) -> Outcome:
    cert, key = m.certs[s.cert]
    scheme = "http" if s.target == "direct" else "https"
    gen_argv = loadgen.argv
    if s.loadgen == "python" and loadgen.kind == "go":   # [*pinning, mtlsload] -> pyload
        gen_argv = [*loadgen.argv[:-1], PYTHON, str(BENCH / "pyload.py")]
    if s.target == "gateway-w2" and gen_argv[0].endswith("taskset"):
        gen_argv = [*both_cores, *gen_argv[3:]]   # the load side shares both cores too
    argv = [*gen_argv, "-url", f"{scheme}://127.0.0.1:{ports[s.target]}{s.path}",
            "-cert", str(cert), "-key", str(key), "-ca", str(m.ca), "-c", str(connections),
            "-d", f"{duration}s", "-warmup", f"{warmup}s", "-expect", str(s.expect)]
    if s.token:
        argv += ["-token-file", str(m.tokens[s.token])]
    if s.token == "dpop-es256" and m.dpop_key is not None:
        argv += ["-dpop-key", str(m.dpop_key)]
    if s.mode in ("newconn", "resume"):
        argv.append("-newconn")
    if s.mode == "resume":
        argv.append("-resume")
    if s.mode == "rate":
        argv += ["-rate", str(s.rate)]
    if s.mode == "vary":
        argv.append("-vary")
    if s.mode == "fresh" and m.issuer_key is not None:
        argv += ["-mint-key", str(m.issuer_key)]
    target = sut[s.target]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    spy: subprocess.Popen[bytes] | None = None
    with tempfile.TemporaryFile() as out:
        started = time.monotonic()
        gen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,  # noqa: S603
                               stdin=subprocess.DEVNULL)
        try:
            time.sleep(warmup)
            if profiler and s.target.startswith("gateway") and s.target != "gateway-w2":
                spy = profiler.start(s.key, target.pid, duration)
            t0, c0, a0 = time.monotonic(), target.cpu_seconds(), _cpu(aux)
            time.sleep(duration)
            t1, c1, a1 = time.monotonic(), target.cpu_seconds(), _cpu(aux)
            gen.wait(timeout=duration + warmup + 60)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if gen.poll() is None:  # bounded: a load generator that overruns is killed
                gen.kill()
                gen.wait(5)
            if spy is not None:
                Profiler.finish(spy)
        lifetime = time.monotonic() - started
        out.seek(0)
        text = out.read().decode(errors="replace")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    found = re.search(r"^RESULT (\{.*\})$", text, re.MULTILINE)
    result: dict[str, Any] = json.loads(found.group(1)) if found else {}
    problems = []
    if not found:
        problems.append("no RESULT line")
    if gen.returncode != 0:
        problems.append(f"load generator exit {gen.returncode}")
    statuses = result.get("status", {})
    if set(statuses) - {str(s.expect)}:
        problems.append(f"unexpected status {statuses}")
    if result.get("errors"):
        problems.append(f"{result['errors']} request errors")
    if result and not result.get("requests"):
        problems.append("no request completed")
    if not target.alive():
        problems.append(f"{target.name} died")
    if problems:
        first = re.search(r"^first error: .*$", text, re.MULTILINE)
        if first:
            problems.append(first.group(0))
    return Outcome(s, result, not problems, "; ".join(problems), c1 - c0, t1 - t0, a1 - a0,
                   load_cpu / lifetime, text)


def median_outcome(rounds: list[Outcome]) -> Outcome:
    """With --repeat: the median round by req/s (status counts summed over all rounds)."""
    ordered = sorted(rounds, key=lambda o: o.rps)
    mid = ordered[(len(ordered) - 1) // 2]
    status: collections.Counter[str] = collections.Counter()
    for o in rounds:
        status.update({k: int(v) for k, v in o.result.get("status", {}).items()})
    result = {**mid.result, "status": dict(status),
              **{k: sum(int(o.result.get(k, 0)) for o in rounds)
                 for k in ("errors", "handshakes", "resumed")}}
    problems = [o.problem for o in rounds if not o.ok]
    return Outcome(mid.scenario, result, not problems, "; ".join(problems), mid.sut_cpu,
                   mid.window, mid.aux_cpu, mid.load_cpu, mid.output,
                   tuple(o.rps for o in rounds))


def _cpu(procs: Sequence[Proc]) -> float:
    return sum(p.cpu_seconds() for p in procs)


# --- profiling (optional) ------------------------------------------------------------------

class Profiler:
    """``--profile``: py-spy samples the gateway during each gateway row's measured window.

    Sampling pauses the gateway briefly (about 1 % at the default rate), so rows measured
    with --profile are a little slower; the profiles are for finding where time goes."""

    def __init__(self, py_spy: str, out: Path, prefix: list[str], native: bool) -> None:
        self.py_spy, self.out, self.prefix, self.native = py_spy, out, prefix, native
        out.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, Path] = {}

    def start(self, key: str, pid: int, seconds: float) -> subprocess.Popen[bytes]:
        raw = self.out / f"{key}.txt"
        self.files[key] = raw
        argv = [*self.prefix, self.py_spy, "record", "--pid", str(pid), "--rate", "200",
                "--duration", str(max(1, int(seconds))), "--format", "raw",
                "--output", str(raw)] + (["--native"] if self.native else [])
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL,  # noqa: S603
                                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)

    @staticmethod
    def finish(spy: subprocess.Popen[bytes]) -> None:
        try:
            spy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(5)

    def report(self, top: int = 14) -> None:
        for key, raw in self.files.items():
            print(f"\nprofile {key} ({raw}): inclusive % of samples, by function")
            for line in summarize_profile(raw, top):
                print(f"  {line}")


def summarize_profile(raw: Path, top: int) -> list[str]:
    """Inclusive share of samples per function (file:line dropped) from py-spy's raw format."""
    if not raw.is_file():
        return ["(no profile written)"]
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_frame(f) for f in stack.split(";")[1:]]  # [0] is the process
        python = [f for f in frames if f.endswith(".py)")]
        if python and python[-1] == "_worker (thread.py)":
            continue  # an idle thread-pool worker waiting for work, not gateway time
        n = int(count)
        total += n
        for frame in set(frames):
            inclusive[frame] += n
        if frames:
            own[frames[-1]] += n
    if not total:
        return ["(no samples)"]
    lines = [f"{total} samples; {'incl':>5} {'self':>5}"]
    for frame, n in inclusive.most_common(top):
        lines.append(f"{100 * n / total:5.1f} {100 * own[frame] / total:5.1f}  {frame}")
    lines.append("top self time:")
    for frame, n in own.most_common(top // 2):
        lines.append(f"{100 * n / total:5.1f}  {frame}")
    return lines


def _frame(frame: str) -> str:
    """``func (path/to/module.py:123)`` -> ``func (module.py)``."""
    name, _, where = frame.partition(" (")
    filename = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({Path(filename).name})" if filename else name


# --- report ---------------------------------------------------------------------------------------

def _fmt_status(result: dict[str, Any]) -> str:
    status = result.get("status", {})
    text = " ".join(f"{k}:{v}" for k, v in sorted(status.items())) or "-"
    if result.get("errors"):
        text += f" err:{result['errors']}"
    if result.get("mode") in ("newconn", "resume"):
        text += f" (handshakes {result.get('handshakes', 0)}, resumed {result.get('resumed', 0)})"
    return text


def print_table(outcomes: list[Outcome]) -> None:
    by_key = {o.scenario.key: o for o in outcomes}
    repeated = any(len(o.spread) > 1 for o in outcomes)
    head = (f"{'row':<15} {'mode':<9} {'req/s':>7} {'ratio':>6} {'vs':<9} {'p50 ms':>7} "
            f"{'p99 ms':>7} {'cpu us/req':>10} {'cpu%':>5} {'lg+up%':>6}  "
            + (f"{'rounds req/s':<20} " if repeated else "") + "statuses")
    print(head)
    print("-" * len(head))
    for o in outcomes:
        s = o.scenario
        ref = by_key.get(s.ref)
        if s.ref == "gw-none" and "gw-none-2" in by_key and s.key != "gw-none-2":
            base = _baseline_rps(by_key)
        else:
            base = ref.rps if ref else 0.0
        ratio = "base" if s.key == s.ref else (f"{o.rps / base:.2f}" if base else "-")
        if s.mode == "rate":
            ratio = "-"     # paced: compare latencies (targets block), not req/s
        r = o.result
        cpu_pct = 100 * o.sut_cpu / o.window if o.window else 0.0
        other_pct = 100 * (o.load_cpu + (o.aux_cpu / o.window if o.window else 0.0))
        flag = "" if o.ok else "  FAIL: " + o.problem
        rounds = (f"{'/'.join(f'{x:.0f}' for x in o.spread):<20} " if repeated else "")
        print(f"{s.key:<15} {s.mode:<9} {o.rps:>7.0f} {ratio:>6} {s.ref:<9} "
              f"{r.get('p50_ms', 0):>7.2f} {r.get('p99_ms', 0):>7.2f} "
              f"{o.cpu_us_per_request:>10.0f} {cpu_pct:>5.0f} {other_pct:>6.0f}  "
              f"{rounds}{_fmt_status(r)}{flag}")
    print("\nrows:")
    for o in outcomes:
        print(f"  {o.scenario.key:<15} {o.scenario.title}")
    print("cpu us/req and cpu%: CPU of the server under test (its own core) in the measured "
          "window;\nlg+up%: load generator + upstream + introspection server (the other core).")


def _baseline_rps(by_key: dict[str, Outcome]) -> float:
    """The baseline: mean of the auth: none row measured first and last in the run."""
    rows = [by_key[k].rps for k in ("gw-none", "gw-none-2") if k in by_key]
    return sum(rows) / len(rows) if rows else 0.0


def print_costs(outcomes: list[Outcome]) -> None:
    """What each feature adds, in microseconds of gateway CPU per request."""
    by_key = {o.scenario.key: o for o in outcomes if o.ok}

    def us(key: str) -> float | None:
        o = by_key.get(key)
        return o.cpu_us_per_request if o else None

    base_keys = [k for k in ("gw-none", "gw-none-2") if k in by_key]
    base = (sum(by_key[k].cpu_us_per_request for k in base_keys) / len(base_keys)
            if base_keys else None)
    lines = []
    for key, what in (("plain-proxy", "a plain aiohttp mTLS proxy instead (no auth, no log)"),
                      ("gw-rs256", "JWT RS256 verify + binding + scope"),
                      ("gw-es256", "JWT ES256 verify + binding + scope"),
                      ("gw-opaque", "introspection cache hit + binding + scope"),
                      ("refuse-cert", "refusal after RS256 verify (no upstream call)"),
                      ("refuse-notoken", "refusal before any verify (no upstream call)"),
                      ("nolog-none", "auth: none without the decision log line")):
        value = us(key)
        if value is not None and base is not None:
            lines.append(f"  {key:<15} {value - base:+7.0f} us/req  {what}")
    for key, ref, what in (("nolog-es256", "gw-es256", "JWT ES256 without the decision log"),
                           ("nolane-es256", "gw-es256", "JWT ES256 without the fast lane"),
                           ("asyncio-es256", "gw-es256", "JWT ES256 on asyncio's loop, not uvloop"),
                           ("new-none", None, "full mTLS handshake + request, auth: none"),
                           ("new-rs256", "new-none", "JWT RS256 on a fresh connection"),
                           ("resume-rs256", "new-rs256", "resumed instead of full handshake")):
        value = us(key)
        if value is None:
            continue
        other = base if ref is None else us(ref)
        if other is not None:
            lines.append(f"  {key:<15} {value - other:+7.0f} us/req  {what} "
                         f"(vs {'gw-none keep-alive' if ref is None else ref})")
    if lines and base is not None:
        print(f"\ngateway CPU per request vs the auth: none baseline ({base:.0f} us/req):")
        print("\n".join(lines))
    if "gw-none" in by_key and "gw-none-2" in by_key:
        a, b = by_key["gw-none"].rps, by_key["gw-none-2"].rps
        print(f"\nbaseline drift within this run: {a:.0f} -> {b:.0f} req/s "
              f"({100 * (b - a) / a:+.1f}%); ratios use their mean")
        if abs(b - a) > 0.15 * min(a, b):
            print("WARNING: the baseline moved by more than 15% during the run: the machine "
                  "was busy\n(other work on the shared cores), so this run's ratios are "
                  "rough; use --repeat 3 for medians.")


#: The issues' targets: (what, row, reference row, how, target). "ratio": req/s of row over
#: reference, the median of the per-round ratios (side by side in each round); "p50"/"p99":
#: latency of row minus reference at the fixed rate, in ms, the median over rounds.
#: The first three are issue 18's (issue 8 asked 1.0x / 0.9x / 0.9x); the pyssl-* rows
#: (--extra, or --only) are the same gateway on listen.tls_stack: python.
TARGETS: tuple[tuple[str, str, str, str, float], ...] = (
    ("keep-alive, 1 worker, same token", "gw-es256", "hap-es256", "ratio", 1.3),
    ("  (a new target on every request)", "vary-es256", "hap-vary", "ratio", 1.3),
    ("new conn, full mTLS handshake", "new-es256", "hap-new", "ratio", 1.1),
    ("new conn, TLS session resumed", "resume-es256", "hap-resume", "ratio", 1.0),
    ("  (tls_stack: python) keep-alive", "pyssl-es256", "hap-es256", "ratio", 1.3),
    ("  (tls_stack: python) full handshake", "pyssl-new", "hap-new", "ratio", 1.1),
    ("  (tls_stack: python) resumed", "pyssl-resume", "hap-resume", "ratio", 1.0),
    ("latency added at 1000 req/s, p50", "lat-gw", "lat-direct", "p50", 0.5),
    ("latency added at 1000 req/s, p99", "lat-gw", "lat-direct", "p99", 2.0),
    ("  (HAProxy's, for reference) p50", "lat-hap", "lat-direct", "p50", 0.5),
    ("  (HAProxy's, for reference) p99", "lat-hap", "lat-direct", "p99", 2.0),
    ("--workers 2 vs 1 worker", "w2-es256", "gw-es256", "ratio", 1.7),
)


def print_targets(rounds: dict[str, list[Outcome]], outcomes: list[Outcome]) -> None:
    """The issue's ratios, each the median of per-round values, with MET / NOT MET."""
    ok = {o.scenario.key for o in outcomes if o.ok}
    lines = []
    for what, row, ref, how, target in TARGETS:
        if row not in ok or ref not in ok:
            continue
        values, cpu = [], []
        for a, b in zip(rounds[row], rounds[ref], strict=True):
            if how == "ratio":
                values.append(a.rps / b.rps if b.rps else float("nan"))
                cpu.append(b.cpu_us_per_request / a.cpu_us_per_request)
            else:
                key = f"{how}_ms"
                values.append(float(a.result.get(key, 0)) - float(b.result.get(key, 0)))
        median = _median(values)
        if how == "ratio":
            met = median >= target
            shown, goal = f"{median:.2f}x", f">= {target:.1f}x"
        else:
            met = median <= target
            shown, goal = f"{median:+.2f} ms", f"<= {target:.1f} ms"
        each = "/".join(f"{v:.2f}" for v in values)
        by_cpu = (f"{_median(cpu):.2f}x" if cpu and not row.startswith("w2") else "-")
        lines.append(f"  {what:<35} {row:>12} vs {ref:<11} {shown:>9}  target {goal:<9} "
                     f"{'met' if met else 'NOT MET':<8} {by_cpu:>6}  {each}")
    if lines:
        print("\ntargets (medians of the per-round values; same run, same machine):")
        print(f"  {'':<35} {'row':>12} vs {'reference':<11} {'value':>9}  {'':<16} "
              f"{'':<8} {'by cpu':>6}  rounds")
        print("\n".join(lines))
        print("  by cpu: the reference's CPU per request over the row's (each server's own "
              "core time,\n  from /proc): the throughput ratio one saturated core would give, "
              "less sensitive\n  to other work on a shared machine than req/s.")


#: Issue 19: the DPoP row may cost at most the bound-JWT row's CPU per request plus this many
#: ES256 verifications (measured alone in the same run).
DPOP_VERIFICATIONS = 1.5


def print_dpop(rounds: dict[str, list[Outcome]], outcomes: list[Outcome],
               verify_us: float) -> None:
    """CPU per request of dpop-es256 against the bound-JWT row driven by the same load
    generator (medians over rounds), split into the proof's signature verification and the
    rest: the verification as it costs in the request path (xverify-es256: the reference plus
    one verification per request) and alone, in process, with warm caches (``verify_us``)."""
    ok = {o.scenario.key for o in outcomes if o.ok}
    if not {"dpop-es256", "dpop-ref-es256"} <= ok:
        return

    def cpu(key: str) -> float:
        return _median([o.cpu_us_per_request for o in rounds[key]])

    ref, dpop = cpu("dpop-ref-es256"), cpu("dpop-es256")
    added = dpop - ref
    budget = DPOP_VERIFICATIONS * verify_us
    print("\nDPoP (issue 19), gateway CPU per request (medians over rounds; these rows all by "
          "pyload):")
    print(f"  bound JWT ES256 (dpop-ref-es256)                      {ref:5.0f} us/req")
    print(f"  DPoP-bound JWT + fresh proof (dpop-es256)             {dpop:5.0f} us/req  = "
          f"reference {added:+.0f} us")
    print(f"  the ES256 verification alone (in process, warm caches) {verify_us:4.0f} us")
    if "xverify-es256" in ok:
        path = cpu("xverify-es256") - ref
        print(f"  reference + one ES256 verification (xverify-es256)    {ref + path:5.0f} us/req"
              f"  = reference {path:+.0f} us: {path / verify_us:.2f} x the verification alone")
        print(f"    DPoP's added {added:.0f} us = the proof's verification in the request path "
              f"{path:.0f} us + everything else {added - path:+.0f} us")
        print(f"    (everything else: parse, checks, thumbprint, replay store, DPoP header = "
              f"{(added - path) / verify_us:.2f} x the verification alone)")
    else:
        print(f"    DPoP's added {added:.0f} us = the verification alone {verify_us:.0f} us + "
              f"everything else {added - verify_us:+.0f} us (run xverify-es256 for the "
              "verification in the request path)")
    print(f"  target: added <= {DPOP_VERIFICATIONS} x the verification alone = {budget:.0f} us   "
          f"{'met' if added <= budget else 'NOT MET'}")
    if "jwt-fresh-es256" in ok:
        fresh = cpu("jwt-fresh-es256") - ref
        print(f"  a never-seen bound JWT per request (jwt-fresh-es256)   {ref + fresh:5.0f} "
              f"us/req  = reference {fresh:+.0f} us (PyJWT's decode, uncached); a DPoP proof costs "
              f"{added / fresh:.2f} x that")


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def decision_counts(log: Path) -> collections.Counter[tuple[str, str, int]]:
    """(route, reason, status) of every decision line the gateway logged."""
    counts: collections.Counter[tuple[str, str, int]] = collections.Counter()
    with log.open(errors="replace") as fh:
        for line in fh:
            if '"decision"' not in line:
                continue
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                counts[(str(rec.get("route")), str(rec.get("reason")), int(rec["status"]))] += 1
    return counts


EXPECTED_DECISIONS = {("none", "public_route", 200), ("jwt", "allowed", 200),
                      ("opaque", "allowed", 200), ("jwt", "binding_mismatch", 401),
                      ("jwt", "no_token", 401), ("dpop", "allowed", 200)}


def environment(loadgen: LoadGen, pin: Pinning, args: argparse.Namespace) -> list[str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import aiohttp

    load = os.getloadavg()
    return [
        f"machine: {os.cpu_count()} cores ({cpu}), {platform.system()} "
        f"{platform.release()}; load average before the run {load[0]:.2f}",
        f"python {platform.python_version()}, aiohttp {aiohttp.__version__}, "
        f"{ssl_version()}, event loop {event_loop()}; {haproxy_version()}",
        f"load generator: {loadgen.note}",
        f"pinning: {pin.note}",
        f"per row: {args.connections} connections, {args.warmup}s warm-up + {args.duration}s "
        f"measured",
    ]


def event_loop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio (uvloop not installed)"
    off = os.environ.get("MTLS_GATEWAY_UVLOOP", "1").strip().lower() in ("0", "false", "no", "off")
    return f"asyncio (MTLS_GATEWAY_UVLOOP={os.environ['MTLS_GATEWAY_UVLOOP']})" if off else \
        f"uvloop {uvloop.__version__}"


def ssl_version() -> str:
    import ssl

    return ssl.OPENSSL_VERSION


# --- main -----------------------------------------------------------------------------------------

@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mtls-gateway-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=5.0,
                   help="measured seconds per row (default 5; --quick: 2)")
    p.add_argument("--warmup", type=float, default=None,
                   help="unmeasured warm-up seconds per row (default 0.5; --quick: 0.3)")
    p.add_argument("--connections", "-c", type=int, default=32,
                   help="concurrent connections (default 32)")
    p.add_argument("--quick", action="store_true", help="2 s per row (about 30 s in all)")
    p.add_argument("--only", default="",
                   help="comma-separated rows to run (the baseline gw-none always runs)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run all rows this many times, interleaved; report each row's "
                        "median round (default 1)")
    p.add_argument("--extra", action="store_true",
                   help="also run the diagnostic rows (nolog-*: the gateway with "
                        "logging.level WARNING, to price the decision log line)")
    p.add_argument("--loadgen", choices=("auto", "go", "python"), default="auto",
                   help="auto: Go mtlsload if it builds, else the Python fallback")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--profile", action="store_true",
                   help="sample the gateway with py-spy in each gateway row (needs py-spy; "
                        "raw profiles go to bench/.build/profiles/)")
    p.add_argument("--native", action="store_true", help="with --profile: include C frames")
    p.add_argument("--py-spy", default="py-spy", help="py-spy executable (default: on PATH)")
    p.add_argument("--no-haproxy", action="store_true",
                   help="leave out the HAProxy rows (and the ratios against them)")
    p.add_argument("--keep", action="store_true",
                   help="keep the work folder (PKI, config, logs) and print its path")
    args = p.parse_args(argv)
    if args.quick and args.duration == 5.0:
        args.duration = 2.0
    if args.warmup is None:
        args.warmup = 0.3 if args.quick else 0.5
    if not 0.5 <= args.duration <= 120 or not 0 <= args.warmup <= 30:
        p.error("--duration must be 0.5..120 s and --warmup 0..30 s")
    if not 1 <= args.connections <= 1024:
        p.error("--connections must be 1..1024")
    if not 1 <= args.repeat <= 10:
        p.error("--repeat must be 1..10")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wanted = {k.strip() for k in args.only.split(",") if k.strip()}
    unknown = wanted - {s.key for s in SCENARIOS}
    if unknown:
        print(f"unknown rows: {', '.join(sorted(unknown))}; rows: "
              f"{', '.join(s.key for s in SCENARIOS)}", file=sys.stderr)
        return 2
    pin = pinning(not args.no_pin)
    loadgen = pick_loadgen(args.loadgen, pin.load)
    skip = {"haproxy"} if args.no_haproxy else set()
    if len(os.sched_getaffinity(0)) < 2:
        skip.add("gateway-w2")
    if loadgen.kind != "go":
        skip.add("direct")     # plain http:// and -rate are in bench/mtlsload only
    scenarios = select(wanted, args.extra, loadgen.resume, skip)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))   # inherited by every server
    profiler: Profiler | None = None
    if args.profile:
        py_spy = shutil.which(args.py_spy)
        if py_spy is None:
            print("--profile needs py-spy (pip install py-spy) or --py-spy PATH", file=sys.stderr)
            return 2
        profiler = Profiler(py_spy, BUILD / "profiles", pin.load, args.native)
    started = time.monotonic()
    env_lines = environment(loadgen, pin, args)
    with workdir(args.keep) as work:
        procs = Procs(work)
        try:
            m = make_material(work / "pki")
            upstream, up_port = start_helper(procs, pin.load, "upstream", "upstream")
            intro, intro_port = start_helper(
                procs, pin.load, "introspection", "introspection",
                "--tls", str(m.server_cert), str(m.server_key), str(m.ca),
                "--tokens", str(m.introspection_tokens), "--secret-file", str(m.secret_file))
            tls = ["--tls", str(m.server_cert), str(m.server_key), str(m.ca)]
            up_tls, up_tls_port = start_helper(procs, pin.sut, "upstream-tls", "upstream", *tls)
            proxy, proxy_port = start_helper(procs, pin.sut, "plain-proxy", "plain-proxy", *tls,
                                             "--upstream", f"http://127.0.0.1:{up_port}")
            config = gateway_config(m, f"http://127.0.0.1:{up_port}",
                                    f"https://127.0.0.1:{intro_port}/introspect")
            gateway, gw_port = start_gateway(procs, pin.sut, "gateway", config,
                                             work / "gateway.yaml")
            print(f"gateway pid {gateway.pid} on 127.0.0.1:{gw_port}; upstream pid "
                  f"{upstream.pid}; work folder {work}", flush=True)
            ports = {"gateway": gw_port, "plain-proxy": proxy_port, "upstream-tls": up_tls_port,
                     "direct": up_port}
            sut = {"gateway": gateway, "plain-proxy": proxy, "upstream-tls": up_tls,
                   "direct": upstream}
            if any(s.target == "haproxy" for s in scenarios):
                sut["haproxy"], ports["haproxy"] = start_haproxy(procs, pin.sut, m, up_port,
                                                                 work / "haproxy.cfg")
            if any(s.target == "gateway-asyncio" for s in scenarios):
                sut["gateway-asyncio"], ports["gateway-asyncio"] = start_gateway(
                    procs, pin.sut, "gateway-asyncio", json.loads(json.dumps(config)),
                    work / "gateway-asyncio.yaml", env={"MTLS_GATEWAY_UVLOOP": "0"})
            if any(s.target == "gateway-xverify" for s in scenarios):
                path = os.pathsep.join(p for p in (str(BENCH / "extra_verify"),
                                                   os.environ.get("PYTHONPATH")) if p)
                sut["gateway-xverify"], ports["gateway-xverify"] = start_gateway(
                    procs, pin.sut, "gateway-xverify", json.loads(json.dumps(config)),
                    work / "gateway-xverify.yaml",
                    env={"PYTHONPATH": path, "MTLS_GATEWAY_BENCH_EXTRA_VERIFY": "1"})
                if "extra ES256 verification" not in sut["gateway-xverify"].log.read_text(
                        errors="replace"):
                    raise RuntimeError("gateway-xverify: bench/extra_verify was not loaded")
            if any(s.target == "gateway-w2" for s in scenarios):
                # --workers refuses DPoP routes with the in-process replay cache (each
                # worker would accept a proof another has seen): the w2 row runs without them
                w2 = json.loads(json.dumps(config))
                w2["routes"] = [r for r in w2["routes"] if r.get("name") != "dpop"]
                w2.pop("dpop", None)
                sut["gateway-w2"], ports["gateway-w2"] = start_gateway(
                    procs, pin.both, "gateway-w2", w2, work / "gateway-w2.yaml",
                    "--workers", "2")
            if any(s.target == "raw-proxy" for s in scenarios):
                sut["raw-proxy"], ports["raw-proxy"] = start_helper(
                    procs, pin.sut, "raw-proxy", "raw-proxy", *tls,
                    "--upstream", f"http://127.0.0.1:{up_port}")
            if any(s.target == "gateway-nolane" for s in scenarios):
                nolane = json.loads(json.dumps(config))
                nolane["fast_lane"] = False
                sut["gateway-nolane"], ports["gateway-nolane"] = start_gateway(
                    procs, pin.sut, "gateway-nolane", nolane, work / "gateway-nolane.yaml")
            if any(s.target == "gateway-pyssl" for s in scenarios):
                pyssl = json.loads(json.dumps(config))
                pyssl["listen"]["tls_stack"] = "python"
                sut["gateway-pyssl"], ports["gateway-pyssl"] = start_gateway(
                    procs, pin.sut, "gateway-pyssl", pyssl, work / "gateway-pyssl.yaml")
            if any(s.target == "gateway-nolog" for s in scenarios):
                config["logging"]["level"] = "WARNING"  # no decision lines at all
                sut["gateway-nolog"], ports["gateway-nolog"] = start_gateway(
                    procs, pin.sut, "gateway-nolog", config, work / "gateway-nolog.yaml")
            rounds: dict[str, list[Outcome]] = {s.key: [] for s in scenarios}
            rss_before = gateway.rss_mb()
            for n in range(args.repeat):
                for s in scenarios:
                    o = run_scenario(s, loadgen, m, ports, sut, [upstream, intro],
                                     args.connections, args.duration, args.warmup, profiler,
                                     pin.both)
                    rounds[s.key].append(o)
                    print(f"  {f'[{n + 1}] ' if args.repeat > 1 else ''}{s.key:<15} "
                          f"{o.rps:>7.0f} req/s  {_fmt_status(o.result)}"
                          f"{'' if o.ok else '  FAIL: ' + o.problem}", flush=True)
            outcomes = [median_outcome(rounds[s.key]) for s in scenarios]
            rss_after = gateway.rss_mb()
            decisions = decision_counts(gateway.log)
            for other in ("gateway-w2", "gateway-asyncio", "gateway-nolane", "gateway-pyssl",
                          "gateway-xverify"):
                if other in sut:
                    decisions.update(decision_counts(sut[other].log))
        finally:
            procs.stop_all()

    print()
    print("\n".join(env_lines))
    print()
    print_table(outcomes)
    print_costs(outcomes)
    print_targets(rounds, outcomes)
    if "dpop-es256" in rounds:
        print_dpop(rounds, outcomes, es256_verify_us())
    print(f"\ngateway resident memory: {rss_before:.0f} MiB after start, {rss_after:.0f} MiB "
          f"after {sum(decisions.values())} requests")
    print("\ngateway decisions (from its log, warm-up included):")
    for (route, reason, status), n in sorted(decisions.items()):
        mark = "" if (route, reason, status) in EXPECTED_DECISIONS else "   UNEXPECTED"
        print(f"  {route:<7} {reason:<17} {status}  {n:>8}{mark}")
    for o in outcomes:
        if not o.ok:
            print(f"\nload generator output of failed row {o.scenario.key}:\n"
                  f"{o.output.strip()[-2000:]}")
    if profiler is not None:
        profiler.report()
    failed = [o.scenario.key for o in outcomes if not o.ok]
    odd = [k for k in decisions if k not in EXPECTED_DECISIONS]
    print(f"\n{len(outcomes)} rows in {time.monotonic() - started:.0f}s; "
          + ("all requests had the expected status" if not failed and not odd else
             f"FAILED: {', '.join(failed)}{' unexpected decisions' if odd else ''}"))
    print("Figures compare only within this run (ratios); the machine is shared and noisy.")
    return 1 if failed or odd else 0


if __name__ == "__main__":
    sys.exit(main())
