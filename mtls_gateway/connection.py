"""What one client connection may cost: deadlines, caps, and unparseable requests.

aiohttp parses HTTP for us; this module wraps its per-connection protocol (the private
attributes it relies on are listed in aiohttp_compat.py, and tested there) so that

* a request head (request line and headers) must be complete within
  ``limits.header_timeout`` of the connection opening or of its first byte, else
  the client gets ``408`` (``header_timeout``) and the connection is closed
  (slowloris: a client dribbling one header byte at a time holds nothing for long).
  A partial head that arrived pipelined behind a request still in progress, and
  then stalls completely, is closed by ``limits.idle_timeout`` instead;
* beyond ``limits.max_connections`` concurrent connections a new one gets an
  immediate ``503`` (``too_many_connections``) with ``Connection: close``;
* after ``limits.max_requests_per_connection`` requests the response says
  ``Connection: close``;
* a request aiohttp cannot parse gets a JSON refusal with a stable reason code
  (``414``/``431`` for oversized request lines and headers, ``400`` otherwise)
  instead of aiohttp's text page, which echoes the offending bytes (possibly a
  token) and logs them with a traceback.

The limits are read from the server's current configuration for every new
connection; header size limits are fixed when the listener starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong

from .aiohttp_compat import BaseProtocol, RequestHandler, response_started, tcp_keepalive
from .config import LimitsConfig
from .decision_log import log_decision
from .fastlane import FastLane, LaneGateway
from .gateway import refusal_response
from .pipeline import ConnectionMemo
from .refusal import as_bytes, render_code

__all__ = ["GuardedAppRunner", "count_request", "parse_error_reason", "raw_refusal"]

log = logging.getLogger("mtls_gateway.connection")


def raw_refusal(status: int, reason: str) -> bytes:
    """A complete HTTP/1.1 refusal, written straight to a transport (no request object)."""
    return as_bytes(render_code(reason, status), close=True)


def parse_error_reason(exc: BaseException | None) -> tuple[int, str]:
    """Status and reason code for a request aiohttp could not parse."""
    if isinstance(exc, LineTooLong):
        # llhttp reports an over-long request target as a bytearray, header lines as bytes
        if exc.args and isinstance(exc.args[0], bytearray):
            return 414, "request_line_too_long"
        return 431, "headers_too_large"
    if isinstance(exc, BadHttpMessage) and "too many headers" in str(exc).lower():
        return 431, "headers_too_large"
    return 400, "bad_request"


#: Told about every refusal made here (reason, status): the server counts them in its metrics.
OnRefusal = Callable[[str, int], None]
#: The server's current Gateway (after reloads too), for the fast lane; None: no lane.
GatewayOf = Callable[[], LaneGateway] | None


def _deny(reason: str, status: int, transport: asyncio.BaseTransport | None,
          on_refusal: OnRefusal | None) -> None:
    peer = transport.get_extra_info("peername") if transport is not None else None
    log_decision(decision="deny", reason=reason, status=status,
                 remote=peer[0] if isinstance(peer, tuple) else None)
    if on_refusal is not None:
        on_refusal(reason, status)


class _GuardedHandler(RequestHandler):
    """aiohttp's connection protocol plus the deadlines and caps described above."""

    def __init__(self, manager: web.Server, *, limits: Callable[[], LimitsConfig],
                 on_refusal: OnRefusal | None = None, gateway_of: GatewayOf = None,
                 **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._on_refusal = on_refusal
        self._gateway_of = gateway_of
        self._head_timer: asyncio.TimerHandle | None = None
        self._lane: FastLane | None = None
        self.served = 0
        #: The connection's last credential, for the pipeline (both paths share it).
        self.memo = ConnectionMemo()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._gateway_of is None:
            super().connection_made(transport)
        else:
            self._lane_connection_made(transport)
        limits = self._limits()
        assert self._manager is not None
        if len(self._manager.connections) > limits.max_connections:
            self._refuse(503, "too_many_connections")
            return
        if self._gateway_of is not None:
            peer = transport.get_extra_info("peername")
            self._lane = FastLane(self, self._gateway_of,
                                  peer[0] if isinstance(peer, tuple) else None, self._loop)
        self._arm()

    def _lane_connection_made(self, transport: asyncio.BaseTransport) -> None:
        """aiohttp's ``RequestHandler.connection_made`` but for its request task, which is
        made only when aiohttp gets the connection's first bytes (:meth:`_parse`): a
        connection whose requests all take the lane (most, and every one-request connection
        of a client that connects per call) never needs it, and it cost a task and its steps
        per connection."""
        BaseProtocol.connection_made(self, transport)
        if self._tcp_keepalive:
            tcp_keepalive(cast(asyncio.Transport, transport))
        assert self._manager is not None
        self._manager.connection_made(self, cast(asyncio.Transport, transport))
        if self._keepalive_timeout > 0:   # no request at all is a dead connection too
            self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
            self._keepalive_handle = self._loop.call_at(self._next_keepalive_close_time,
                                                        self._process_keepalive)

    def _start_aiohttp(self) -> None:
        """aiohttp's request task, for the bytes it is about to get (see above)."""
        if self._task_handler is None and not self._force_close:
            self._task_handler = self._loop.create_task(self.start())

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        lane, self._lane = self._lane, None
        if lane is not None:
            lane.client_lost()
        super().connection_lost(exc)

    # --- the fast lane (fastlane.py) ------------------------------------------------------------

    def lane_data(self, data: bytes) -> None:
        self._parse(data)

    def lane_request_done(self, close: bool) -> bool:
        """Count a lane response like :func:`count_request`; True: close after it."""
        self.served += 1
        close = (close or self._force_close
                 or self.served >= self._limits().max_requests_per_connection)
        self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
        return close

    def _process_keepalive(self) -> None:
        lane = self._lane
        if lane is not None and lane.busy:     # not idle: a lane request is in flight
            self._keepalive_handle = self._loop.call_at(
                self._loop.time() + self._keepalive_timeout, self._process_keepalive)
            return
        if self._task_handler is None and self._gateway_of is not None:
            # only the lane has served here (no aiohttp task, whose idle wait aiohttp's
            # check looks for): idle since the last answer, closed as aiohttp would
            self._keepalive_handle = None
            if self._force_close or not self._keepalive:
                return
            close_time = self._next_keepalive_close_time
            if self._loop.time() < close_time:
                self._keepalive_handle = self._loop.call_at(close_time, self._process_keepalive)
                return
            self.force_close()
            return
        super()._process_keepalive()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._lane is not None:
            self._lane.pause_writing()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._lane is not None:
            self._lane.resume_writing()

    async def shutdown(self, timeout: float | None = 15.0) -> None:  # noqa: ASYNC109 (aiohttp's)
        lane = self._lane
        if lane is not None:
            lane.active = False          # nothing new in the lane; the one in flight finishes
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lane.drained(), timeout)
        await super().shutdown(timeout)

    def data_received(self, data: bytes) -> None:
        lane = self._lane
        if lane is not None and lane.active and not self._force_close and not self._close:
            try:
                taken = lane.feed(data)
            except Exception:   # a bug must fail closed: the connection, not the process
                log.exception("internal error in the fast lane")
                lane.active = False
                if self.transport is not None:
                    self.transport.close()
                return
            if taken:
                self._disarm()          # a complete head, taken by the lane
                return
        self._parse(data)

    def _parse(self, data: bytes) -> None:
        self._start_aiohttp()
        heads_before = self._request_count
        super().data_received(data)
        if self._request_count != heads_before:
            self._disarm()          # a head is complete (or unparseable: answered anyway)
        elif data and self._head_timer is None and not self._request_in_progress \
                and not self._messages:
            self._arm()             # the first bytes of a new request head

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self._loop.call_later(self._limits().header_timeout,
                                                 self._head_too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._request_in_progress or self._messages or (
                self._lane is not None and self._lane.busy):
            return
        self._refuse(408, "header_timeout")

    def _refuse(self, status: int, reason: str) -> None:
        transport = self.transport
        _deny(reason, status, transport, self._on_refusal)
        if transport is not None and not transport.is_closing():
            transport.write(raw_refusal(status, reason))
        self.force_close()

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """A JSON refusal with a reason code; never the offending bytes, never a traceback."""
        if response_started(request):
            raise ConnectionError("response already started")
        if isinstance(exc, HttpProcessingError) or status == 400:
            status, reason = parse_error_reason(exc)
        else:
            log.error("internal error on a connection: %s", type(exc).__name__)
            status, reason = 500, "internal_error"
        _deny(reason, status, self.transport, self._on_refusal)
        response = refusal_response(render_code(reason, status))
        response.force_close()
        return response


class _GuardedServer(web.Server):
    def __init__(self, *args: Any, limits: Callable[[], LimitsConfig],
                 on_refusal: OnRefusal | None, gateway_of: GatewayOf, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits_of = limits
        self._on_refusal = on_refusal
        self._gateway_of = gateway_of

    def __call__(self) -> RequestHandler:
        return _GuardedHandler(self, loop=self._loop, limits=self._limits_of,
                               on_refusal=self._on_refusal, gateway_of=self._gateway_of,
                               **self._kwargs)


class GuardedAppRunner(web.AppRunner):
    """An :class:`aiohttp.web.AppRunner` whose connections use :class:`_GuardedHandler`.

    ``limits`` is called for each new connection, so a reload applies to new connections.
    ``gateway_of`` gives the current Gateway to the fast lane (None: no lane).
    """

    def __init__(self, app: web.Application, *, limits: Callable[[], LimitsConfig],
                 on_refusal: OnRefusal | None = None, gateway_of: GatewayOf = None,
                 **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._limits_of = limits
        self._on_refusal = on_refusal
        self._gateway_of = gateway_of

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return _GuardedServer(plain.request_handler, request_factory=plain.request_factory,
                              handler_cancellation=plain.handler_cancellation,
                              loop=plain._loop, limits=self._limits_of,
                              on_refusal=self._on_refusal, gateway_of=self._gateway_of,
                              **plain._kwargs)


def count_request(request: web.Request, response: web.StreamResponse,
                  max_requests: int) -> None:
    """Before a response goes out: close the connection once it has served enough."""
    protocol = request.protocol
    if isinstance(protocol, _GuardedHandler):
        protocol.served += 1
        if protocol.served >= max_requests:
            response.force_close()          # (headers are computed already: say it too)
            response.headers["Connection"] = "close"

