"""Request framing the gateway refuses before it looks at routes or tokens.

aiohttp already refuses the classic smuggling shapes (Content-Length together
with Transfer-Encoding, malformed lengths, duplicate or missing ``Host``, bare
LF, obsolete line folding) with 400. What it accepts but a security boundary
must not:

* request targets other than origin form (``/path?query``, RFC 9112 section 3.2.1,
  RFC 3986 section 3.3/3.4 characters only, ``%`` followed by two hex digits): the
  absolute form ``GET http://other/...``, the authority form of ``CONNECT``, ``*``, a
  ``#`` fragment (which aiohttp would silently cut off, forwarding a shorter request),
  and bytes such as ``{ } | " < > ^ [ ]``, backquote or backslash; the path a route
  sees must be the path the upstream gets, and the gateway is no forward proxy
  (``bad_target``);
* a ``Host`` that is not ``host[:port]`` (RFC 9112 section 3.2, RFC 3986 section 3.2.2):
  userinfo (``a@b``), lists (``a,b``), spaces, paths, or other bytes; it would be copied
  into ``X-Forwarded-Host`` (``bad_request``). Stricter than RFC 3986's reg-name: letters,
  digits and ``-._~`` only (no sub-delims or percent-encoding, which no real host name
  needs), an IPv6 literal in brackets, and a port of 1 to 5 digits up to 65535. An empty
  value (a request without authority) is allowed.
  :func:`valid_origin_form` and :func:`valid_host` are pure: the fast lane uses them too;
* the ``CONNECT`` method, HTTP versions other than 1.0 and 1.1, and
  ``Transfer-Encoding`` in an HTTP/1.0 request (RFC 9112 section 6.1: faulty
  framing) (``bad_request``);
* a ``Content-Length`` above ``limits.max_body_size``: 413 (``body_too_large``)
  before a byte is forwarded. Chunked bodies are counted while they stream
  (:mod:`mtls_gateway.proxy`).
"""

from __future__ import annotations

import ipaddress
import re

from aiohttp import web

from .config import LimitsConfig
from .errors import BodyTooLarge, InvalidRequest

__all__ = ["check_framing", "valid_host", "valid_origin_form"]

_PCHAR = r"A-Za-z0-9\-._~!$&'()*+,;=:@"
_ORIGIN_FORM = re.compile(rf"/(?:[{_PCHAR}/]|%[0-9A-Fa-f]{{2}})*"
                          rf"(?:\?(?:[{_PCHAR}/?]|%[0-9A-Fa-f]{{2}})*)?")
_HOST = re.compile(r"(?:(\[[0-9A-Fa-f:.]+\])|([A-Za-z0-9\-._~]*))(?::([0-9]{1,5}))?")


def valid_origin_form(target: str) -> bool:
    """Is ``target`` exactly ``absolute-path [ "?" query ]`` (RFC 9112 section 3.2.1)?"""
    return _ORIGIN_FORM.fullmatch(target) is not None


def valid_host(value: str) -> bool:
    """Is a ``Host`` value ``host[:port]`` (see the module docstring for how strictly)?"""
    match = _HOST.fullmatch(value)
    if match is None:
        return False
    literal, _name, port = match.groups()
    if port is not None and int(port) > 65535:
        return False
    if literal is not None:
        try:
            ipaddress.IPv6Address(literal[1:-1])
        except ValueError:
            return False
    return True


def check_framing(request: web.BaseRequest, limits: LimitsConfig) -> None:
    """Raise a :class:`~mtls_gateway.errors.Refusal` for a request the gateway will not pass."""
    if request.version not in ((1, 0), (1, 1)):
        raise InvalidRequest("bad_request", "unsupported HTTP version")
    if request.version == (1, 0) and "Transfer-Encoding" in request.headers:
        raise InvalidRequest("bad_request", "Transfer-Encoding in an HTTP/1.0 request")
    if request.method == "CONNECT":
        raise InvalidRequest("bad_request", "CONNECT is not supported")
    if not request.raw_path.startswith("/"):
        raise InvalidRequest("bad_target", "request target must be a path")
    if not valid_origin_form(request.raw_path):   # the target as sent, fragment included
        raise InvalidRequest("bad_target", "request target is not a valid origin-form path")
    if not all(valid_host(h) for h in request.headers.getall("Host", ())):
        raise InvalidRequest("bad_request", "Host is not a valid host[:port]")
    length = request.content_length
    if length is not None and length > limits.max_body_size:
        raise BodyTooLarge("body_too_large", "request body is too large")
