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

A second table separates the TLS library from the transport: the server side of full
handshakes driven in-process over memory BIOs (no sockets, no asyncio), timed with the
thread's CPU clock, for CPython ``ssl``, pyOpenSSL verifying the client against the CA like
``ssl`` does, and pyOpenSSL as ``client_ca: any`` configures it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
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


# --- in-process handshakes: the TLS libraries without sockets or event loop --------------------

class _StdlibServer:
    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)

    def step(self, data: bytes) -> tuple[bool, bytes]:
        self.incoming.write(data)
        try:
            self.obj.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        return done, self.outgoing.read()


class _PyOpenSSLServer:
    def __init__(self, ctx: Any) -> None:
        from OpenSSL import SSL

        self.want_read = SSL.WantReadError
        self.conn = SSL.Connection(ctx, None)
        self.conn.set_accept_state()

    def step(self, data: bytes) -> tuple[bool, bytes]:
        if data:
            self.conn.bio_write(data)
        try:
            self.conn.do_handshake()
            done = True
        except self.want_read:
            done = False
        chunks = []
        while True:
            try:
                chunks.append(self.conn.bio_read(65536))
            except self.want_read:
                return done, b"".join(chunks)


def _server_handshake_us(make: Any, client_ctx: ssl.SSLContext) -> float:
    """Server-side CPU (thread clock) of one full mutual-TLS handshake over memory BIOs."""
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    started = time.thread_time()
    server = make()
    spent = time.thread_time() - started
    client_done = server_done = False
    for _ in range(20):
        if not client_done:
            try:
                client.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
        data = c_out.read()
        started = time.thread_time()
        server_done, out = server.step(data)
        spent += time.thread_time() - started
        c_in.write(out)
        if client_done and server_done:
            return spent * 1e6
    raise RuntimeError("handshake did not complete")


def inprocess_handshakes(d: Path, rounds: int, count: int = 200) -> None:
    from OpenSSL import SSL

    from mtls_gateway.tls import server_ssl_context
    from mtls_gateway.tls_any import any_cert_context

    client_ctx = ssl.create_default_context(cafile=str(d / "ca.crt"))
    client_ctx.load_cert_chain(d / "alice.crt", d / "alice.key")
    verified = any_cert_context(_listen(d, "any"))
    verified.load_verify_locations(str(d / "ca.crt"))
    verified.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, None)
    stdlib_ctx, any_ctx = server_ssl_context(_listen(d, "pki")), any_cert_context(_listen(d, "any"))
    makers = {
        f"CPython ssl ({ssl.OPENSSL_VERSION}), client_ca: pki": lambda: _StdlibServer(stdlib_ctx),
        f"pyOpenSSL ({SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()}), chain verified "
        "against the CA": lambda: _PyOpenSSLServer(verified),
        "pyOpenSSL, client_ca: any": lambda: _PyOpenSSLServer(any_ctx),
    }
    figures: dict[str, list[float]] = {name: [] for name in makers}
    for _ in range(rounds):
        for name, make in makers.items():
            _server_handshake_us(make, client_ctx)   # warm
            figures[name].append(statistics.fmean(
                _server_handshake_us(make, client_ctx) for _ in range(count)))
    print(f"\nin-process full handshakes, server side only (TLS 1.3, P-256, client certificate; "
          f"{rounds} rounds of {count}, medians):\n")
    print("| server | CPU us per handshake |")
    print("|---|---:|")
    for name, values in figures.items():
        print(f"| {name} | {statistics.median(values):.0f} |")


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
            status = _run(args, gwbench, procs, pin, binary, d, how)
        finally:
            procs.stop_all()
        inprocess_handshakes(d, args.rounds)
        return status


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
