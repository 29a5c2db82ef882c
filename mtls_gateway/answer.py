"""An upstream's HTTP/1.1 answer, read as it arrives and re-framed for the client.

Pure (no I/O, no event loop): the fast lane feeds it what its upstream connection reads
(:mod:`mtls_gateway.fastlane`), and tests/test_fuzz.py feeds it the same bytes as
aiohttp's client parser (llhttp), the reference path's, to show that whatever it accepts,
aiohttp reads the same way (status, fields, body). It accepts less than aiohttp: what it
refuses (:class:`BadAnswer`) is answered 502 while nothing has reached the client, or cut.

The client gets HTTP/1.1 with hop-by-hop fields (and those named in ``Connection``)
removed; a chunked body is re-chunked (extensions and trailers dropped, as aiohttp does),
a body delimited by the upstream closing is chunked. Limits are aiohttp's client
defaults: header fields (name and value) and the reason phrase up to 8190 bytes, at most
128 fields.
"""

from __future__ import annotations

import re
import time

from aiohttp.http import SERVER_SOFTWARE

__all__ = ["HOP_BY_HOP_BYTES", "SERVER", "AnswerReader", "BadAnswer", "clean", "http_date"]

#: Hop-by-hop fields (RFC 9110 section 7.6.1), never relayed (proxy.HOP_BY_HOP: as text).
HOP_BY_HOP_BYTES = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"proxy-connection",
})
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: The bytes a head may hold (CR and LF only as CRLF: see clean).
_ALLOWED = bytes(range(0x20, 0x7f)) + b"\t\r\n"
_MAX_FIELD = 8190
_MAX_FIELDS = 128
_MAX_HEAD = (_MAX_FIELDS + 1) * (_MAX_FIELD + 4)
#: The Server value of every answer the gateway writes itself (as aiohttp writes it).
SERVER = SERVER_SOFTWARE.encode()

_NONE, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_EOF = range(7)


def clean(head: bytes) -> bool:
    """Printable ASCII and HTAB only, lines ended by CRLF (no bare CR, no bare LF)."""
    if head.translate(None, _ALLOWED):
        return False
    pairs = head.count(b"\r\n")
    return head.count(b"\r") == pairs and head.count(b"\n") == pairs


_date: tuple[int, bytes] = (0, b"")


def http_date() -> bytes:
    """The Date header value, made once per second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode())
    return _date[1]


class BadAnswer(Exception):
    """The upstream's answer is not HTTP/1.1 we can relay safely."""


class AnswerReader:
    """One answer to one request (``method``: a HEAD answer has no body)."""

    __slots__ = ("_buf", "_left", "_method", "_state", "done", "head", "keep_alive", "status")

    def __init__(self, method: str) -> None:
        self._method = method
        self._buf = b""
        self._state = _NONE
        self._left = 0
        #: The client's head once the answer's is complete, without ``Connection`` and the
        #: final CRLF (the transport adds them); None before.
        self.head: bytes | None = None
        self.status = 0
        #: The upstream connection may serve another request once this answer is done.
        self.keep_alive = True
        self.done = False

    @property
    def until_eof(self) -> bool:
        """The body ends when the upstream closes (see :meth:`eof`)."""
        return self._state == _UNTIL_EOF

    def feed(self, data: bytes) -> bytes:
        """Body bytes for the client, re-framed, from upstream ``data``; raises BadAnswer.
        :attr:`head` is set by the call that completes the answer's head, :attr:`done` by
        the one that completes the answer."""
        if self.head is not None:
            return self._body(data)
        self._buf += data
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > _MAX_HEAD:
                    raise BadAnswer("response head too large")
                return b""
            head, self._buf = self._buf[:end], self._buf[end + 4:]
            out = self._head(head)
            if out is not None:
                break
        rest, self._buf = self._buf, b""
        self.head = out
        if self._state == _NONE:
            self.done = True
        return self._body(rest) if rest else b""

    def eof(self) -> bytes:
        """The upstream closed: the client's last bytes, or BadAnswer if incomplete."""
        if self._state == _UNTIL_EOF:
            self._state, self.done = _NONE, True
            return b"0\r\n\r\n"
        if not self.done:
            raise BadAnswer("the upstream closed before the answer was complete")
        return b""

    def _head(self, head: bytes) -> bytes | None:
        """The client's head for the upstream's, None for an interim (1xx) answer."""
        if not clean(head):
            raise BadAnswer("bad bytes in the response head")
        lines = head.split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        code, _, reason = rest.partition(b" ")
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
            raise BadAnswer("bad status line")
        if len(reason) > _MAX_FIELD or len(lines) - 1 > _MAX_FIELDS:
            raise BadAnswer("response head too large")
        status = int(code)
        if status < 200:
            if status == 101:
                raise BadAnswer("protocol switch without an upgrade request")
            return None
        length: int | None = None
        chunked = False
        keep = version == b"HTTP/1.1"
        named: set[bytes] = set()
        headers: list[tuple[bytes, bytes, bytes]] = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.fullmatch(name):
                raise BadAnswer("bad header line")
            lower, value = name.lower(), value.strip(b" \t")
            if len(name) + len(value) > _MAX_FIELD:
                raise BadAnswer("response header too large")
            if lower == b"content-length":
                if not value.isdigit() or len(value) > 18 or (
                        length is not None and int(value) != length):
                    raise BadAnswer("bad Content-Length")
                length = int(value)
            elif lower == b"transfer-encoding":
                if chunked or value.lower() != b"chunked":
                    raise BadAnswer("unsupported Transfer-Encoding")
                chunked = True
            elif lower == b"connection":
                tokens = {t.strip().lower() for t in value.split(b",")}
                named |= tokens
                if b"close" in tokens:
                    keep = False
                elif b"keep-alive" in tokens:
                    keep = True
            headers.append((name, lower, value))
        if chunked and length is not None:
            raise BadAnswer("both Content-Length and Transfer-Encoding")
        self.status = status
        self.keep_alive = keep
        no_body = self._method == "HEAD" or status in (204, 304)
        client_chunked = False
        if no_body:
            self._state = _NONE
        elif chunked:
            self._state = _CHUNK_SIZE
        elif length is not None:
            self._state, self._left = (_LENGTH, length) if length else (_NONE, 0)
        else:                       # delimited by the upstream closing: chunked to the client
            self._state, client_chunked, self.keep_alive = _UNTIL_EOF, True, False
        drop = HOP_BY_HOP_BYTES | named if named else HOP_BY_HOP_BYTES
        out = [b"HTTP/1.1 ", code, b" ", reason, b"\r\n"]
        seen_date = seen_server = False
        for name, lower, value in headers:
            if lower in drop:
                continue
            seen_date = seen_date or lower == b"date"
            seen_server = seen_server or lower == b"server"
            out += (name, b": ", value, b"\r\n")
        if not seen_date:
            out += (b"Date: ", http_date(), b"\r\n")
        if not seen_server:
            out += (b"Server: ", SERVER, b"\r\n")
        if (chunked or client_chunked) and not no_body:
            out.append(b"Transfer-Encoding: chunked\r\n")
        return b"".join(out)

    def _body(self, data: bytes) -> bytes:
        state = self._state
        if state == _LENGTH:
            if len(data) < self._left:
                self._left -= len(data)
                return data
            if len(data) > self._left:
                raise BadAnswer("more bytes than Content-Length")
            self._state, self.done = _NONE, True
            return data
        if state == _UNTIL_EOF:
            return b"%x\r\n%b\r\n" % (len(data), data) if data else b""
        if state == _NONE:
            if data:
                raise BadAnswer("bytes after the end of the answer")
            return b""
        return self._chunks(data)

    def _chunks(self, data: bytes) -> bytes:
        """Re-frame a chunked body (extensions and trailers dropped, as aiohttp does)."""
        out: list[bytes] = []
        buf = self._buf + data
        self._buf = b""
        while buf:
            state = self._state
            if state == _CHUNK_DATA:
                take = buf[:self._left]
                out.append(take)
                buf = buf[len(take):]
                self._left -= len(take)
                if self._left == 0:
                    self._state = _CHUNK_END
                continue
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > 4096:
                    raise BadAnswer("chunk line too long")
                self._buf = buf
                break
            line, buf = buf[:end], buf[end + 2:]
            if state == _CHUNK_END:
                if line:
                    raise BadAnswer("chunk not followed by CRLF")
                out.append(b"\r\n")
                self._state = _CHUNK_SIZE
            elif state == _CHUNK_SIZE:
                size = line.split(b";", 1)[0].strip(b" \t")
                if not size or len(size) > 16 or size.strip(b"0123456789abcdefABCDEF"):
                    raise BadAnswer("bad chunk size")
                self._left = int(size, 16)
                if self._left:
                    out.append(b"%x\r\n" % self._left)
                    self._state = _CHUNK_DATA
                else:
                    self._state = _TRAILERS
            elif state == _TRAILERS:
                if not line:
                    out.append(b"0\r\n\r\n")
                    self._state, self.done = _NONE, True
                    if buf:
                        raise BadAnswer("bytes after the end of the answer")
            else:
                raise BadAnswer("bytes after the end of the answer")
        return b"".join(out)
