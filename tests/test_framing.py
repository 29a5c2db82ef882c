"""Host and request-target syntax (issue 17 items 2 and 4), on both request paths.

The pure checks of :mod:`mtls_gateway.framing` are table-driven here; end to end, each bad
request gets 400 on the aiohttp path and on the fast lane (where it is "not plain" and so
answered by the aiohttp path), and the upstream sees nothing.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from gwtest import GatewayFactory, Issuer, Pki, Upstream, base_config, raw_exchange, statuses
from mtls_gateway.fastlane import parse_plain
from mtls_gateway.framing import valid_host, valid_origin_form

GOOD_HOSTS = ["gw.test", "gw.test:8443", "GW.Test", "127.0.0.1", "127.0.0.1:1", "[::1]",
              "[2001:db8::7]:443", "[::ffff:127.0.0.1]", "x_y-z.test", "localhost:65535", ""]
BAD_HOSTS = [
    "a@b", "user:pw@gw.test", "a,b", "gw.test, evil.test", "gw test", " gw.test:1 2",
    "gw.test:", "gw.test:99999", "gw.test:123456", "gw.test:abc", "gw.test:-1", "[::1",
    "::1", "[::g]", "[v1.fe]", "gw.test/path", "gw.test?x", "gw.test#x", "g\\w", "a%41",
    "a;b", "a!b", "a'b", "a(b)", "a*b", "a+b", "a=b", "a$b", "a&b", "a\"b", "<x>",
    "a:1:2", "\u00e4.test",
]


@pytest.mark.parametrize("value", GOOD_HOSTS)
def test_valid_hosts(value: str) -> None:
    assert valid_host(value)


@pytest.mark.parametrize("value", BAD_HOSTS)
def test_invalid_hosts(value: str) -> None:
    assert not valid_host(value)


GOOD_TARGETS = ["/", "/a/b", "/a?b=c&d=e", "/a?x=/y?z", "/%41%2f", "/a:@!$&'()*+,;=-._~",
                "/a?:@!$&'()*+,;=/?-._~%20", "//a"]
BAD_TARGETS = ["/a#b", "/a?b#c", "/#", "/a b", "/a%zz", "/a%4", "/a%", "/{x}", "/a|b",
               "/a?b=|", '/a"', "/<a>", "/a^", "/a`", "/[x]", "/a\\b", "/a?x=\\",
               "/\u00e4", "a", "", "*", "http://x/"]


@pytest.mark.parametrize("target", GOOD_TARGETS)
def test_valid_origin_form(target: str) -> None:
    assert valid_origin_form(target)


@pytest.mark.parametrize("target", BAD_TARGETS)
def test_invalid_origin_form(target: str) -> None:
    assert not valid_origin_form(target)


def _head(target: bytes = b"/public/x", host: bytes = b"gw.test") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nAccept: */*"


@pytest.mark.parametrize(("target", "host", "plain"), [
    (b"/public/x", b"gw.test:8443", True),
    (b"/public/x", b"a@b", False),
    (b"/public/x", b"a,b", False),
    (b"/public/x", b"gw.test:", False),
    (b"/public/{x}", b"gw.test", False),
    (b"/public/x?a=|", b"gw.test", False),
    (b"/public/x#f", b"gw.test", False),
])
def test_the_lane_leaves_bad_hosts_and_targets_to_aiohttp(target: bytes, host: bytes,
                                                          plain: bool) -> None:
    parsed = parse_plain(_head(target, host), max_headers=100, max_line=8192)
    assert (parsed is not None) == plain


# --- end to end, both request paths --------------------------------------------------------

def _config(pki: Pki, issuer: Issuer, upstream: Upstream, lane: bool) -> dict[str, Any]:
    config = base_config(pki, issuer, upstream)
    config["fast_lane"] = lane
    return config


def _request(target: bytes, host: bytes) -> bytes:
    return (b"GET " + target + b" HTTP/1.1\r\nHost: " + host
            + b"\r\nConnection: close\r\n\r\n")


def _refusal(out: bytes) -> tuple[int, str]:
    [status] = statuses(out)[:1]
    return status, json.loads(out.split(b"\r\n\r\n", 1)[1])["reason"]


@pytest.mark.parametrize("lane", [True, False], ids=["fast_lane", "aiohttp"])
@pytest.mark.parametrize("host", [h.encode() for h in BAD_HOSTS if h.isascii()
                                  and not h.startswith(" ")])
async def test_a_bad_host_is_400_and_never_forwarded(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream,
        lane: bool, host: bytes) -> None:
    gw = await make_gateway(_config(pki, issuer, upstream, lane))
    out = await raw_exchange(gw, _request(b"/public/x", host))
    assert _refusal(out) == (400, "bad_request"), out[:300]
    assert upstream.seen == []


@pytest.mark.parametrize("lane", [True, False], ids=["fast_lane", "aiohttp"])
@pytest.mark.parametrize("target", [b"/public/x#frag", b"/public/x?a#b", b"/public/{x}",
                                    b"/public/x?a=|", b'/public/x?a="', b"/public/x^",
                                    b"/public/x`", b"/public/[x]", b"/public/x%zz",
                                    b"/public/x%4", b"/public/x?q=\\"])
async def test_a_target_outside_origin_form_is_400_and_never_forwarded(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream,
        lane: bool, target: bytes) -> None:
    gw = await make_gateway(_config(pki, issuer, upstream, lane))
    out = await raw_exchange(gw, _request(target, b"gw.test"))
    assert _refusal(out) == (400, "bad_target"), out[:300]
    assert upstream.seen == []


@pytest.mark.parametrize("lane", [True, False], ids=["fast_lane", "aiohttp"])
@pytest.mark.parametrize("host", [b"gw.test", b"gw.test:8443", b"[::1]:8443", b"10.0.0.1"])
async def test_a_good_host_is_forwarded_as_x_forwarded_host(
        make_gateway: GatewayFactory, pki: Pki, issuer: Issuer, upstream: Upstream,
        lane: bool, host: bytes) -> None:
    gw = await make_gateway(_config(pki, issuer, upstream, lane))
    out = await raw_exchange(gw, _request(b"/public/x?a=b&c=/d", host))
    assert statuses(out) == [200], out[:300]
    [seen] = upstream.seen
    assert seen.path_qs == "/public/x?a=b&c=/d"
    assert seen.headers["x-forwarded-host"] == [host.decode()]
