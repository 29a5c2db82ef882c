"""One structured JSON line per request, with a stable reason code.

The token itself is never logged: only ``token_hash``, the first 12 hex digits
of its SHA-256, which is enough to correlate requests and useless to replay.

The event loop never writes to stdout itself: records go through a queue to a
writer thread (``QueueHandler``/``QueueListener``), so a slow log pipe delays
log lines, not requests. The listener flushes what is queued at exit.

Decision lines logged on a running event loop are handed to the writer in batches, at most
:data:`BATCH_SECONDS` after they were logged: one queue put per batch instead of one per
request, because each put wakes the writer thread, and a woken thread takes the GIL from the
event loop (a third of a keep-alive request's CPU went to that ping-pong). Any other record
logged on the loop first hands over the batch before it, so lines keep their order.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import json
import logging
import logging.handlers
import os
import queue
import sys
import time
from threading import get_ident
from typing import Any

__all__ = ["BATCH_SECONDS", "JsonFormatter", "configure_logging", "log_decision", "log_fields",
           "stop_logging", "token_digest", "token_hash"]

access_log = logging.getLogger("mtls_gateway.access")


def token_digest(token: str) -> bytes:
    """SHA-256 of the token: computed once per request, it names the token in the log and
    keys the verifier caches, so the token itself is never kept."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def token_hash(token: str, digest: bytes | None = None) -> str:
    """The log's short name for a token: 12 hex digits of its SHA-256."""
    return (digest or token_digest(token)).hex()[:12]


#: One encoder for every line (``json.dumps`` with options builds a new one per call).
_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode


class _Clock:
    """The "time" member: formatted once per second, not once per line."""

    __slots__ = ("second", "text")

    def __init__(self) -> None:
        self.second, self.text = -1, ""

    def stamp(self, created: float) -> str:
        second = int(created)
        if second != self.second:
            self.second = second
            self.text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self.text}.{int((created - second) * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """Every record as one JSON object; decision records carry their fields at top level."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self._clock.stamp(record.created),
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
        return _encode(out)

    def decision_line(self, created: float, fields: dict[str, Any]) -> str:
        """What :meth:`format` makes of a decision record, from its time and fields alone
        (the event loop queues just these two, not a LogRecord)."""
        return _encode({"time": self._clock.stamp(created), "level": "info",
                        "logger": _ACCESS, "pid": _PID, **fields})


_ACCESS = access_log.name
_listener: logging.handlers.QueueListener | None = None
#: The writer thread's queue and the root handler feeding it, while configure_logging's setup
#: is the only one in place (not, say, under pytest's log capture).
_direct: tuple[queue.SimpleQueue[Any], logging.Handler] | None = None
#: A decision as the event loop queues it: (time.time(), fields).
_Entry = tuple[float, dict[str, Any]]


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

    def enqueue(self, record: logging.LogRecord) -> None:
        _hand_over_current()            # the decision lines logged before it go first
        self.queue.put_nowait(record)


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
            formatter = handler.formatter
            for record in _flatten(batch):
                if record is _STOP:
                    stop = True
                    continue
                try:
                    if type(record) is tuple and isinstance(formatter, JsonFormatter):
                        lines.append(formatter.decision_line(*record))
                    else:
                        lines.append(handler.format(record))
                except Exception:
                    if isinstance(record, logging.LogRecord):
                        handler.handleError(record)
            if lines:
                try:
                    handler.stream.write("\n".join(lines) + "\n")
                    handler.flush()
                except Exception:
                    handler.handleError(logging.makeLogRecord({"msg": "log write failed"}))
            if stop:
                return


def _flatten(items: list[Any]) -> list[Any]:
    """The queue's items with the event loop's batches (lists) opened up, in order."""
    if not any(type(item) is list for item in items):
        return items
    out: list[Any] = []
    for item in items:
        if type(item) is list:
            out += item
        else:
            out.append(item)
    return out


#: The longest a decision line logged on a running event loop waits before it is handed to
#: the writer thread (which then writes it at once).
BATCH_SECONDS = 0.02
#: A batch this long is handed over at once (a burst does not wait for the timer).
_BATCH_MAX = 512


class _Batch:
    """The decision lines one thread's running event loop logged and has not handed over."""

    __slots__ = ("entries", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.entries: list[_Entry] = []


#: By thread (``threading.get_ident``: asking for the running loop on every line costs a
#: getpid system call in CPython 3.11, ~7 % of a keep-alive request).
_batches: dict[int, _Batch] = {}


def _hand_over(thread: int, batch: _Batch | None = None) -> None:
    """Queue the batch of ``thread`` (only ``batch``, if given: a timer of an older batch
    that was already handed over must not take a newer one early)."""
    current = _batches.get(thread)
    if current is None or (batch is not None and current is not batch):
        return
    del _batches[thread]
    direct = _direct
    if direct is not None:
        direct[0].put(current.entries)
    else:       # logging was reconfigured meanwhile: through whatever is in place now
        for _, fields in current.entries:
            access_log.info("%s %s", fields.get("decision"), fields.get("reason"),
                            extra={"decision": fields})


def _hand_over_current() -> None:
    if _batches:
        _hand_over(get_ident())


def _hand_over_all() -> None:
    for thread in list(_batches):
        _hand_over(thread)


def _enqueue(records: queue.SimpleQueue[Any], entry: _Entry) -> None:
    thread = get_ident()
    batch = _batches.get(thread)
    if batch is None or batch.loop.is_closed():
        if batch is not None:           # (a loop that ended before its timer fired)
            _hand_over(thread)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:            # (no event loop in this thread: at once)
            records.put(entry)
            return
        batch = _batches[thread] = _Batch(loop)
        loop.call_later(BATCH_SECONDS, _hand_over, thread, batch)
    batch.entries.append(entry)
    if len(batch.entries) >= _BATCH_MAX:
        _hand_over(thread)


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
    _hand_over_all()
    _direct = None
    if _listener is not None:
        _listener.stop()
        _listener = None


def log_decision(**fields: Any) -> None:
    """Log one request decision; ``None`` fields are left out."""
    log_fields(fields)


def log_fields(fields: dict[str, Any]) -> None:
    """:func:`log_decision` for a dict of fields the caller made for it (and gives up)."""
    decision = {k: v for k, v in fields.items() if v is not None}
    direct = _direct
    if direct is not None:
        handlers = logging.root.handlers
        if len(handlers) == 1 and handlers[0] is direct[1] and access_log.propagate \
                and access_log.isEnabledFor(logging.INFO) and not access_log.handlers \
                and not access_log.filters and not direct[1].filters:
            _enqueue(direct[0], (time.time(), decision))   # what the call below ends in
            return
    access_log.info("%s %s", decision.get("decision"), decision.get("reason"),
                    extra={"decision": decision})
