"""The two TLS back-ends of the listener, side by side: CPython ``ssl`` (``client_ca: pki``)
against pyOpenSSL on memory BIOs (``client_ca: any``, mtls_gateway/tls_any.py).

    .venv/bin/python bench/tls_backends.py [--duration 5] [--rounds 3] [--connections 32]

Both serve the same minimal aiohttp app (a fixed 11-byte answer, no gateway logic), so the
difference is the TLS layer alone: keep-alive requests/s (record encryption and the transport
around it), new connections with full mutual-TLS 1.3 handshakes per second, and resumed
handshakes. The contexts are the gateway's own (``server_ssl_context`` / ``any_cert_context``).
The server under test runs in its own process, pinned to one core (``taskset``), the Go load
generator (``shared/tools/mtlsload``, built by bench/run.py's helper) on the other. Rows run
interleaved, ``--rounds`` times; the table shows medians and the ratio any/pki of each pair,
measured in the same run. Everything listens on 127.0.0.1; every process stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from mtls_gateway import pki  # noqa: E402
from mtls_gateway.config import ListenConfig  # noqa: E402

MAX_SERVER_SECONDS = 900.0
WARMUP = 0.5
BACKENDS = ("pki", "any")
#: mode -> (mtlsload flags, client certificate)
MODES: dict[str, tuple[list[str], str]] = {
    "keepalive": ([], "alice"),
    "newconn": (["-newconn"], "alice"),
    "resume": (["-newconn", "-resume"], "alice"),
    "keepalive-selfsigned": ([], "selfie"),
}


def _listen(d: Path, client_ca: str) -> ListenConfig:
    return ListenConfig(host="127.0.0.1", port=0, cert_file=d / "server.crt",
                        key_file=d / "server.key",
                        client_ca_file=d / "ca.crt" if client_ca == "pki" else None,
                        client_cert="required", min_tls_version="1.2", max_tls_version="1.3",
                        client_ca=client_ca)  # type: ignore[arg-type]


async def _serve(backend: str, d: Path) -> None:
    from aiohttp import web

    from mtls_gateway.tls import server_ssl_context
    from mtls_gateway.tls_any import AnyCertSite, any_cert_context

    async def hello(_: web.Request) -> web.Response:
        return web.Response(text='{"ok":true}', content_type="application/json")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site: web.BaseSite
    if backend == "any":
        site = AnyCertSite(runner, "127.0.0.1", 0, context=any_cert_context(_listen(d, "any")))
    else:
        site = web.TCPSite(runner, "127.0.0.1", 0,
                           ssl_context=server_ssl_context(_listen(d, "pki")))
    await site.start()
    print(f"LISTENING {runner.addresses[0][1]}", flush=True)
    await asyncio.sleep(MAX_SERVER_SECONDS)   # stops by itself; normally SIGTERM comes first
    await runner.cleanup()


@dataclass
class Row:
    backend: str
    mode: str
    rps: list[float]
    cpu_us: list[float]
    handshakes: int = 0
    resumed: int = 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--serve", choices=("pki", "any"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve, args.dir))
        return 0

    import run as gwbench  # bench/run.py: mtlsload build, core pinning, process handling

    binary, how = gwbench.build_mtlsload()
    if binary is None:
        print(f"needs the Go load generator: {how}", file=sys.stderr)
        return 2
    pin = gwbench.pinning(True)
    with tempfile.TemporaryDirectory(prefix="tls-backends-") as tmp:
        d = Path(tmp)
        ca = pki.make_ca("bench CA")
        ca.write(d, "ca")
        pki.issue_server(ca).write(d, "server")
        pki.issue_client(ca, "alice").write(d, "alice")
        pki.self_signed_client("selfie").write(d, "selfie")
        procs = gwbench.Procs(d)
        try:
            return _run(args, gwbench, procs, pin, binary, d, how)
        finally:
            procs.stop_all()


def _measure(argv: list[str], proc: Any, duration: float) -> tuple[dict[str, Any] | None, str]:
    """One mtlsload call; its RESULT plus the server's CPU us per request in the window."""
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,  # noqa: S603
                          text=True) as load:
        time.sleep(WARMUP)                  # mtlsload's warm-up: not counted, not timed
        cpu0 = proc.cpu_seconds()
        try:
            out, _ = load.communicate(timeout=duration + 60)
        except subprocess.TimeoutExpired:
            load.kill()
            out, _ = load.communicate()
        cpu = proc.cpu_seconds() - cpu0
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), "")
    if not line or load.returncode != 0:
        return None, out
    result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
    result["cpu_us"] = cpu / max(result["requests"], 1) * 1e6
    return result, out


def _run(args: argparse.Namespace, gwbench: Any, procs: Any, pin: Any, binary: Path, d: Path,
         how: str) -> int:
    servers = {}
    for backend in BACKENDS:
        proc = procs.start(f"server-{backend}", [*pin.sut, sys.executable, __file__,
                                                 "--serve", backend, "--dir", str(d)])
        port = int(gwbench.wait_for(backend, proc, r"LISTENING (\d+)").group(1))
        servers[backend] = (proc, port)
    ratios: dict[str, list[float]] = {m: [] for m in MODES}
    rows = {(b, m): Row(b, m, [], []) for m in MODES for b in BACKENDS}
    failures = 0
    for rnd in range(args.rounds):
        for mode, (flags, client) in MODES.items():
            pair: dict[str, float] = {}
            order = BACKENDS if rnd % 2 == 0 else BACKENDS[::-1]   # neither always goes first
            for backend in order:
                if mode == "keepalive-selfsigned" and backend == "pki":
                    continue   # the pki listener refuses a self-signed client
                proc, port = servers[backend]
                argv = [*pin.load, str(binary), "-url", f"https://127.0.0.1:{port}/",
                        "-cert", str(d / f"{client}.crt"), "-key", str(d / f"{client}.key"),
                        "-ca", str(d / "ca.crt"), "-c", str(args.connections),
                        "-d", f"{args.duration}s", "-warmup", f"{WARMUP}s", *flags]
                result, out = _measure(argv, proc, args.duration)
                if result is None:
                    failures += 1
                    print(f"round {rnd + 1} {backend} {mode}: FAILED\n{out}")
                    continue
                row = rows[(backend, mode)]
                row.rps.append(result["rps"])
                row.cpu_us.append(result["cpu_us"])
                row.handshakes, row.resumed = result["handshakes"], result["resumed"]
                pair[backend] = result["rps"]
                print(f"round {rnd + 1} {backend:3} {mode:21} {result['rps']:8.0f} req/s "
                      f"{result['cpu_us']:7.0f} CPU us/req  handshakes {result['handshakes']} "
                      f"resumed {result['resumed']}", flush=True)
            if len(pair) == 2:
                ratios[mode].append(pair["any"] / pair["pki"])
    print()
    print(f"load generator: mtlsload ({how}); {pin.note}; {args.connections} connections, "
          f"{args.duration:g}s x {args.rounds} rounds (pairs back to back, order alternating); "
          "medians")
    print()
    print("| mode | pki (CPython ssl) req/s | any (pyOpenSSL) req/s | any/pki (median of "
          "per-round ratios) | pki CPU us/req | any CPU us/req | any/pki CPU |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    med = statistics.median
    for mode in MODES:
        p, a = rows[("pki", mode)], rows[("any", mode)]
        if not a.rps:
            continue
        if p.rps:
            print(f"| {mode} | {med(p.rps):.0f} | {med(a.rps):.0f} | {med(ratios[mode]):.2f} "
                  f"| {med(p.cpu_us):.0f} | {med(a.cpu_us):.0f} "
                  f"| {med(a.cpu_us) / med(p.cpu_us):.2f} |")
        else:
            print(f"| {mode} | | {med(a.rps):.0f} | | | {med(a.cpu_us):.0f} | |")
    print("\nresumed handshakes in the last round: "
          + ", ".join(f"{b} {rows[(b, 'resume')].resumed}/{rows[(b, 'resume')].handshakes}"
                      for b in BACKENDS))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
