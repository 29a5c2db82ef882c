"""Which asyncio event loop runs the gateway: uvloop when installed, else asyncio's own.

uvloop (libuv, Cython) makes the loop, the TCP transports and the TLS layer cheaper per
request; it is an optional dependency (``pip install 'mtls-gateway[fast]'``, installed in
the container image). Nothing in the gateway depends on it: with it missing, or with
``MTLS_GATEWAY_UVLOOP=0``, the standard loop runs the same code.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["UVLOOP_ENV", "loop_factory", "loop_name", "run"]

UVLOOP_ENV = "MTLS_GATEWAY_UVLOOP"
_OFF = frozenset({"0", "false", "no", "off"})

log = logging.getLogger("mtls_gateway.eventloop")

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory if it is wanted and importable; None: asyncio's default."""
    if os.environ.get(UVLOOP_ENV, "1").strip().lower() in _OFF:
        return None
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    module = type(loop).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the chosen loop; logs which one it is."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        log.info("event loop: %s", loop_name(runner.get_loop()))
        return runner.run(main)
