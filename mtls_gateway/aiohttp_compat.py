"""Everything the gateway relies on in aiohttp that aiohttp does not promise.

aiohttp is pinned to one minor version (pyproject.toml); an upgrade must pass
tests/test_aiohttp_compat.py, which checks every name listed here on live objects and fails
loudly, naming the name, when one is gone. Nothing else in the package reaches into
aiohttp's private parts except through this module or the names in
:data:`REQUEST_HANDLER_INTERNALS` (used by connection.py, which subclasses the server's
connection protocol).
"""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
from aiohttp.client_exceptions import ClientPayloadError
from aiohttp.web_protocol import RequestHandler

__all__ = [
    "REQUEST_HANDLER_INTERNALS",
    "SERVER_INTERNALS",
    "RequestHandler",
    "fail_body_on_connection_loss",
]

#: Private attributes and methods of ``aiohttp.web_protocol.RequestHandler`` that
#: connection.py reads, sets or overrides (per-connection deadlines, the fast lane).
REQUEST_HANDLER_INTERNALS = (
    "_force_close", "_close", "_request_count", "_request_in_progress", "_messages",
    "_keepalive_handle", "_next_keepalive_close_time", "_keepalive_timeout", "_loop",
    "_manager", "_process_keepalive",
)
#: Private attributes of ``aiohttp.web.Server`` that connection.py copies into its own.
SERVER_INTERNALS = ("_kwargs", "_loop")


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
