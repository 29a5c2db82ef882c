"""The gateway process: mutual-TLS listener, admin port, hot reload, graceful stop.

:class:`GatewayServer` owns the current :class:`Gateway` (routes, verifiers,
upstream pool). A reload builds a complete new one from the new files and swaps
it in only if everything loaded; requests already running finish on the old one.
New TLS handshakes pick up new certificate/key/client-CA material through
:meth:`AnyCertSite.update` (``listen.tls_stack: openssl``) or :class:`TlsContextSwitch`
(``python``); established connections keep theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509

from .admin import build_admin_app
from .anchors import handshake_warnings
from .config import GatewayConfig, ListenConfig
from .config_load import load_config
from .connection import GuardedAppRunner, count_request
from .errors import ConfigError
from .gateway import Gateway
from .handshake import HandshakeFailures
from .memtrim import configure_allocator, trim_forever
from .metrics import FLUSH_SECONDS, Metrics
from .reload_carry import Carried, carry_over, files_digest, provider_files_digest
from .tls import TlsContextSwitch, server_ssl_context
from .tls_any import AnyCertSite, openssl_context
from .upstream_tls import UpstreamTargets

__all__ = ["RELOAD_SETTLE_SECONDS", "SERVER", "GatewayServer", "serve_forever"]

log = logging.getLogger("mtls_gateway.app")

# A front proxy's certificate header (XFCC with Cert= and Chain=, URL-encoded PEM) carries a
# whole chain, so header mode allows at least this much per field (limits.max_header_size).
_MAX_FIELD_SIZE_CERT_HEADER = 64 * 1024
#: A changed file is loaded only once two reads this far apart agree: a file caught mid-write
#: (truncate, then write) is not loaded half-written. Writers that replace the file in one
#: step (rename, Kubernetes' ..data symlink swap) never show a half-written file at all.
RELOAD_SETTLE_SECONDS = 1.0
RELOAD_SETTLE_MAX_SECONDS = 10.0


def _not_after(cert_file: Path | None) -> float | None:
    if cert_file is None:          # plain-HTTP listener behind a front proxy
        return None
    return x509.load_pem_x509_certificate(cert_file.read_bytes()).not_valid_after_utc.timestamp()


async def _bind(start: Awaitable[None], section: str, host: str, port: int) -> None:
    """Open a listening socket; a failure is a :class:`ConfigError` naming the field and the
    fix (a message at start-up, not a traceback)."""
    try:
        await start
    except socket.gaierror as exc:
        raise ConfigError([f"{section}.host: cannot resolve {host!r} ({exc.strerror}); use an "
                           "IP address or a name this machine resolves"]) from exc
    except OSError as exc:
        fix = {errno.EADDRINUSE: "another process listens there: stop it or choose another "
                                 "port",
               errno.EACCES: "ports below 1024 need privileges: choose a port above 1023",
               errno.EADDRNOTAVAIL: f"{host} is not an address of this machine"}.get(
                   exc.errno or 0, "check the address")
        raise ConfigError([f"{section}.port: cannot listen on {host}:{port} "
                           f"({exc.strerror or exc}); {fix}"]) from exc


class GatewayServer:
    """One gateway process; ``port``/``admin_port`` are the bound ports after :meth:`start`."""

    def __init__(self, config: GatewayConfig, *, metrics: Metrics | None = None,
                 reuse_port: bool = False, serve_admin: bool = True,
                 on_ready_change: Callable[[bool], None] | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.gateway = Gateway(config, self.metrics)
        self.handshake_failures = HandshakeFailures(
            lambda reason: self.metrics.tls_handshake_failures.labels(reason).inc())
        self.port = 0
        self.admin_port = 0
        self.draining = False
        self._reuse_port = reuse_port
        self._serve_admin = serve_admin and config.admin.enabled
        self._on_ready_change = on_ready_change
        self._tls: TlsContextSwitch | AnyCertSite | None = None
        #: tls_stack python: digest of the client CA bundle its handshakes verify against
        self._client_trust = b""
        self._runner: web.AppRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self._reload_lock = asyncio.Lock()
        self._watch_task: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._fingerprint = b""
        self._provider_files: dict[str, bytes] = {}
        self._pending: set[str] = set()     # providers a reload added that have no keys yet
        self.settle_seconds = RELOAD_SETTLE_SECONDS

    # --- start and stop -------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        limits = self.config.limits
        field_size = (max(limits.max_header_size, _MAX_FIELD_SIZE_CERT_HEADER)
                      if self.config.listen.client_certificate else limits.max_header_size)
        app = web.Application(
            handler_args={"max_field_size": field_size,
                          "max_line_size": limits.max_header_size,
                          "max_headers": limits.max_headers,
                          "keepalive_timeout": limits.idle_timeout,
                          # after a refusal with a body left unread (413, 408): read and drop
                          # it for at most this long so the client sees the answer, then close
                          "lingering_time": 2.0,
                          # a compressed request body is forwarded as it came, never inflated
                          "auto_decompress": False},
            middlewares=[self._every_request])
        app[SERVER] = self
        app.on_response_prepare.append(self._before_response)

        async def lifecycle(_: web.Application) -> AsyncIterator[None]:
            await self.gateway.start()
            self._fingerprint = await asyncio.to_thread(files_digest,
                                                        self.config.watched_files())
            self._provider_files = await asyncio.to_thread(provider_files_digest,
                                                           self.config.providers)
            if self.config.reload_interval > 0:
                self._watch_task = asyncio.create_task(self._watch(), name="config-watch")
            flusher = asyncio.create_task(self._flush_metrics(), name="metrics-flush")
            trimmer = asyncio.create_task(trim_forever(), name="malloc-trim")
            yield
            for task in (flusher, trimmer):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self.metrics.flush()
            if self._watch_task is not None:
                self._watch_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._watch_task
            for task in list(self._retiring):
                task.cancel()
            await self.gateway.close()

        app.cleanup_ctx.append(lifecycle)
        app.router.add_route("*", "/{path:.*}", self._handle)
        return app

    async def _flush_metrics(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            self.metrics.flush()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        return await self.gateway.handle(request)  # the current config, even after a reload

    @web.middleware
    async def _every_request(self, request: web.Request,
                             handler: Any) -> web.StreamResponse:
        """Every request goes to the gateway, even targets aiohttp's router cannot match
        (``*``, authority form): those are refused there with a reason code, not a text 404."""
        return await self._handle(request)

    def _count_refusal(self, reason: str, status: int) -> None:
        """A refusal made before any route was looked at (connection limits, parse errors)."""
        self.metrics.requests.labels("-", "deny", reason, str(status)).inc()

    async def _before_response(self, request: web.Request,
                               response: web.StreamResponse) -> None:
        count_request(request, response, self.config.limits.max_requests_per_connection)

    async def start(self) -> None:
        listen = self.config.listen
        if listen.tls:
            self._set_expiry(_not_after(listen.cert_file))
        self._runner = GuardedAppRunner(self.build_app(), access_log=None, handle_signals=False,
                                        shutdown_timeout=self.config.shutdown_grace,
                                        limits=lambda: self.config.limits,
                                        on_refusal=self._count_refusal,
                                        gateway_of=lambda: self.gateway)
        await self._runner.setup()
        try:
            await self._open_sites()
        except BaseException:
            await self._runner.cleanup()       # close what setup() started (JWKS sessions...)
            self._runner = None
            if self._admin_runner is not None:
                await self._admin_runner.cleanup()
                self._admin_runner = None
            raise

    async def _open_sites(self) -> None:
        assert self._runner is not None
        listen = self.config.listen
        reuse_port = self._reuse_port or None
        site: web.BaseSite
        if not listen.tls:      # behind a front proxy: certificates come in a header
            site = web.TCPSite(self._runner, listen.host, listen.port, reuse_port=reuse_port)
        elif listen.client_ca == "any" or listen.tls_stack == "openssl":   # see tls_any.py
            context = await asyncio.to_thread(openssl_context, listen)
            site = self._tls = AnyCertSite(self._runner, listen.host, listen.port,
                                           context=context,
                                           reuse_port=reuse_port,
                                           failures=self.handshake_failures)
        else:
            self._tls = TlsContextSwitch(server_ssl_context(listen, self.handshake_failures))
            self._client_trust = await asyncio.to_thread(_client_trust, listen)
            site = web.TCPSite(self._runner, listen.host, listen.port,
                               ssl_context=self._tls.base, reuse_port=reuse_port)
        await _bind(site.start(), "listen", listen.host, listen.port)
        self.port = self._runner.addresses[0][1]
        if self._serve_admin:
            admin = self.config.admin
            self._admin_runner = web.AppRunner(
                build_admin_app(readiness=self.readiness, render_metrics=self.metrics.render),
                access_log=None, handle_signals=False)
            await self._admin_runner.setup()
            await _bind(web.TCPSite(self._admin_runner, admin.host, admin.port,
                                    reuse_port=self._reuse_port or None).start(),
                        "admin", admin.host, admin.port)
            self.admin_port = self._admin_runner.addresses[0][1]
        for warning in handshake_warnings(self.config):
            log.warning("%s", warning)
        source = listen.client_certificate
        log.info("gateway listening on %s:%d (%s; client certificate %s)%s",
                 listen.host, self.port, "mutual TLS" if listen.tls else "plain HTTP",
                 f"from the {source.header} header of trusted front proxies" if source
                 else f"{listen.client_cert}, "
                 + ("any issuer" if listen.client_ca == "any" else "issued by client_ca_file")
                 + (", TLS by " + ("pyOpenSSL" if isinstance(self._tls, AnyCertSite)
                                   else "Python's ssl") if listen.tls else ""),
                 f"; admin on {self.config.admin.host}:{self.admin_port}"
                 if self._admin_runner else "")
        self._notify_ready()

    def _set_expiry(self, not_after: float | None) -> None:
        if not_after is not None:
            self.metrics.server_cert_expiry.set(not_after)

    def readiness(self) -> dict[str, bool]:
        return {"listener": self._runner is not None and self.port != 0,
                # every provider has keys, except one a reload added that has none yet
                # (its routes answer 503; the other routes must keep their pod in service)
                "keys_loaded": all(v.ready or name in self._pending
                                   for name, v in self.gateway.verifiers.items()),
                "not_draining": not self.draining}

    @property
    def ready(self) -> bool:
        return all(self.readiness().values())

    def _notify_ready(self) -> None:
        if self._on_ready_change is not None:
            self._on_ready_change(self.ready)

    async def stop(self) -> None:
        """Drain: not ready at once, keep accepting for shutdown_delay, then stop accepting and
        give in-flight requests up to shutdown_grace."""
        if self._runner is None:
            return
        self.draining = True
        self._notify_ready()
        if self.config.shutdown_delay > 0:
            await asyncio.sleep(self.config.shutdown_delay)
        await self._runner.cleanup()
        self._runner = None
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None

    @property
    def app(self) -> web.Application:
        assert self._runner is not None
        return self._runner.app

    # --- reload -----------------------------------------------------------------------------------

    async def _watch(self) -> None:
        """Poll the watched files; survives every failure of a reload (logged and counted)."""
        while True:
            await asyncio.sleep(self.config.reload_interval)
            try:
                fingerprint = await asyncio.to_thread(files_digest, self.config.watched_files())
                if fingerprint != self._fingerprint:
                    await self.reload("files changed")
            except Exception:   # the watcher must outlive any reload bug
                self.metrics.config_reloads.labels("failure").inc()
                log.exception("reload (files changed) failed; keeping the current config")

    async def _settled(self) -> bytes | None:
        """The watched files' fingerprint once two reads ``RELOAD_SETTLE_SECONDS`` apart agree
        (a writer caught mid-write is not loaded half-written); None: they kept changing."""
        paths = self.config.watched_files()
        before = await asyncio.to_thread(files_digest, paths)
        waited = 0.0
        while waited < RELOAD_SETTLE_MAX_SECONDS:
            await asyncio.sleep(self.settle_seconds)
            waited += self.settle_seconds
            now = await asyncio.to_thread(files_digest, paths)
            if now == before:
                return now
            before = now
        return None

    async def reload(self, trigger: str) -> bool:
        """Load config and TLS material anew; swap only if all of it is good.

        Every failure is logged and counted and leaves the current config serving; the
        watcher picks up later edits. What still holds is kept (reload_carry.py). When only
        TLS files changed (cert-manager rotation), the running :class:`Gateway` and its warm
        caches stay; just new handshakes get the new material.
        """
        async with self._reload_lock:
            try:
                return await self._reload(trigger)
            except Exception as exc:   # a reload never kills its caller
                self._fingerprint = await asyncio.to_thread(
                    files_digest, self.config.watched_files())   # reported once, not each poll
                self.metrics.config_reloads.labels("failure").inc()
                expected = isinstance(exc, ConfigError | ssl.SSLError | OSError | ValueError)
                log.error("reload (%s) refused, keeping the current config and TLS material: "
                          "%s", trigger, exc, exc_info=not expected)
                return False

    async def _reload(self, trigger: str) -> bool:
        for _attempt in range(3):
            settled = await self._settled()
            if settled is None:
                raise ConfigError([f"(files): still changing after "
                                   f"{RELOAD_SETTLE_MAX_SECONDS:.0f}s; write the config "
                                   "with an atomic rename "
                                   "(see docs/operations-reload.md)"])
            config = (await asyncio.to_thread(load_config, self.config.source)
                      if self.config.source else self.config)
            if config.listen.client_ca != self.config.listen.client_ca:
                # The listener's TLS stack is chosen at start. Refused rather than
                # deferred: routes valid under pki (binding off) must never run on an
                # "any" listener.
                raise ConfigError(["listen.client_ca: changed from "
                                   f"{self.config.listen.client_ca} to "
                                   f"{config.listen.client_ca}; this needs a restart"])
            install_tls = await asyncio.to_thread(self._prepare_tls, config.listen)
            expiry = await asyncio.to_thread(_not_after, config.listen.cert_file)
            files = await asyncio.to_thread(provider_files_digest, config.providers)
            if await asyncio.to_thread(files_digest, self.config.watched_files()) == settled:
                break       # nothing changed while we read: one consistent set of files
            log.info("reload (%s): files changed while being read; reading them again", trigger)
        else:
            raise ConfigError(["(files): kept changing while being read; write the config "
                               "with an atomic rename (see docs/operations-reload.md)"])
        carried: Carried | None = None
        if config != self.config or files != self._provider_files:
            carried = carry_over(self.gateway, config, self.metrics, self._provider_files, files)
            new = Gateway(config, self.metrics, verifiers=carried.verifiers)
            try:
                await new.start()
            except BaseException:
                new.release(carried.handed_over)    # still the running gateway's
                await new.close()
                raise
            self._warn_restart_only(config)
            old, self.gateway, self.config = self.gateway, new, config
            old.release(carried.handed_over)
            self._provider_files = files
            self._pending = {n for n, v in new.verifiers.items()
                             if not v.ready and (n in carried.fresh or n in self._pending)}
            task = asyncio.create_task(old.retire(config.shutdown_grace))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        else:
            # Same config, maybe rotated upstream CA or client certificate files: new
            # contexts for new upstream connections (upstream_tls.py).
            self.gateway.upstreams = await asyncio.to_thread(UpstreamTargets, config)
        install_tls()
        self._set_expiry(expiry)
        self._fingerprint = settled
        self.metrics.config_reloads.labels("success").inc()
        log.info("reloaded (%s): %s", trigger,
                 f"{len(config.routes)} routes, {len(config.providers)} providers "
                 f"(kept: {', '.join(carried.kept) or '-'}; keys kept: "
                 f"{', '.join(carried.keys_only) or '-'}; new: {', '.join(carried.fresh) or '-'})"
                 if carried is not None else "TLS material only, configuration unchanged")
        for name in sorted(self._pending):
            log.warning("provider %s has no signing keys yet: its tokens get 503 "
                        "jwks_unavailable until they load; readiness does not wait for a "
                        "provider added by a reload", name)
        self._notify_ready()
        return True

    def _prepare_tls(self, listen: ListenConfig) -> Callable[[], None]:
        """Build new TLS material for the running listener (blocking: run in a thread); the
        returned call makes new handshakes use it."""
        tls = self._tls
        if tls is None or not listen.tls:   # plain HTTP (a tls change needs a restart)
            return lambda: None
        if isinstance(tls, AnyCertSite):   # the stack chosen at start (tls_stack: restart)
            context = openssl_context(listen)
            return lambda: tls.update(context)
        assert tls is not None
        ssl_context = server_ssl_context(listen, self.handshake_failures)
        trust = _client_trust(listen)

        def install() -> None:
            # Python's ssl decrypts session tickets with the keys of the context the listener
            # was bound with, whichever context a handshake then moves to, and has no way to
            # change them: a session verified under the old bundle can still be resumed.
            if trust != self._client_trust:
                log.warning(
                    "listen.client_ca_file changed: new handshakes verify against the new "
                    "bundle, but tls_stack: python cannot end the TLS sessions made before "
                    "this reload, so a client certificate only the old bundle trusted can "
                    "still resume one until it expires (up to %d s); restart the gateway to "
                    "end them now (tls_stack: openssl ends them at every reload)",
                    SESSION_LIFETIME)
            self._client_trust = trust
            tls.update(ssl_context)
        return install

    def _warn_restart_only(self, new: GatewayConfig) -> None:
        old = self.config
        # The pyOpenSSL listener rebuilds its whole TLS context on reload, so client_cert
        # applies there; Python's ssl keeps the verify mode of the context it was bound with.
        client_cert = (None if isinstance(self._tls, AnyCertSite)
                       else new.listen.client_cert)
        for what, before, after in (
                ("listen address", (old.listen.host, old.listen.port),
                 (new.listen.host, new.listen.port)),
                ("listen.tls", old.listen.tls, new.listen.tls),
                ("listen.tls_stack", old.listen.tls_stack, new.listen.tls_stack),
                ("listen.client_cert", old.listen.client_cert,
                 client_cert or old.listen.client_cert),
                ("admin", old.admin, new.admin)):
            if before != after:
                log.warning("%s changed in the config; it takes effect after a restart", what)


#: How long OpenSSL keeps a TLS session resumable (its default, which Python's ssl keeps).
SESSION_LIFETIME = 7200


def _client_trust(listen: ListenConfig) -> bytes:
    """Digest of the client CA bundle (blocking: run in a thread)."""
    return files_digest([listen.client_ca_file]) if listen.client_ca_file else b""


SERVER = web.AppKey("server", GatewayServer)


async def serve_forever(config: GatewayConfig, *, reuse_port: bool = False,
                        serve_admin: bool = True,
                        on_ready_change: Callable[[bool], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT (then drain and return); SIGHUP reloads."""
    configure_allocator()   # before any helper thread starts (memtrim.py)
    server = GatewayServer(config, reuse_port=reuse_port, serve_admin=serve_admin,
                           on_ready_change=on_ready_change)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[bool]] = set()

    def on_hup() -> None:
        task = asyncio.create_task(server.reload("SIGHUP"))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await stop.wait()
        log.info("shutting down: not ready; draining for up to %.0fs",
                 config.shutdown_delay + config.shutdown_grace)
    finally:
        await server.stop()
    log.info("stopped")
