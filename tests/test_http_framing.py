"""HTTP/1.1 framing through the gateway, byte for byte over real mutual TLS.

Request smuggling shapes (RFC 9112 section 6.3, PortSwigger's and http-garden's
catalogues), odd request lines and targets, header injection characters, chunk
extensions and trailers, Upgrade and CONNECT, pipelining, oversized heads, and
compressed bodies. Each case asserts the status codes the client read AND what the
upstream received (usually nothing).
"""

from __future__ import annotations

import gzip
import json
import logging
from typing import Any

import pytest

from gwtest import (
    Issuer,
    Pki,
    RawUpstream,
    RunningGateway,
    Upstream,
    base_config,
    raw_exchange,
    statuses,
)


@pytest.fixture(params=[True, False], ids=["lane", "aiohttp"])
def fast_lane(request: pytest.FixtureRequest) -> bool:
    """Every gateway here runs with the fast lane on and off (gwtest.fast_lane)."""
    value: bool = request.param
    return value

H = b"Host: gw.test\r\n"
CLOSE = b"Connection: close\r\n"


def _req(line: bytes, *headers: bytes, body: bytes = b"") -> bytes:
    return line + b"\r\n" + H + b"".join(h + b"\r\n" for h in headers) + CLOSE + b"\r\n" + body


# (request bytes, status) on the public route: framing alone decides, no token involved.
REFUSED: dict[str, tuple[bytes, int]] = {
    "cl_and_te": (_req(b"POST /public/x HTTP/1.1", b"Content-Length: 5",
                       b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"), 400),
    "te_and_cl": (_req(b"POST /public/x HTTP/1.1", b"Transfer-Encoding: chunked",
                       b"Content-Length: 5", body=b"0\r\n\r\n"), 400),
    "te_chunked_not_last": (_req(b"POST /public/x HTTP/1.1",
                                 b"Transfer-Encoding: chunked, identity",
                                 body=b"0\r\n\r\n"), 400),
    "te_xchunked": (_req(b"POST /public/x HTTP/1.1", b"Transfer-Encoding: xchunked",
                         body=b"0\r\n\r\n"), 400),
    "te_vertical_tab": (_req(b"POST /public/x HTTP/1.1", b"Transfer-Encoding:\x0bchunked",
                             body=b"0\r\n\r\n"), 400),
    "te_space_before_colon": (_req(b"POST /public/x HTTP/1.1", b"Transfer-Encoding : chunked",
                                   body=b"0\r\n\r\n"), 400),
    "te_on_http10": (b"POST /public/x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                     400),
    "cl_two_values": (_req(b"POST /public/x HTTP/1.1", b"Content-Length: 3",
                           b"Content-Length: 4", body=b"abcd"), 400),
    "cl_list": (_req(b"POST /public/x HTTP/1.1", b"Content-Length: 3, 3", body=b"abc"), 400),
    "cl_negative": (_req(b"POST /public/x HTTP/1.1", b"Content-Length: -1"), 400),
    "cl_plus": (_req(b"POST /public/x HTTP/1.1", b"Content-Length: +3", body=b"abc"), 400),
    "cl_hex": (_req(b"POST /public/x HTTP/1.1", b"Content-Length: 0x3", body=b"abc"), 400),
    "cl_inner_space": (_req(b"POST /public/x HTTP/1.1", b"Content-Length: 1 2"), 400),
    "cl_huge": (_req(b"POST /public/x HTTP/1.1",
                     b"Content-Length: 99999999999999999999999999"), 400),
    "chunk_size_overflow": (_req(b"POST /public/x HTTP/1.1", b"Transfer-Encoding: chunked",
                                 body=b"FFFFFFFFFFFFFFFFFFFF\r\nabc\r\n0\r\n\r\n"), 400),
    "chunk_size_not_hex": (_req(b"POST /public/x HTTP/1.1", b"Transfer-Encoding: chunked",
                                body=b"zz\r\nabc\r\n0\r\n\r\n"), 400),
    "obs_fold": (_req(b"GET /public/x HTTP/1.1", b"X-Folded: a", b" b"), 400),
    "bare_lf": (b"GET /public/x HTTP/1.1\nHost: gw.test\nConnection: close\n\n", 400),
    "header_nul": (_req(b"GET /public/x HTTP/1.1", b"X-A: a\x00b"), 400),
    "header_bare_cr": (_req(b"GET /public/x HTTP/1.1", b"X-A: a\rX-Auth-Subject: admin"), 400),
    "header_name_space": (_req(b"GET /public/x HTTP/1.1", b"X A: b"), 400),
    "header_name_empty": (_req(b"GET /public/x HTTP/1.1", b": b"), 400),
    "header_name_utf8": (_req(b"GET /public/x HTTP/1.1", "X-\u00e4: b".encode()), 400),
    "method_lowercase": (_req(b"get /public/x HTTP/1.1"), 400),
    "method_unknown": (_req(b"FOO /public/x HTTP/1.1"), 400),
    "method_connect": (_req(b"CONNECT gw.test:443 HTTP/1.1"), 400),
    "request_line_tab": (_req(b"GET\t/public/x HTTP/1.1"), 400),
    "http_09": (b"GET /public/x\r\n\r\n", 400),
    "http_12": (_req(b"GET /public/x HTTP/1.2"), 400),
    "http_20": (_req(b"GET /public/x HTTP/2.0"), 400),
    "http_version_garbage": (_req(b"GET /public/x HTTP/x.y"), 400),
    "absolute_form_http": (_req(b"GET http://evil.test/public/x HTTP/1.1"), 400),
    "absolute_form_https": (_req(b"GET https://gw.test/public/x HTTP/1.1"), 400),
    "asterisk_form": (_req(b"OPTIONS * HTTP/1.1"), 400),
    "authority_form_get": (_req(b"GET gw.test:443 HTTP/1.1"), 400),
    "missing_host": (b"GET /public/x HTTP/1.1\r\nConnection: close\r\n\r\n", 400),
    "duplicate_host": (_req(b"GET /public/x HTTP/1.1", b"Host: evil.test"), 400),
    "target_with_space": (_req(b"GET /public/a b HTTP/1.1"), 400),
    "target_with_fragment_nul": (_req(b"GET /public/x%00 HTTP/1.1"), 400),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
async def test_malformed_framing_is_refused_and_nothing_forwarded(
        gateway: RunningGateway, upstream: Upstream, case: str) -> None:
    data, status = REFUSED[case]
    out = await raw_exchange(gateway, data)
    assert statuses(out)[:1] == [status], out[:300]
    assert b"Traceback" not in out
    body = out.split(b"\r\n\r\n", 1)[1]
    assert json.loads(body)["error"]   # our JSON refusal, not a library's text page
    assert upstream.seen == []


async def test_oversized_header_is_431_without_echo_or_traceback(
        gateway: RunningGateway, upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = b"S3CRETTOKEN" * 2000
    out = await raw_exchange(gateway, _req(b"GET /x HTTP/1.1", b"Authorization: Bearer " + secret))
    assert statuses(out) == [431]
    assert json.loads(out.split(b"\r\n\r\n", 1)[1])["reason"] == "headers_too_large"
    assert b"S3CRET" not in out
    assert "S3CRET" not in caplog.text and "Traceback" not in caplog.text
    assert upstream.seen == []


@pytest.mark.parametrize(("data", "status", "reason"), [
    (_req(b"GET /" + b"a" * 20_000 + b" HTTP/1.1"), 414, "request_line_too_long"),
    (_req(b"GET /public/x HTTP/1.1", b"X-Big: " + b"v" * 20_000), 431, "headers_too_large"),
    (_req(b"GET /public/x HTTP/1.1", b"X-" + b"n" * 20_000 + b": v"), 431, "headers_too_large"),
    (_req(b"GET /public/x HTTP/1.1", *[b"X-H%d: v" % i for i in range(150)]), 431,
     "headers_too_large"),
])
async def test_oversized_heads(gateway: RunningGateway, upstream: Upstream, data: bytes,
                               status: int, reason: str) -> None:
    out = await raw_exchange(gateway, data)
    assert statuses(out) == [status]
    assert json.loads(out.split(b"\r\n\r\n", 1)[1])["reason"] == reason
    assert upstream.seen == []


async def test_header_limits_are_configurable(make_gateway: Any, pki: Pki, issuer: Issuer,
                                              upstream: Upstream) -> None:
    config = base_config(pki, issuer, upstream)
    config["limits"] = {"max_header_size": 2048, "max_headers": 10}
    gw = await make_gateway(config)
    out = await raw_exchange(gw, _req(b"GET /public/x HTTP/1.1", b"X-Big: " + b"v" * 3000))
    assert statuses(out) == [431]
    out = await raw_exchange(gw, _req(b"GET /public/x HTTP/1.1",
                                      *[b"X-H%d: v" % i for i in range(12)]))
    assert statuses(out) == [431]
    out = await raw_exchange(gw, _req(b"GET /public/x HTTP/1.1", b"X-Ok: " + b"v" * 1500))
    assert statuses(out) == [200]
    assert len(upstream.seen) == 1


async def test_chunk_extensions_are_dropped_and_trailers_never_become_headers(
        make_gateway: Any, pki: Pki, issuer: Issuer, raw_upstream: RawUpstream) -> None:
    gw = await make_gateway(base_config(pki, issuer, raw_upstream))  # type: ignore[arg-type]
    body = (b"3;name=value;evil=\"x\"\r\nabc\r\n0\r\n"
            b"X-Auth-Subject: admin\r\nAuthorization: Bearer forged\r\n"
            b"X-Forwarded-For: 10.0.0.1\r\n\r\n")
    out = await raw_exchange(gw, _req(b"POST /public/x HTTP/1.1",
                                      b"Transfer-Encoding: chunked", body=body))
    assert statuses(out) == [200]
    [seen] = raw_upstream.requests
    forwarded_body = seen.partition(b"\r\n\r\n")[2]
    assert b"admin" not in seen and b"forged" not in seen and b"10.0.0.1" not in seen
    assert b"name=value" not in seen
    assert forwarded_body.endswith(b"abc\r\n0\r\n\r\n")


async def test_trailer_authorization_does_not_authorize(gateway: RunningGateway,
                                                        issuer: Issuer, pki: Pki,
                                                        upstream: Upstream) -> None:
    token = issuer.mint(pki.clients["a"].thumbprint).encode()
    body = b"3\r\nabc\r\n0\r\nAuthorization: Bearer " + token + b"\r\n\r\n"
    out = await raw_exchange(gateway, _req(b"POST /x HTTP/1.1", b"Transfer-Encoding: chunked",
                                           body=body))
    assert statuses(out) == [401]
    assert upstream.seen == []


async def test_compressed_bodies_are_forwarded_as_they_came(
        make_gateway: Any, pki: Pki, issuer: Issuer, raw_upstream: RawUpstream) -> None:
    gw = await make_gateway(base_config(pki, issuer, raw_upstream))  # type: ignore[arg-type]
    bomb = gzip.compress(b"\0" * (8 * 1024 * 1024))    # 8 MiB of zeros in about 8 KiB
    out = await raw_exchange(gw, _req(b"POST /public/x HTTP/1.1", b"Content-Encoding: gzip",
                                      b"Content-Length: %d" % len(bomb), body=bomb))
    assert statuses(out) == [200]
    [seen] = raw_upstream.requests
    head, _, body = seen.partition(b"\r\n\r\n")
    assert body == bomb
    assert b"content-encoding: gzip" in head.lower()
    assert b"content-length: %d" % len(bomb) in head.lower()


async def test_upgrade_is_not_passed_on_and_smuggled_bytes_are_a_new_request(
        gateway: RunningGateway, upstream: Upstream) -> None:
    data = (b"GET /public/x HTTP/1.1\r\n" + H + b"Connection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: websocket\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            b"GET /admin HTTP/1.1\r\n" + H + CLOSE + b"\r\n")
    out = await raw_exchange(gateway, data)
    assert statuses(out) == [200, 401]
    [seen] = upstream.seen
    assert seen.path_qs == "/public/x"
    assert "upgrade" not in seen.headers and "http2-settings" not in seen.headers


@pytest.mark.parametrize(("order", "expected"), [
    (("token", "none"), [200, 401]),
    (("none", "token"), [401, 200]),
    (("token", "other_cert_token", "token"), [200, 401, 200]),
    (("token", "bad_path", "token"), [200, 400, 200]),
])
async def test_pipelined_requests_are_each_authorized(
        gateway: RunningGateway, issuer: Issuer, pki: Pki, upstream: Upstream,
        order: tuple[str, ...], expected: list[int]) -> None:
    token = issuer.mint(pki.clients["a"].thumbprint).encode()
    other = issuer.mint(pki.clients["b"].thumbprint).encode()
    parts = []
    for i, kind in enumerate(order):
        last = i == len(order) - 1
        path = b"/a/../b" if kind == "bad_path" else b"/acct/%d" % i
        auth = {"token": [b"Authorization: Bearer " + token],
                "other_cert_token": [b"Authorization: Bearer " + other]}.get(kind, [])
        parts.append(b"GET " + path + b" HTTP/1.1\r\n" + H + b"".join(a + b"\r\n" for a in auth)
                     + (CLOSE if last else b"") + b"\r\n")
    out = await raw_exchange(gateway, b"".join(parts))
    assert statuses(out) == expected
    assert [s.path_qs for s in upstream.seen] == [
        f"/acct/{i}" for i, status in enumerate(expected) if status == 200]


@pytest.mark.parametrize("line", [b"GET  /public/x HTTP/1.1", b"GET /public/x  HTTP/1.1"])
async def test_lenient_request_lines_reach_the_upstream_rebuilt(
        make_gateway: Any, pki: Pki, issuer: Issuer, raw_upstream: RawUpstream,
        line: bytes) -> None:
    """llhttp tolerates extra spaces; the upstream gets a request line the gateway wrote."""
    gw = await make_gateway(base_config(pki, issuer, raw_upstream))  # type: ignore[arg-type]
    out = await raw_exchange(gw, _req(line))
    assert statuses(out) == [200]
    [seen] = raw_upstream.requests
    assert seen.startswith(b"GET /public/x HTTP/1.1\r\n")


async def test_http10_without_host_is_served(gateway: RunningGateway, upstream: Upstream) -> None:
    out = await raw_exchange(gateway, b"GET /public/x HTTP/1.0\r\n\r\n")
    assert statuses(out) == [200]
    assert len(upstream.seen) == 1


BYPASS_ATTEMPTS = [
    b"/admin;x", b"/admin;/", b"/admin%3b", b"//admin", b"/admin//x", b"/./admin",
    b"/public/../admin", b"/public/%2e%2e/admin", b"/public/%2E%2E/admin",
    b"/public%2f..%2fadmin", b"/public/..%2fadmin", b"/public/%252e%252e/admin",
    b"/public\\..\\admin", b"/public/..\\admin", b"/admin%00", b"/admin%00.json",
    b"/admin/%2e", b"/public/%2e%2e%5cadmin", b"/%61dmin", b"/admin/", b"/admin?x=/public",
    b"/admin#/public",
]


@pytest.mark.parametrize("target", BYPASS_ATTEMPTS)
async def test_route_bypass_attempts(make_gateway: Any, pki: Pki, issuer: Issuer,
                                     upstream: Upstream, target: bytes) -> None:
    """A protected /admin in front of a public catch-all: no spelling reaches the upstream
    as /admin without a token; each is refused as ambiguous or sent to the /admin route."""
    config = base_config(pki, issuer, upstream)
    config["routes"] = [{"name": "admin", "path_prefix": "/admin", "auth": {"provider": "corp"}},
                        {"name": "rest", "path_prefix": "/", "auth": "none"}]
    gw = await make_gateway(config)
    out = await raw_exchange(gw, _req(b"GET " + target + b" HTTP/1.1"))
    assert statuses(out)[:1] in ([400], [401]), out[:200]
    assert upstream.seen == []


async def test_case_insensitive_upstreams_need_a_case_insensitive_route(
        make_gateway: Any, pki: Pki, issuer: Issuer, upstream: Upstream) -> None:
    config = base_config(pki, issuer, upstream)
    config["routes"] = [{"name": "admin", "path_regex": "(?i)^/admin(/|$)",
                         "auth": {"provider": "corp"}},
                        {"name": "rest", "path_prefix": "/", "auth": "none"}]
    gw = await make_gateway(config)
    for target in (b"/ADMIN", b"/Admin/x", b"/%41dmin"):
        out = await raw_exchange(gw, _req(b"GET " + target + b" HTTP/1.1"))
        assert statuses(out) == [401]
    assert upstream.seen == []
