from __future__ import annotations

import re

import pytest

from mtls_gateway.config import AuthNone, PathMatch, Route
from mtls_gateway.errors import InvalidRequest, NoRoute
from mtls_gateway.routing import Router


def _route(name: str, kind: str, value: str, methods: set[str] | None = None) -> Route:
    regex = re.compile(value) if kind == "regex" else None
    return Route(name, PathMatch(kind, value, regex),  # type: ignore[arg-type]
                 frozenset(methods) if methods else None, AuthNone(), None)


ROUTER = Router([
    _route("health-get", "exact", "/health", {"GET"}),
    _route("v-regex", "regex", r"^/v[0-9]+/"),
    _route("api", "prefix", "/api/"),
    _route("root-docs", "prefix", "/docs"),
])


@pytest.mark.parametrize(("method", "path", "expected"), [
    ("GET", "/health", "health-get"),
    ("POST", "/health", None),
    ("GET", "/health/x", None),
    ("GET", "/v2/things", "v-regex"),
    ("GET", "/vx/things", None),
    ("GET", "/api", "api"),
    ("DELETE", "/api/a/b", "api"),
    ("GET", "/apiary", None),
    ("GET", "/docs", "root-docs"),
    ("GET", "/docsx", None),
])
def test_first_match(method: str, path: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(NoRoute):
            ROUTER.match(method, path, path)
    else:
        assert ROUTER.match(method, path, path).name == expected


@pytest.mark.parametrize(("path", "raw"), [
    ("/api/../x", "/api/../x"),
    ("/api/./x", "/api/./x"),
    ("/api/../x", "/api/%2e%2e/x"),
    ("/api//x", "/api%2F/x"),
    ("/api\\x", "/api%5cx"),
])
def test_ambiguous_paths_are_refused(path: str, raw: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        ROUTER.match("GET", path, raw)
    assert info.value.reason == "bad_path"


def test_catch_all_prefix() -> None:
    assert Router([_route("all", "prefix", "/")]).match("GET", "/any/thing", "/any/thing").name \
        == "all"


@pytest.mark.parametrize(("path", "raw"), [
    ("/api/x;jsessionid=1", "/api/x;jsessionid=1"),       # Tomcat/Spring path parameters
    ("/api;/x", "/api;/x"),
    ("/api/x;", "/api/x%3B"),
    ("//api/x", "//api/x"),                               # merged by nginx, Spring...
    ("/api//x", "/api//x"),
    ("/api/x\x00", "/api/x%00"),
    ("/api/x\x00", "/api/x\x00"),
    ("/api/\x1fx", "/api/%1Fx"),
    ("/api/\x7fx", "/api/%7fx"),
    ("/api/x\r\nX-Injected: 1", "/api/x%0d%0aX-Injected:%201"),
    ("/api/%2e%2e/x", "/api/%252e%252e/x"),              # double encoding
    ("/api%2fx", "/api%252fx"),
    ("/api%5cx", "/api%255Cx"),
    ("/api/..", "/api/.."),
    ("/api/.", "/api/%2E"),
    ("/api\\..\\x", "/api\\..\\x"),
    ("api/x", "api/x"),                                   # not origin form
    ("", ""),
])
def test_paths_an_upstream_could_read_differently_are_refused(path: str, raw: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        ROUTER.match("GET", path, raw)
    assert info.value.reason == "bad_path"


@pytest.mark.parametrize(("path", "raw", "expected"), [
    ("/api/x", "/api/x", "api"),
    ("/api/a b", "/api/a%20b", "api"),
    ("/api/%", "/api/%25", "api"),                        # a literal percent sign is fine
    ("/api/x.json", "/api/x.json", "api"),
    ("/api/...", "/api/...", "api"),                      # not a dot segment
    ("/api/\u00e9", "/api/%C3%A9", "api"),
    ("/api/", "/api/", "api"),
])
def test_unambiguous_paths_still_route(path: str, raw: str, expected: str) -> None:
    assert ROUTER.match("GET", path, raw).name == expected
