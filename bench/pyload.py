"""Fallback load generator (pure Python, asyncio streams) for when Go is not available.

Same flags and the same ``RESULT {json}`` line as ``shared/tools/mtlsload`` (a subset: no
``-resume``), so ``bench/run.py`` can use either. Closed loop: ``-c`` workers, each with one
mutual-TLS connection reused (keep-alive) or a new one per request (``-newconn``).

``-dpop-key PEM`` (this tool only): send the token as ``Authorization: DPoP`` with a fresh
RFC 9449 proof per request (ES256 with that P-256 key: new ``jti``, current ``iat``, ``ath``
of the token), as a real DPoP client does.

``-mint-key PEM`` (this tool only): send a new access token on every request, the token of
``-token-file`` re-signed (ES256, the issuer's P-256 key) with a new ``jti``, so the server
verifies one fresh ES256 JWT per request (the same signing work per request as ``-dpop-key``
on the client side).

It is much slower than the Go tool (one Python core drives a few thousand requests/s), so
with it the figures of the fastest rows measure the load generator as much as the server;
``bench/run.py`` labels every figure made with it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import ssl
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


def _duration(text: str) -> float:
    """Go-style duration: 500ms, 2s, 1m (a bare number is seconds)."""
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)


@dataclass
class _Stats:
    n: int = 0
    errors: int = 0
    handshakes: int = 0
    status: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    first_error: str = ""


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one HTTP/1.1 response; return its status and whether the server closes."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed before a response")
    status = int(status_line.split()[1])
    length, chunked, close = 0, False, False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value:
            chunked = True
        elif name == "connection" and "close" in value:
            close = True
    if chunked:
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status, close


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _es256_key(key_file: str) -> tuple[Any, Callable[[str], str]]:
    """The P-256 private key in ``key_file`` and a function that makes the JWS compact
    serialization of a signing input with it (ES256: ``r || s``, base64url)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    key = serialization.load_pem_private_key(Path(key_file).read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    algorithm = ec.ECDSA(hashes.SHA256())

    def sign(signing_input: str) -> str:
        r, s = decode_dss_signature(key.sign(signing_input.encode(), algorithm))
        return f"{signing_input}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    return key, sign


def _dpop_signer(key_file: str, method: str, htu: str, token: str) -> Callable[[], bytes]:
    """A function that returns a fresh ``DPoP: <proof>`` header line each call."""
    key, sign = _es256_key(key_file)
    numbers = key.public_key().public_numbers()
    jwk = {"crv": "P-256", "kty": "EC", "x": _b64(numbers.x.to_bytes(32, "big")),
           "y": _b64(numbers.y.to_bytes(32, "big"))}
    header = _b64(json.dumps({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk},
                             separators=(",", ":")).encode())
    ath = _b64(hashlib.sha256(token.encode()).digest())

    def proof() -> bytes:
        claims = {"jti": uuid.uuid4().hex, "htm": method, "htu": htu, "iat": int(time.time()),
                  "ath": ath}
        body = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"DPoP: {sign(f'{header}.{body}')}\r\n".encode()

    return proof


def _minter(key_file: str, token: str) -> Callable[[], str]:
    """A function that returns ``token`` re-signed (ES256) with a new ``jti`` each call."""
    _key, sign = _es256_key(key_file)
    header, payload, _ = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))

    def mint() -> str:
        body = _b64(json.dumps({**claims, "jti": uuid.uuid4().hex},
                               separators=(",", ":")).encode())
        return sign(f"{header}.{body}")

    return mint


async def _run(args: argparse.Namespace) -> int:
    url = urlsplit(args.url)
    if url.scheme != "https" or url.hostname is None:
        print("pyload: need an https:// URL", file=sys.stderr)
        return 2
    port = url.port or 443
    ctx = ssl.create_default_context(cafile=args.ca) if args.ca else \
        ssl._create_unverified_context()  # noqa: S323 - same as mtlsload without -ca
    if args.cert:
        ctx.load_cert_chain(args.cert, args.key or args.cert)
    ctx.set_alpn_protocols(["http/1.1"])
    lines = [f"{args.m} {url.path or '/'}{'?' + url.query if url.query else ''} HTTP/1.1",
             f"Host: {url.netloc}", "User-Agent: pyload"]
    if args.token:
        lines.append(f"Authorization: {'DPoP' if args.dpop_key else 'Bearer'} {args.token}")
    if args.newconn:
        lines.append("Connection: close")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    dpop = _dpop_signer(args.dpop_key, args.m, f"https://{url.netloc}{url.path or '/'}",
                        args.token) if args.dpop_key else None
    head = request[:-2]            # the request without its final CRLF: proofs go after it
    mint = _minter(args.mint_key, args.token) if args.mint_key else None
    # -mint-key: the head up to the token, and after it
    before_token = request[:request.find(args.token.encode())] if mint else b""
    after_token = request[len(before_token) + len(args.token):] if mint else b""
    # -vary: "n=<count>" added to the query of every request, so no head repeats
    target = f"{url.path or '/'}{'?' + url.query if url.query else ''}"
    vary_pre = f"{args.m} {target}{'&' if url.query else '?'}n=".encode()
    vary_post = request[len(f"{args.m} {target}"):]
    sent = 0

    warmup, duration = _duration(args.warmup), _duration(args.d)
    stats = _Stats()
    counting = warmup == 0
    stop = False

    async def worker() -> None:
        nonlocal stop, sent
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        while not stop:
            started = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(
                        url.hostname, port, ssl=ctx, server_hostname=url.hostname), 5)
                    if counting:
                        stats.handshakes += 1
                assert reader is not None and writer is not None
                if mint is not None:
                    writer.write(before_token + mint().encode() + after_token)
                elif args.vary:
                    sent += 1
                    writer.write(vary_pre + str(sent).encode() + vary_post)
                else:
                    writer.write(request if dpop is None else head + dpop() + b"\r\n")
                status, close = await asyncio.wait_for(_read_response(reader), 30)
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError,
                    TimeoutError) as exc:
                if counting:
                    stats.errors += 1
                    stats.first_error = stats.first_error or repr(exc)
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(0.01)
                continue
            if counting:
                stats.latencies.append(time.perf_counter() - started)
                stats.n += 1
                stats.status[status] = stats.status.get(status, 0) + 1
            if args.newconn or close:
                assert writer is not None
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    tasks = [asyncio.create_task(worker()) for _ in range(args.c)]
    if warmup:
        await asyncio.sleep(warmup)
        counting = True
    began = time.perf_counter()
    await asyncio.sleep(duration)
    stop = True
    elapsed = time.perf_counter() - began
    await asyncio.wait(tasks, timeout=35)

    lat = sorted(stats.latencies)

    def pct(p: float) -> float:
        return lat[int(p * (len(lat) - 1))] * 1000 if lat else 0.0

    rps = stats.n / elapsed
    mode = "newconn" if args.newconn else "keepalive"
    bad = stats.errors + sum(v for k, v in stats.status.items() if args.expect and k != args.expect)
    print(f"pyload {mode} c={args.c}: {stats.n} requests in {elapsed:.2f}s = {rps:.0f} req/s, "
          f"handshakes {stats.handshakes}, errors {stats.errors}, status {stats.status}")
    if stats.first_error:
        print(f"first error: {stats.first_error}")
    result = {"tool": "pyload", "mode": mode, "c": args.c, "requests": stats.n,
              "seconds": elapsed, "rps": rps, "errors": stats.errors,
              "status": {str(k): v for k, v in stats.status.items()},
              "handshakes": stats.handshakes, "resumed": 0,
              "p50_ms": pct(0.5), "p99_ms": pct(0.99)}
    print("RESULT " + json.dumps(result), flush=True)
    return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-url", required=True)
    p.add_argument("-cert", default="")
    p.add_argument("-key", default="")
    p.add_argument("-ca", default="")
    p.add_argument("-token-file", dest="token_file", default="")
    p.add_argument("-m", default="GET")
    p.add_argument("-c", type=int, default=32)
    p.add_argument("-d", default="10s")
    p.add_argument("-warmup", default="0s")
    p.add_argument("-expect", type=int, default=200)
    p.add_argument("-newconn", action="store_true")
    p.add_argument("-dpop-key", dest="dpop_key", default="")
    p.add_argument("-mint-key", dest="mint_key", default="",
                   help="re-sign the token (ES256, this PEM key) with a new jti on every request")
    p.add_argument("-vary", action="store_true",
                   help="a different target on every request (query n=<count>)")
    args = p.parse_args()
    if args.vary and args.dpop_key:
        p.error("-vary and -dpop-key do not combine (a DPoP head never repeats anyway)")
    args.token = Path(args.token_file).read_text().strip() if args.token_file else ""
    if args.mint_key and (args.dpop_key or args.vary or not args.token):
        p.error("-mint-key needs -token-file, and combines with neither -dpop-key nor -vary")
    return asyncio.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
