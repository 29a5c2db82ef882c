"""Request framing the gateway refuses before it looks at routes or tokens.

aiohttp already refuses the classic smuggling shapes (Content-Length together
with Transfer-Encoding, malformed lengths, duplicate or missing ``Host``, bare
LF, obsolete line folding) with 400. What it accepts but a security boundary
must not:

* request targets other than origin form (``/path?query``): the absolute form
  ``GET http://other/...``, the authority form of ``CONNECT`` and ``*``; the path
  a route sees must be the path the upstream gets, and the gateway is no
  forward proxy (``bad_target``);
* the ``CONNECT`` method, HTTP versions other than 1.0 and 1.1, and
  ``Transfer-Encoding`` in an HTTP/1.0 request (RFC 9112 section 6.1: faulty
  framing) (``bad_request``);
* a ``Content-Length`` above ``limits.max_body_size``: 413 (``body_too_large``)
  before a byte is forwarded. Chunked bodies are counted while they stream
  (:mod:`mtls_gateway.proxy`).
"""

from __future__ import annotations

from aiohttp import web

from .config import LimitsConfig
from .errors import BodyTooLarge, InvalidRequest

__all__ = ["check_framing"]


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
    length = request.content_length
    if length is not None and length > limits.max_body_size:
        raise BodyTooLarge("body_too_large", "request body is too large")
