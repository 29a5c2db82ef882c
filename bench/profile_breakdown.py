"""Where the gateway's main thread spends its time, from a ``py-spy record --format raw``
profile (``bench/run.py --profile [--native]`` writes them to ``bench/.build/profiles/``).

    .venv/bin/python bench/profile_breakdown.py bench/.build/profiles/gw-es256.txt ...

Each sample of the event loop's thread is charged to the innermost frame that belongs to a
known part (TLS, the aiohttp server, the aiohttp client, the decision log, metrics, the
gateway's own modules, ...); other threads (the log writer, idle pool workers) are left out.
"""

from __future__ import annotations

import collections
import sys

PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("TLS (OpenSSL, ssl module, SSL protocol)", ("libssl", "libcrypto", "_ssl.c", "ssl.py",
                                                 "sslproto")),
    ("syscalls (read/write/epoll)", ("write (libc", "read (libc", "writev", "epoll_wait",
                                     "sendmsg", "recvmsg", "send (libc", "recv (libc")),
    ("decision log (on the loop)", ("logging/", "decision_log.py")),
    ("metrics (prometheus-client)", ("prometheus_client",)),
    ("token verify + cache", ("jwt_verifier.py", "jwt/", "cachetools")),
    ("upstream client (aiohttp ClientSession)", ("aiohttp/client", "aiohttp/connector",
                                                 "client_proto", "client_reqrep")),
    ("HTTP server (aiohttp web, parser, writer)", ("aiohttp/web", "aiohttp/http_",
                                                   "aiohttp/streams", "aiohttp/_http",
                                                   "aiohttp/helpers", "multidict", "yarl")),
    ("gateway modules (route, peer cert, binding, headers, proxy)", ("mtls_gateway/",)),
    ("garbage collector", ("gc_collect",)),
)


#: Frames that only start the loop: not charged to the gateway's modules.
_ENTRY = ("eventloop.py", "cli.py", "__main__", "runners.py")


def part(frames: list[str]) -> str:
    for frame in reversed(frames):
        if any(e in frame for e in _ENTRY):
            continue
        for name, needles in PARTS:
            if any(n in frame for n in needles):
                return name
    return "event loop, interpreter, other"


def main(paths: list[str]) -> None:
    for path in paths:
        counts: collections.Counter[str] = collections.Counter()
        total = 0
        with open(path) as fh:
            for line in fh:
                stack, _, n = line.rstrip("\n").rpartition(" ")
                if "Runner.run" not in stack:     # the event loop's thread only
                    continue
                frames = stack.split(";")
                total += int(n)
                counts[part(frames)] += int(n)
        print(f"{path}: {total} samples of the event loop's thread")
        for name, n in counts.most_common():
            print(f"  {100 * n / total:5.1f} %  {name}")


if __name__ == "__main__":
    main(sys.argv[1:])
