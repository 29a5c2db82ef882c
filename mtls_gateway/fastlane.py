"""The fast lane: plain requests proxied without aiohttp's request and client objects.

Why: aiohttp's web layer and client cost about 300 us of CPU per proxied request, more than
twice what HAProxy spends on the whole job (issue 8, README "Performance"). Most traffic to
a sidecar is the same shape, a small keep-alive request with a bearer token, and for that
shape the gateway's own decision is cheap (a cached verification, a thumbprint compare). So
a request that is *plain* skips aiohttp entirely: its head is parsed here, the gateway's one
decision core decides (:meth:`mtls_gateway.pipeline.Pipeline.decide`, exactly as for the
aiohttp path: this module holds no auth step), and an allowed request is written to a pooled
upstream connection; the answer is relayed as it arrives. A refusal is answered here with
the bytes :mod:`mtls_gateway.refusal` renders for every path.

Plain means all of this, checked strictly; anything else goes to aiohttp, which remains the
reference path for everything else:

* the whole head arrived in one read with nothing after it (no partial heads, no pipelining);
* printable ASCII with CRLF line ends only; ``GET``/``HEAD``/``OPTIONS``/``DELETE``; an
  origin-form target with no ``%`` and no ``access_token``; ``HTTP/1.1``; header names are
  tokens, no folded lines, exactly one ``Host``, at most one ``Authorization``, and no
  ``Content-Length``, ``Transfer-Encoding``, ``Expect`` or ``Upgrade`` (so no body at all);
* its route is one the lane serves: not a token endpoint, an ``http://`` upstream, and
  certificates from this connection's own handshake.

A connection leaves the lane at its first request that is not plain, and aiohttp serves it
from then on: its parser state is its own, so the two never interleave on one connection.
``fast_lane: false`` in the config sends everything through aiohttp.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import types
from collections.abc import Callable, Coroutine, Generator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from .answer import AnswerReader, BadAnswer, clean
from .config import Route
from .errors import Refusal, UpstreamFailed, upstream_refusal
from .framing import valid_host, valid_origin_form
from .pipeline import Allow, ConnectionMemo, Decision, Pipeline, Refuse, RequestView
from .proxy import STRIPPED_NAMES, STRIPPED_PREFIXES
from .refusal import as_bytes
from .tls import PeerCertificate, peer_certificate
from .upstream_tls import upstream_error

__all__ = [
    "FastLane",
    "Lane",
    "LaneGateway",
    "LaneTarget",
    "PlainRequest",
    "UpstreamPool",
    "parse_plain",
]

log = logging.getLogger("mtls_gateway.fastlane")

_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"DELETE"})
#: Headers that mean a body, an expectation or a protocol switch: aiohttp's business.
_NOT_PLAIN = frozenset({b"content-length", b"transfer-encoding", b"expect", b"upgrade",
                        b"http2-settings"})
#: A header of a stripped family that the lane's exact strip set may not hold: aiohttp's path
#: strips it (Forwarder.strips), so such a head is not plain. So is a name with "_".
_FAMILIES = tuple(p.encode() for p in STRIPPED_PREFIXES)
_EXACT = frozenset(n.encode() for n in STRIPPED_NAMES)
#: RFC 9110 token characters (a header name is a non-empty token).
_TCHARS = b"!#$%&'*+.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-"
# What a header name is to the lane (see _name_kind).
_OTHER, _HOST_NAME, _AUTHORIZATION, _DPOP, _CONNECTION = range(5)
_SPECIAL = {b"host": _HOST_NAME, b"authorization": _AUTHORIZATION, b"dpop": _DPOP,
            b"connection": _CONNECTION}
#: Header names as sent -> (lower-case name, kind), None: not plain. Clients send the same
#: few names on every request, so each is classified once; bounded (a client inventing names
#: only stops adding to it: at most 1,024 names of up to 64 bytes).
_NAMES: dict[bytes, tuple[bytes, int] | None] = {}
_MAX_NAMES = 1024
#: Host values seen and whether framing.valid_host accepts them (bounded the same way).
_HOSTS: dict[bytes, bool] = {}
_MAX_HOSTS = 256


def _name_kind(name: bytes) -> tuple[bytes, int] | None:
    """(lower-case name, kind) of a header name, None if it makes a head not plain."""
    if not name or name.translate(None, _TCHARS):
        return None
    lower = name.lower()
    if lower in _NOT_PLAIN or b"_" in lower or (
            lower.startswith(_FAMILIES) and lower not in _EXACT):
        return None
    return lower, _SPECIAL.get(lower, _OTHER)


def _host_ok(value: bytes) -> bool:
    ok = _HOSTS.get(value)
    if ok is None:
        ok = bool(value) and valid_host(value.decode("ascii"))
        if len(_HOSTS) < _MAX_HOSTS and len(value) <= 270:
            _HOSTS[value] = ok
    return ok




@dataclass(slots=True)
class PlainRequest:
    """A parsed plain request head (see the module docstring)."""

    method: str
    target: bytes                            # origin form, as sent
    raw_path: str                            # the same, as text
    path: str                                # the target without its query (nothing to decode)
    headers: list[tuple[bytes, bytes, bytes]]   # (name as sent, lower-case name, value)
    host: str
    authorization: tuple[str, ...]           # at most one (more: not plain)
    connection: frozenset[bytes]             # tokens of Connection (lower case)
    dpop: tuple[str, ...] = ()               # every DPoP value


def parse_plain(head: bytes, *, max_headers: int, max_line: int) -> PlainRequest | None:
    """The request if ``head`` (without its final CRLFCRLF) is plain, else None."""
    if not clean(head):
        return None
    lines = head.split(b"\r\n")
    if len(lines) - 1 > max_headers or max(map(len, lines)) > max_line:
        return None
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] not in _METHODS or parts[2] != b"HTTP/1.1":
        return None
    target = parts[1]
    path, _, query = target.partition(b"?")
    text = target.decode("ascii")           # (printable ASCII: clean said so)
    if not target.startswith(b"/") or b"%" in target or b"#" in target \
            or b"access_token" in query or not valid_origin_form(text):
        return None
    headers: list[tuple[bytes, bytes, bytes]] = []
    host: bytes | None = None
    auth: bytes | None = None
    dpop: list[bytes] = []
    connection: frozenset[bytes] = frozenset()
    names = _NAMES
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        known = names.get(name)
        if known is None or not colon:
            if not colon or name in names:
                return None
            known = _name_kind(name)
            if len(names) < _MAX_NAMES and len(name) <= 64:
                names[name] = known
            if known is None:
                return None
        lower, kind = known
        value = value.strip(b" \t")
        if kind:
            if kind == _HOST_NAME:
                if host is not None:        # exactly one Host
                    return None
                host = value
            elif kind == _AUTHORIZATION:
                if auth is not None:        # at most one Authorization
                    return None
                auth = value
            elif kind == _DPOP:
                dpop.append(value)
            else:
                tokens = {t.strip().lower() for t in value.split(b",")}
                tokens.discard(b"")
                if b"upgrade" in tokens:
                    return None
                connection |= tokens
        headers.append((name, lower, value))
    if host is None or not _host_ok(host):   # framing.py refuses a bad one (400)
        return None
    return PlainRequest(parts[0].decode(), target, text, path.decode(), headers, host.decode(),
                        (auth.decode(),) if auth is not None else (), connection,
                        tuple([d.decode() for d in dpop]) if dpop else ())


@dataclass(frozen=True, slots=True)
class LaneTarget:
    """A plain-HTTP upstream as the fast lane writes to it."""

    address: tuple[str, int]
    base_path: bytes            # prefix of every forwarded target ("" for the root)
    host_header: bytes          # what aiohttp's client would send as Host


@dataclass(slots=True)
class Lane:
    """The fast lane's settings and upstream pool, built once per configuration."""

    pool: UpstreamPool
    max_headers: int
    max_line: int
    read_timeout: float
    targets: dict[int, LaneTarget]       # id(route) -> target; absent: not for the lane
    strip: frozenset[bytes]              # inbound headers never forwarded, hop-by-hop included
    excluded_paths: frozenset[str] = frozenset()   # answered by aiohttp (metadata documents)

    def serves(self, route: Route) -> bool:
        return id(route) in self.targets


class LaneGateway(Protocol):
    """What the lane needs of the current configuration generation (``gateway.Gateway``)."""

    @property
    def lane(self) -> Lane | None: ...

    @property
    def pipeline(self) -> Pipeline: ...

    def begin(self) -> None: ...

    def end(self) -> None: ...

    def upstream_failed(self, upstream: str, cause: str) -> None: ...


_T = TypeVar("_T")


@types.coroutine
def _resume(coro: Coroutine[Any, Any, _T], yielded: Any) -> Generator[Any, Any, _T]:
    """Run the rest of ``coro``, which already ran up to a suspension that yielded
    ``yielded`` (see FastLane.feed: most decisions finish without one, and then need no
    task at all)."""
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:    # (cancellation): into the coroutine
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value       # type: ignore[no-any-return]
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value       # type: ignore[no-any-return]


# --- the upstream side ----------------------------------------------------------------------


class _Relay(Protocol):
    def upstream_data(self, data: bytes) -> None: ...

    def upstream_lost(self, exc: BaseException | None) -> None: ...


class _UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to the upstream; serves one lane request at a time."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.relay: _Relay | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay.upstream_data(data)
        else:                   # an idle connection has nothing to say: not reusable
            self.close()

    @property
    def reusable(self) -> bool:
        """Open, and not closing: an answer read to its end leaves nothing else to know."""
        return not self.closed and self.transport is not None \
            and not self.transport.is_closing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.pool.forget(self)
        relay, self.relay = self.relay, None
        if relay is not None:
            relay.upstream_lost(exc)

    def close(self) -> None:
        self.relay = None
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            if self.transport is not None:
                self.transport.close()


def _live(idle: list[_UpstreamConnection] | None) -> _UpstreamConnection | None:
    """The most recently idled connection of ``idle`` still open (closed ones dropped)."""
    while idle:
        conn = idle.pop()
        if not conn.closed:
            return conn
    return None


class UpstreamPool:
    """Keep-alive connections to plain-HTTP upstreams, at most ``max_connections`` open."""

    def __init__(self, max_connections: int, connect_timeout: float) -> None:
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, int], list[_UpstreamConnection]] = {}
        self._open: set[_UpstreamConnection] = set()
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False
        self.opened = 0             # connections made, for tests and curiosity

    def take(self, key: tuple[str, int]) -> _UpstreamConnection | None:
        return _live(self._idle.get(key))

    async def connect(self, key: tuple[str, int]) -> _UpstreamConnection:
        """A new connection (waiting for a free slot at the limit); OSError/TimeoutError."""
        loop = asyncio.get_running_loop()
        while len(self._open) >= self.max_connections:
            idle = self._idle_anywhere()
            if idle is not None:
                idle.close()         # an idle connection to another upstream gives way
                continue
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            conn = self.take(key)
            if conn is not None:
                return conn
        if self._closed:
            raise OSError("upstream pool is closed")
        conn = _UpstreamConnection(self, key)
        self._open.add(conn)
        self.opened += 1
        try:
            await asyncio.wait_for(loop.create_connection(lambda: conn, *key),
                                   self.connect_timeout)
        except BaseException:
            self.forget(conn)
            raise
        return conn

    def give_back(self, conn: _UpstreamConnection) -> None:
        """Pool ``conn`` (its answer read to the end): idle, open, and reading, so that the
        next request drawing it hears its answer (reading may have been paused for a slow
        client while the last bytes were relayed)."""
        conn.relay = None
        if not conn.reusable or self._closed:
            conn.close()
            return
        transport = conn.transport
        assert transport is not None
        if not transport.is_reading():
            transport.resume_reading()
        self._idle.setdefault(conn.key, []).append(conn)
        self._wake()

    def forget(self, conn: _UpstreamConnection) -> None:
        if conn in self._open:
            self._open.discard(conn)
            idle = self._idle.get(conn.key)
            if idle and conn in idle:
                idle.remove(conn)
            self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _idle_anywhere(self) -> _UpstreamConnection | None:
        for idle in self._idle.values():
            conn = _live(idle)
            if conn is not None:
                return conn
        return None

    def close(self) -> None:
        self._closed = True
        for conn in list(self._open):
            conn.close()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)


# --- the client side ------------------------------------------------------------------------


class Host(Protocol):
    """What the lane needs from its connection (``connection._GuardedHandler``)."""

    transport: asyncio.Transport | None
    memo: ConnectionMemo                    # the connection's, shared with the aiohttp path

    def lane_data(self, data: bytes) -> None:
        """Bytes for aiohttp: the connection has left the lane."""

    def lane_request_done(self, close: bool) -> bool:
        """A response is complete; returns whether the connection must close now."""


class FastLane:
    """The lane of one client connection: one plain request at a time (see module doc)."""

    def __init__(self, host: Host, gateway_of: Callable[[], LaneGateway],
                 remote: str | None, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.host = host
        self._gateway_of = gateway_of         # the current generation, after reloads too
        self.remote = remote or ""
        self.active = True
        self._busy = False
        self._pending = b""
        self._paused = False
        # the request in flight
        self._gateway: LaneGateway | None = None
        self._decision: Allow | Refuse | None = None
        self._request: PlainRequest | None = None
        self._head = b""
        self._upstream_head = b""
        self._address: tuple[str, int] = ("", 0)
        self._conn: _UpstreamConnection | None = None
        self._retried = False
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._read_timeout = 0.0
        # the answer being relayed
        self._reply = AnswerReader("GET")
        self._head_sent = False
        self._sent_at = 0.0
        self._close_after = False
        self._drain: asyncio.Future[None] | None = None
        self._loop = loop or asyncio.get_running_loop()   # (given: no getpid per connection)
        self._heard = 0.0
        self._started = 0.0
        self._peer_of = self._peer              # (one bound method, not one per request)
        self._client_paused = False
        # The last head parsed, with its request: keep-alive clients often send the very
        # same bytes again (same target, same token), which then need no parsing; a head is
        # immutable, so equal bytes are the same request.
        # (head, lane, request, its view: the view is the connection's too, memo and peer)
        self._last: tuple[bytes, Lane, PlainRequest, RequestView] | None = None
        # ...and the upstream head made for it (same request, identity and target: same head)
        self._last_forwarded: tuple[PlainRequest, Mapping[str, str], LaneTarget,
                                    bytes] | None = None
        # identity header lines, X-Forwarded-For/Proto included, for the identity mapping
        # the pipeline gave last (it gives the same mapping while nothing changed)
        self._identity: Mapping[str, str] | None = None
        self._identity_lines = b""
        forwarded = (b"X-Forwarded-For: " + self.remote.encode() + b"\r\n"
                     b"X-Forwarded-Proto: https\r\n")
        self._forwarded = forwarded

    # --- requests in --------------------------------------------------------------------------

    def feed(self, data: bytes) -> bool:
        """Take ``data`` if it is a plain request (or arrived behind one); False: aiohttp's."""
        if not self.active:
            return False
        if self._busy:
            self._pending += data
            transport = self.host.transport
            if len(self._pending) > 65536 and not self._paused and transport is not None:
                self._paused = True
                transport.pause_reading()
            return True
        if not data.endswith(b"\r\n\r\n") or data.find(b"\r\n\r\n") != len(data) - 4:
            return self._leave()
        gateway = self._gateway_of()
        lane = gateway.lane
        if lane is None:
            return self._leave()
        last = self._last
        if last is not None and data == last[0] and lane is last[1]:
            request, view = last[2], last[3]            # the same head again
        else:
            parsed = parse_plain(data[:-4], max_headers=lane.max_headers,
                                 max_line=lane.max_line)
            if parsed is None or parsed.path in lane.excluded_paths:
                return self._leave()
            request = parsed
            # (positional: this runs for every new head) token_in_query is False: parse_plain
            # refuses targets naming access_token
            view = RequestView(request.method, request.raw_path, request.path, request.host,
                               request.authorization, request.dpop, False, "https",
                               self.remote, self.host.memo, self._peer_of)
            self._last = (data, lane, request, view)
        self._busy = True
        self._started = time.perf_counter()
        self._gateway, self._request, self._head = gateway, request, data
        self._retried = False
        gateway.begin()
        deciding = gateway.pipeline.decide(view, lane.serves)
        try:
            yielded = deciding.send(None)
        except StopIteration as done:       # decided without waiting (a cached token)
            decision: Decision | None = done.value
            if decision is None:            # a route the lane does not serve
                self._finish_request()
                return self._leave()
            self._decided(decision)
            return True
        self._task = self._loop.create_task(self._decide_later(deciding, yielded))
        return True

    def _peer(self) -> PeerCertificate | None:
        return peer_certificate(self.host.transport)

    async def _decide_later(self, deciding: Coroutine[Any, Any, Decision | None],
                            yielded: Any) -> None:
        try:
            decision = await _resume(deciding, yielded)
        finally:
            self._task = None
        if decision is None:
            self._back_to_aiohttp()
            return
        self._decided(decision)

    def _leave(self) -> bool:
        self.active = False
        return False

    def _back_to_aiohttp(self) -> bool:
        """Not for the lane after all: aiohttp answers this request, and the rest of the
        connection."""
        data = self._head + self._pending
        self._finish_request()
        self._head = self._pending = b""
        self.active = False
        self._resume_reading()
        self.host.lane_data(data)
        return True

    def _decided(self, decision: Decision) -> None:
        self._decision = decision
        if isinstance(decision, Refuse):
            self._answer(decision.refusal)
            return
        self._forward(decision)

    def _forward(self, allow: Allow) -> None:
        gateway, request = self._gateway, self._request
        assert gateway is not None and request is not None
        lane = gateway.lane
        assert lane is not None
        target = lane.targets[id(allow.route)]
        self._address = target.address
        self._read_timeout = lane.read_timeout
        last = self._last_forwarded
        if last is None or last[0] is not request or last[1] is not allow.identity \
                or last[2] is not target:
            last = self._last_forwarded = (request, allow.identity, target,
                                           self._upstream_request(request, allow, target, lane))
        self._upstream_head = last[3]
        conn = lane.pool.take(target.address)
        if conn is not None:
            self._send(conn)
        else:
            self._task = self._loop.create_task(self._connect_then_send())

    def _upstream_request(self, request: PlainRequest, allow: Allow, target: LaneTarget,
                          lane: Lane) -> bytes:
        """The head the upstream gets: hop-by-hop and stripped headers out, identity in."""
        if allow.identity is not self._identity:
            lines: list[bytes] = []
            for name, text in allow.identity.items():
                lines += (name.encode(), b": ", text.encode(), b"\r\n")
            lines.append(self._forwarded)
            self._identity, self._identity_lines = allow.identity, b"".join(lines)
        drop = lane.strip | request.connection if request.connection else lane.strip
        out = [request.method.encode(), b" ", target.base_path, request.target,
               b" HTTP/1.1\r\nHost: ", target.host_header, b"\r\n"]
        for raw, lower, value in request.headers:
            if lower not in drop:
                out += (raw, b": ", value, b"\r\n")
        # (the Host value passed parse_plain: printable ASCII, so no CR or LF)
        out += (self._identity_lines, b"X-Forwarded-Host: ", request.host.encode(),
                b"\r\n\r\n")
        return b"".join(out)

    async def _connect_then_send(self) -> None:
        gateway = self._gateway
        assert gateway is not None and gateway.lane is not None
        pool = gateway.lane.pool
        try:
            conn = await pool.connect(self._address)
        except TimeoutError:
            self._refuse(upstream_refusal("connect_timeout", timeout=True))
            return
        except OSError as exc:
            self._refuse(upstream_refusal(upstream_error(exc)))
            return
        finally:
            self._task = None
        if not self._busy:          # the client went away meanwhile
            pool.give_back(conn)
            return
        self._send(conn)

    def _send(self, conn: _UpstreamConnection) -> None:
        assert conn.transport is not None
        self._conn = conn
        conn.relay = self
        assert self._request is not None
        self._reply, self._head_sent = AnswerReader(self._request.method), False
        self._sent_at = time.perf_counter()
        conn.transport.write(self._upstream_head)
        self._heard = self._loop.time()
        if self._timer is None:     # else the one still pending from an earlier request serves
            self._timer = self._loop.call_at(self._heard + self._read_timeout, self._timed_out)

    # --- the answer back ----------------------------------------------------------------------

    def upstream_data(self, data: bytes) -> None:
        self._heard = self._loop.time()
        try:
            out = self._relay(data)
        except BadAnswer as exc:
            self._upstream_failed(upstream_refusal(f"bad_response: {exc}"))
            return
        transport = self.host.transport
        if out and transport is not None:
            transport.write(out)
        if self._reply.done and self._head_sent:
            self._complete()

    def _relay(self, data: bytes) -> bytes:
        """Client bytes for upstream ``data``.

        The head counts as sent only once the body bytes of the same read are good too: a
        broken answer in one read is refused (502) whole, as aiohttp's client refuses it,
        never half relayed and then cut."""
        answer = self._reply
        if self._head_sent:
            return answer.feed(data)
        body = answer.feed(data)
        if answer.head is None:
            return b""
        # the answer is good so far: from here on the client has a head
        request, decision, gateway = self._request, self._decision, self._gateway
        assert request is not None and isinstance(decision, Allow) and gateway is not None
        gateway.pipeline.upstream_answered(decision.route, time.perf_counter() - self._sent_at)
        self._close_after = self.host.lane_request_done(b"close" in request.connection)
        self._head_sent = True
        close = b"Connection: close\r\n\r\n" if self._close_after else b"\r\n"
        if decision.response_headers:       # the decision's own (a fresh DPoP-Nonce)
            close = b"".join(f"{k}: {v}\r\n".encode() for k, v in
                             decision.response_headers.items()) + close
        return answer.head + close + body

    def upstream_lost(self, exc: BaseException | None) -> None:
        self._conn = None
        if not self._busy:
            return
        if self._head_sent and self._reply.until_eof:
            transport = self.host.transport
            if transport is not None:
                transport.write(self._reply.eof())
            self._complete()
            return
        if not self._head_sent and not self._retried:
            # Closed or reset before a whole answer head (often a kept-alive connection the
            # upstream had just closed): once more on a new connection, as aiohttp's client
            # does for idempotent requests (RFC 9112 section 9.3.1); a plain request has no
            # body to resend.
            self._retried = True
            self._task = asyncio.get_running_loop().create_task(self._connect_then_send())
            return
        self._upstream_failed(upstream_refusal(
            upstream_error(exc) if exc is not None
            else "disconnected: the upstream closed the connection without a whole answer"))

    def _upstream_failed(self, exc: UpstreamFailed) -> None:
        if not self._head_sent:
            self._refuse(exc)
            return
        # the client has the head already: all it can be told is the close
        self._failure_cause(exc)
        self._drop_conn()
        self._finish("upstream_aborted", self._reply.status)
        transport = self.host.transport
        if transport is not None:
            transport.close()

    def _refuse(self, exc: UpstreamFailed) -> None:
        """The upstream failed before answering: the same answer as the aiohttp path."""
        self._failure_cause(exc)
        self._drop_conn()
        self._answer(exc)

    def _failure_cause(self, exc: UpstreamFailed) -> None:
        """Why the upstream failed: in the decision line, and a rate-limited WARNING."""
        gateway, decision = self._gateway, self._decision
        if gateway is None or decision is None:
            return
        cause = exc.cause or exc.reason
        decision.fields["upstream_error"] = cause
        host, port = self._address
        gateway.upstream_failed(f"http://{host}:{port}", cause)

    def _answer(self, exc: Refusal) -> None:
        """Answer with the refusal's rendering (:mod:`mtls_gateway.refusal`)."""
        gateway, request = self._gateway, self._request
        assert gateway is not None and request is not None
        close = self.host.lane_request_done(b"close" in request.connection)
        transport = self.host.transport
        if transport is not None:
            route = self._decision.route if self._decision is not None else None
            transport.write(as_bytes(gateway.pipeline.render(exc, route), close=close))
        self._finish(exc.reason, exc.status)
        self._after(close)

    def _complete(self) -> None:
        conn, self._conn = self._conn, None
        lane = self._gateway.lane if self._gateway is not None else None
        if conn is not None:
            conn.relay = None
            if self._reply.keep_alive and lane is not None:
                lane.pool.give_back(conn)
            else:
                conn.close()
        decision = self._decision
        self._finish(decision.reason if isinstance(decision, Allow) else "allowed",
                     self._reply.status)
        self._after(self._close_after)

    def _after(self, close: bool) -> None:
        transport = self.host.transport
        if close:
            self.active = False
            if transport is not None:
                transport.close()
            return
        self._resume_reading()
        if self._pending:
            data, self._pending = self._pending, b""
            if not self.feed(data):
                self.host.lane_data(data)

    def _finish(self, reason: str, status: int) -> None:
        gateway, decision, request = self._gateway, self._decision, self._request
        if gateway is not None and decision is not None:
            gateway.pipeline.record(decision, reason, status)
        elif gateway is not None and request is not None:   # gone while being decided
            gateway.pipeline.record_fields(
                {"method": request.method, "path": request.path, "remote": self.remote or None},
                reason, status, allowed=False, peer=None, started=self._started)
        self._finish_request()

    def _finish_request(self) -> None:
        gateway = self._gateway
        if gateway is not None and self._busy:
            gateway.end()
        self._busy = False
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)
        self._gateway = self._decision = self._request = None
        self._upstream_head = b""

    # --- timers, backpressure, the client going away ------------------------------------------

    # The upstream read timeout: one timer per connection, not per request. It is set when a
    # request goes upstream and none is pending; when it fires it looks at ``_heard`` (the
    # last send or upstream read) and either times the request out or waits the rest.

    def _timed_out(self) -> None:
        self._timer = None
        if self._conn is None or not self._busy:
            return                      # nothing waits on the upstream now
        if self._client_paused:
            # Not the upstream's fault: the client is not reading, and the upstream is not
            # read until it does (as on the aiohttp path, its download is not cut for that).
            self._heard = self._loop.time()
        deadline = self._heard + self._read_timeout
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._timed_out)
            return
        self._upstream_failed(upstream_refusal("read_timeout", timeout=True))

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _drop_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _resume_reading(self) -> None:
        transport = self.host.transport
        if self._paused and transport is not None:
            self._paused = False
            transport.resume_reading()

    def pause_writing(self) -> None:
        """The client reads slower than the upstream answers: stop reading the upstream
        (and stop holding the upstream to ``read_timeout`` meanwhile)."""
        self._client_paused = True
        conn = self._conn
        if conn is not None and conn.transport is not None:
            conn.transport.pause_reading()

    def resume_writing(self) -> None:
        self._client_paused = False
        self._heard = self._loop.time()         # the upstream's clock starts again
        conn = self._conn
        if conn is not None and conn.transport is not None and not conn.closed:
            conn.transport.resume_reading()

    @property
    def busy(self) -> bool:
        return self._busy

    async def drained(self) -> None:
        """Return once no request is in flight here."""
        if self._busy:
            self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    def client_lost(self) -> None:
        """The client connection closed: drop the request in flight (logged once)."""
        self.active = False
        self._disarm()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        if self._busy:
            self._drop_conn()
            self._finish("client_closed", self._reply.status if self._head_sent else 499)
