"""Give freed heap memory back to the system (glibc), so that RSS follows the load down.

Under connection churn (thousands of TLS connections opened and closed) Python's object
counts stay flat, but glibc keeps the freed heap pages of every arena: resident memory grew
from 146 to 363 MB in six rounds of 2,000 connections and never came back. Two measures,
both no-ops where the C library is not glibc:

* at start, at most two malloc arenas (``M_ARENA_MAX``; the gateway is one event-loop
  thread plus a few helper threads), unless ``MALLOC_ARENA_MAX`` is set already;
* every ``TRIM_INTERVAL`` seconds, ``malloc_trim(0)`` in a helper thread: free pages in
  the middle of the heap are returned too (``MADV_DONTNEED``), not only the top.

``MTLS_GATEWAY_MALLOC_TRIM=0`` turns both off. ``bench/memory.py churn`` measures it.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import time

__all__ = ["TRIM_ENV", "TRIM_INTERVAL", "configure_allocator", "trim", "trim_forever"]

log = logging.getLogger("mtls_gateway.memtrim")

TRIM_ENV = "MTLS_GATEWAY_MALLOC_TRIM"
TRIM_INTERVAL = 10.0
_M_ARENA_MAX = -8           # glibc malloc.h
_OFF = frozenset({"0", "false", "no", "off"})


def _libc() -> ctypes.CDLL | None:
    if os.environ.get(TRIM_ENV, "1").strip().lower() in _OFF:
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):   # not glibc (musl has neither)
        return None
    return libc


_LIBC = _libc()


def configure_allocator() -> bool:
    """At most two malloc arenas (call before threads start); False: not glibc, or off."""
    if _LIBC is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(_LIBC.mallopt(_M_ARENA_MAX, 2))


def trim() -> bool:
    """Return free heap pages to the system now (blocking, milliseconds)."""
    return _LIBC is not None and bool(_LIBC.malloc_trim(0))


async def trim_forever(interval: float = TRIM_INTERVAL) -> None:
    """Trim every ``interval`` seconds in a helper thread (the event loop never waits)."""
    if _LIBC is None:
        return
    while True:
        await asyncio.sleep(interval)
        started = time.perf_counter()
        released = await asyncio.to_thread(trim)
        log.debug("malloc_trim: %s in %.1f ms", "released memory" if released else "nothing",
                  (time.perf_counter() - started) * 1000)
