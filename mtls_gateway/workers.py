"""``--workers N``: N gateway processes sharing one listening port (SO_REUSEPORT).

The kernel spreads new connections across the workers, so one pod can use
several cores. The parent process does no proxying: it serves the admin port
(ready when every worker is ready; metrics summed over all workers through
prometheus-client's multiprocess mode), forwards SIGHUP (reload) and
SIGTERM/SIGINT (drain) to the workers, and exits non-zero if a worker dies on
its own so that the orchestrator restarts the pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from multiprocessing.process import BaseProcess
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path

from aiohttp import web

from .admin import build_admin_app
from .config import GatewayConfig
from .errors import ConfigError

__all__ = ["run_workers"]

log = logging.getLogger("mtls_gateway.workers")


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel send SIGTERM (drain, then exit) when the parent dies.

    A parent killed outright (SIGKILL, the OOM killer) cannot stop its workers; without this
    they would go on serving, unsupervised, on a port a restarted gateway then shares with
    them. Linux only (prctl); elsewhere the workers outlive a killed parent.
    """
    if sys.platform != "linux":
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): this worker will outlive a "
                    "killed parent", ctypes.get_errno())
        return
    if os.getppid() != parent_pid:      # the parent died before prctl: too late to be told
        os.kill(os.getpid(), signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


def _worker_main(config_path: str, ready: Synchronized[int], level: str,
                 parent_pid: int) -> None:
    """Entry point of one worker process (spawned: a fresh interpreter)."""
    from .app import serve_forever
    from .config_load import load_config
    from .decision_log import configure_logging
    from .eventloop import run

    configure_logging(level)
    _die_with_parent(parent_pid)
    config = load_config(Path(config_path))

    def on_ready(value: bool) -> None:
        ready.value = int(value)

    try:
        run(serve_forever(config, reuse_port=True, serve_admin=False,
                          on_ready_change=on_ready))
    except ConfigError as exc:      # a port in use, a bad host: a message, not a traceback
        print(f"mtls-gateway: {config_path}: {exc}", file=sys.stderr)
        sys.exit(2)


def run_workers(config: GatewayConfig, workers: int) -> int:
    """Start ``workers`` processes and supervise them until they stop; the exit status."""
    assert config.source is not None
    metrics_dir = _metrics_dir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    ctx = multiprocessing.get_context("spawn")
    flags: Sequence[Synchronized[int]] = [ctx.Value("b", 0) for _ in range(workers)]
    procs = [ctx.Process(target=_worker_main, name=f"mtls-gateway-worker-{i}", daemon=False,
                         args=(str(config.source), flags[i], config.logging.level,
                               os.getpid()))
             for i in range(workers)]
    for proc in procs:
        proc.start()
    try:
        return asyncio.run(_supervise(config, procs, flags))
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _metrics_dir() -> str:
    """A private folder for the workers' metric files: $TMPDIR or /tmp, else /dev/shm
    (a read-only root filesystem without a writable /tmp still has it)."""
    try:
        return tempfile.mkdtemp(prefix="mtls-gateway-metrics-")
    except OSError:
        return tempfile.mkdtemp(prefix="mtls-gateway-metrics-", dir="/dev/shm")


async def _supervise(config: GatewayConfig, procs: Sequence[BaseProcess],
                     flags: Sequence[Synchronized[int]]) -> int:
    from prometheus_client import generate_latest

    from .metrics import multiprocess_registry

    draining = False
    registry = multiprocess_registry()
    assert registry is not None

    def readiness() -> dict[str, bool]:
        return {"workers_alive": all(p.is_alive() for p in procs),
                "workers_ready": all(bool(f.value) for f in flags),
                "not_draining": not draining}

    runner: web.AppRunner | None = None
    if config.admin.enabled:
        runner = web.AppRunner(build_admin_app(readiness=readiness,
                                               render_metrics=lambda: generate_latest(registry)),
                               access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, config.admin.host, config.admin.port).start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError([f"admin.port: cannot listen on {config.admin.host}:"
                               f"{config.admin.port} ({exc.strerror or exc}); choose another "
                               "port or stop the process that listens there"]) from exc
        log.info("supervising %d workers; admin on %s:%d", len(procs), config.admin.host,
                 runner.addresses[0][1])

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: _signal_all(procs, signal.SIGHUP))

    status = 0
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
        dead = [p for p in procs if not p.is_alive()]
        if dead and not stop.is_set():
            log.error("worker %s exited unexpectedly (code %s); stopping all workers",
                      dead[0].name, dead[0].exitcode)
            status = 1
            break
    draining = True
    _signal_all(procs, signal.SIGTERM)
    deadline = config.shutdown_delay + config.shutdown_grace + 5
    await asyncio.to_thread(_join_all, procs, deadline)
    if any(p.exitcode not in (0, None) for p in procs) and status == 0:
        status = 1
    if runner is not None:
        await runner.cleanup()
    return status


def _signal_all(procs: Sequence[BaseProcess], sig: signal.Signals) -> None:
    for proc in procs:
        if proc.is_alive() and proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)


def _join_all(procs: Sequence[BaseProcess], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.1, deadline - time.monotonic()))
