"""Connection-level refusals: status and reason codes for what aiohttp cannot parse."""

from __future__ import annotations

import json

import pytest
from aiohttp.http_exceptions import BadHttpMessage, BadStatusLine, LineTooLong

from mtls_gateway.connection import parse_error_reason, raw_refusal


@pytest.mark.parametrize(("exc", "expected"), [
    (LineTooLong(bytearray(b"/aaaa..."), 8190), (414, "request_line_too_long")),
    (LineTooLong(b"Bearer AAAA...", 16384), (431, "headers_too_large")),
    (BadHttpMessage("Too many headers received"), (431, "headers_too_large")),
    (BadHttpMessage("Transfer-Encoding can't be present with Content-Length"),
     (400, "bad_request")),
    (BadStatusLine("GARBAGE"), (400, "bad_request")),
    (None, (400, "bad_request")),
])
def test_parse_error_reasons(exc: BaseException | None, expected: tuple[int, str]) -> None:
    assert parse_error_reason(exc) == expected


@pytest.mark.parametrize(("status", "reason"), [
    (408, "header_timeout"), (503, "too_many_connections")])
def test_raw_refusal_is_a_complete_closing_response(status: int, reason: str) -> None:
    raw = raw_refusal(status, reason)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].startswith(f"HTTP/1.1 {status} ")
    assert "Connection: close" in lines
    assert f"Content-Length: {len(body)}" in lines
    assert json.loads(body)["reason"] == reason
