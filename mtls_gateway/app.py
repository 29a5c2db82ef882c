"""The aiohttp application and the server around it.

:func:`build_app` makes the application (start-up and shutdown of the verifiers
and the upstream pool in ``cleanup_ctx``); :class:`GatewayServer` binds it to the
mutual-TLS listener. Tests and the demo use the same two pieces as ``run``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from .config import GatewayConfig
from .gateway import Gateway
from .tls import server_ssl_context

__all__ = ["GATEWAY", "GatewayServer", "build_app", "serve_forever"]

log = logging.getLogger("mtls_gateway.app")

GATEWAY = web.AppKey("gateway", Gateway)

# Header size limits: generous for JWTs with many claims, bounded against abuse.
_MAX_FIELD_SIZE = 16 * 1024


def build_app(config: GatewayConfig) -> web.Application:
    gateway = Gateway(config)
    app = web.Application(handler_args={"max_field_size": _MAX_FIELD_SIZE})
    app[GATEWAY] = gateway

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await app[GATEWAY].start()
        yield
        await app[GATEWAY].close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_route("*", "/{path:.*}", gateway.handle)
    return app


@dataclass
class GatewayServer:
    """The gateway listening with mutual TLS; ``port`` is the bound port after start."""

    config: GatewayConfig
    runner: web.AppRunner | None = None
    port: int = 0

    async def start(self) -> None:
        app = build_app(self.config)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                    shutdown_timeout=self.config.shutdown_grace)
        await self.runner.setup()
        listen = self.config.listen
        site = web.TCPSite(self.runner, listen.host, listen.port,
                           ssl_context=server_ssl_context(listen))
        await site.start()
        self.port = self.runner.addresses[0][1]
        log.info("gateway listening on %s:%d (mutual TLS, client certificate %s)",
                 listen.host, self.port, listen.client_cert)

    @property
    def app(self) -> web.Application:
        assert self.runner is not None
        return self.runner.app

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


async def serve_forever(config: GatewayConfig) -> None:
    """Run until SIGINT/SIGTERM, then stop accepting and let in-flight requests finish."""
    server = GatewayServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("shutting down: draining for up to %.0fs", config.shutdown_grace)
    finally:
        await server.stop()
