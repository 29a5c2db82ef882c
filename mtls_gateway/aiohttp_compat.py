"""Everything the gateway relies on in aiohttp that aiohttp does not promise.

aiohttp is pinned to one minor version (pyproject.toml); an upgrade must pass
tests/test_aiohttp_compat.py, which checks every name listed here on live objects and fails
loudly, naming the name, when one is gone or behaves differently. Nothing else in the
package reaches into aiohttp's private parts except through this module, or through the
names listed here (connection.py subclasses the server's connection protocol, its server
and its app runner, and so uses their private attributes by name).
"""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
from aiohttp import HttpVersion11, web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.client_exceptions import ClientPayloadError
from aiohttp.tcp_helpers import tcp_keepalive
from aiohttp.web_protocol import RequestHandler

__all__ = [
    "REQUEST_HANDLER_INTERNALS",
    "RUNNER_INTERNALS",
    "SERVER_INTERNALS",
    "BaseProtocol",
    "RequestHandler",
    "answer_in_http11",
    "fail_body_on_connection_loss",
    "response_started",
    "tcp_keepalive",
]

#: Private attributes and methods of ``aiohttp.web_protocol.RequestHandler`` (itself not in
#: aiohttp's public API) that connection.py reads, sets or overrides: per-connection
#: deadlines and caps, the fast lane's hand-over.
REQUEST_HANDLER_INTERNALS = (
    "_close", "_force_close", "_keepalive", "_keepalive_handle", "_keepalive_timeout", "_loop",
    "_manager", "_messages", "_next_keepalive_close_time", "_process_keepalive",
    "_request_count", "_request_in_progress", "_task_handler", "_tcp_keepalive", "start",
)
#: Attributes of ``aiohttp.web.Server`` that connection.py copies into its own server.
SERVER_INTERNALS = ("_kwargs", "_loop", "handler_cancellation", "request_factory",
                    "request_handler")
#: ``aiohttp.web.AppRunner`` methods connection.py overrides.
RUNNER_INTERNALS = ("_make_server",)


def answer_in_http11(request: web.BaseRequest) -> None:
    """Make aiohttp answer ``request`` as HTTP/1.1 (it answers in the request's version,
    which for a refused "HTTP/2.0" request would say "HTTP/2.0 400"): its ``version`` is a
    reified property, cached in ``_cache``."""
    request._cache["version"] = HttpVersion11


def response_started(request: web.BaseRequest) -> bool:
    """Whether any byte of the response has been written (too late for another answer)."""
    return request.writer.output_size > 0


def fail_body_on_connection_loss(response: aiohttp.ClientResponse) -> Callable[[], None]:
    """Make reading ``response``'s body fail when its connection is lost first.

    aiohttp 3.14's client never wakes a body reader when the answer's framing breaks in a
    later read than the head (the parser error closes the connection but reaches only the
    protocol, and the read timeout is dropped): the read waits forever. Returns the undo,
    to call once the body is read (the connection may go back to the pool).
    """
    connection = response.connection
    closed = connection.protocol.closed if connection is not None \
        and connection.protocol is not None else None
    if closed is None:
        return _nothing
    content = response.content

    def lost(_: object) -> None:
        if not content.is_eof() and content.exception() is None:
            content.set_exception(ClientPayloadError("upstream connection lost mid-body"))

    closed.add_done_callback(lost)

    def undo() -> None:
        closed.remove_done_callback(lost)

    return undo


def _nothing() -> None:
    return None
