"""One structured JSON line per request, with a stable reason code.

The token itself is never logged: only ``token_hash``, the first 12 hex digits
of its SHA-256, which is enough to correlate requests and useless to replay.

The event loop never writes to stdout itself: records go through a queue to a
writer thread (``QueueHandler``/``QueueListener``), so a slow log pipe delays
log lines, not requests. The listener flushes what is queued at exit.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import logging.handlers
import os
import queue
import sys
import time
from typing import Any

__all__ = ["JsonFormatter", "configure_logging", "log_decision", "stop_logging", "token_digest",
           "token_hash"]

access_log = logging.getLogger("mtls_gateway.access")


def token_digest(token: str) -> bytes:
    """SHA-256 of the token: computed once per request, it names the token in the log and
    keys the verifier caches, so the token itself is never kept."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def token_hash(token: str, digest: bytes | None = None) -> str:
    """The log's short name for a token: 12 hex digits of its SHA-256."""
    return (digest or token_digest(token)).hex()[:12]


class JsonFormatter(logging.Formatter):
    """Every record as one JSON object; decision records carry their fields at top level."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
        }
        fields = getattr(record, "decision", None)
        if isinstance(fields, dict):
            out.update(fields)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"), default=str)


_listener: logging.handlers.QueueListener | None = None
#: The writer thread's queue and the root handler feeding it, while configure_logging's setup
#: is the only one in place (not, say, under pytest's log capture).
_direct: tuple[queue.SimpleQueue[Any], logging.Handler] | None = None


class _DecisionRecord(logging.LogRecord):
    """A decision log record made without LogRecord.__init__ (a quarter of the cost of a
    request in the fast lane went to making records): just what JsonFormatter reads."""

    def __init__(self, fields: dict[str, Any]) -> None:   # (no super(): that is the point)
        self.created = now = time.time()
        self.msecs = (now - int(now)) * 1000
        self.levelname, self.levelno, self.name = "INFO", logging.INFO, access_log.name
        self.process, self.decision = _PID, fields
        self.msg, self.args = "%s %s", (fields.get("decision"), fields.get("reason"))
        self.exc_info = self.exc_text = self.stack_info = None
        self.pathname = self.filename = self.module = self.funcName = ""
        self.lineno = 0


_PID = os.getpid()


class _QueueHandler(logging.handlers.QueueHandler):
    """Decision records go onto the queue as they are: the writer thread's JsonFormatter
    reads only their fields, so formatting their message and copying them on the event
    loop (what QueueHandler.prepare does for any record) would be work thrown away."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if isinstance(getattr(record, "decision", None), dict) and not record.exc_info:
            return record
        prepared: logging.LogRecord = super().prepare(record)
        return prepared


_STOP = object()


class _BatchingListener(logging.handlers.QueueListener):
    """The writer thread: everything queued goes out in one write and one flush.

    A line per request is thousands of write calls a second otherwise, made on the core the
    event loop needs (the thread shares the process's core and the GIL); batched, a busy
    gateway writes a few dozen lines per call and an idle one still writes each line at once.
    """

    _BATCH = 1024

    def __init__(self, records: queue.SimpleQueue[Any], stream: logging.StreamHandler[Any]) -> None:
        super().__init__(records, stream, respect_handler_level=False)
        self._records = records
        self._handler = stream

    def enqueue_sentinel(self) -> None:
        self._records.put_nowait(_STOP)

    def _monitor(self) -> None:
        records, handler = self._records, self._handler
        while True:
            batch = [records.get()]
            while len(batch) < self._BATCH:
                try:
                    batch.append(records.get_nowait())
                except queue.Empty:
                    break
            lines, stop = [], False
            for record in batch:
                if record is _STOP:
                    stop = True
                    continue
                try:
                    lines.append(handler.format(record))
                except Exception:
                    handler.handleError(record)
            if lines:
                try:
                    handler.stream.write("\n".join(lines) + "\n")
                    handler.flush()
                except Exception:
                    handler.handleError(batch[0])
            if stop:
                return


def configure_logging(level: str) -> None:
    """JSON lines on stdout at ``level``, written by a thread off the event loop."""
    global _listener, _direct, _PID
    stop_logging()
    _PID = os.getpid()          # (after a fork: the worker's own)
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(JsonFormatter())
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener = _BatchingListener(records, stream)
    _listener.start()
    atexit.register(stop_logging)
    # No record needs the caller's file/line or the thread/multiprocessing names (the JSON
    # line has none of them): skip looking them up on every call (logging HOWTO,
    # "Optimization"). The pid stays: every line carries it.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    handler = _QueueHandler(records)
    root.handlers[:] = [handler]
    _direct = (records, handler)
    root.setLevel(level)
    logging.getLogger("aiohttp.access").disabled = True


def stop_logging() -> None:
    """Write out everything queued and stop the writer thread (at exit, or before the
    stream it writes to goes away)."""
    global _listener, _direct
    _direct = None
    if _listener is not None:
        _listener.stop()
        _listener = None


def log_decision(**fields: Any) -> None:
    """Log one request decision; ``None`` fields are left out."""
    decision = {k: v for k, v in fields.items() if v is not None}
    direct = _direct
    if direct is not None and access_log.isEnabledFor(logging.INFO) \
            and logging.root.handlers == [direct[1]] and access_log.propagate \
            and not access_log.handlers and not access_log.filters and not direct[1].filters:
        direct[0].put(_DecisionRecord(decision))    # what the logging call below ends in
        return
    access_log.info("%s %s", fields.get("decision"), fields.get("reason"),
                    extra={"decision": decision})
