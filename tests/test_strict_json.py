"""Strict JSON for untrusted documents: what json.loads lets through and we do not."""

from __future__ import annotations

import pytest

from mtls_gateway.strict_json import loads_object, numeric_date


@pytest.mark.parametrize("text", [
    '{"a": 1, "a": 2}',                       # duplicate member: two readers, two documents
    '{"active": false, "active": true}',
    '{"x": {"y": 1, "y": 1}}',                 # also nested
    '{"exp": NaN}', '{"exp": Infinity}', '{"exp": -Infinity}',
    '{"x": ' + "[" * 40 + "]" * 40 + "}",       # deeper than 32
    "[" * 100_000 + "]" * 100_000,             # json.loads: RecursionError
    "[1, 2]", '"text"', "null", "1", "",
    "{", '{"a": 1,}', "{'a': 1}",
])
def test_refused(text: str) -> None:
    with pytest.raises(ValueError):
        loads_object(text)


@pytest.mark.parametrize(("data", "expected"), [
    (b'{"a": 1}', {"a": 1}),
    (b'{"a": "' + b"[" * 40 + b'"}', {"a": "[" * 40}),      # brackets in a string: not nesting
    (b'{"a": "\\"[[["}', {"a": '"[[['}),
    ('{"\u00e9": [1, {"b": null}]}'.encode(), {"\u00e9": [1, {"b": None}]}),
    (b'{"exp": 1e300}', {"exp": 1e300}),
])
def test_accepted(data: bytes, expected: object) -> None:
    assert loads_object(data) == expected


def test_not_utf8_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        loads_object(b'{"a": "\xff"}')


@pytest.mark.parametrize(("value", "ok"), [
    (1795000000, True), (1795000000.5, True), (0, True), (-1, True),
    (True, False), (False, False), ("1795000000", False), (None, False), ([1], False),
    (float("inf"), False), (float("nan"), False), (2**53, False), (1e300, False),
])
def test_numeric_date(value: object, ok: bool) -> None:
    assert numeric_date(value) is ok
