from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

from mtls_gateway.bearer import bearer_token
from mtls_gateway.errors import InvalidRequest


def _call(headers: list[tuple[str, str]], query: dict[str, str] | None = None) -> str | None:
    return bearer_token(CIMultiDictProxy(CIMultiDict(headers)),
                        MultiDictProxy(MultiDict(query or {})))


@pytest.mark.parametrize(("headers", "expected"), [
    ([("Authorization", "Bearer abc.def-ghi_jkl")], "abc.def-ghi_jkl"),
    ([("authorization", "bearer abc")], "abc"),
    ([("Authorization", "BEARER abc==")], "abc=="),
    ([], None),
    ([("Authorization", "Basic dXNlcjpwYXNz")], None),
])
def test_extraction(headers: list[tuple[str, str]], expected: str | None) -> None:
    assert _call(headers) == expected


@pytest.mark.parametrize(("headers", "query", "reason"), [
    ([], {"access_token": "abc"}, "token_in_query"),
    ([("Authorization", "Basic x")], {"access_token": "abc"}, "token_in_query"),
    ([("Authorization", "Bearer a")], {"access_token": "b"}, "multiple_tokens"),
    ([("Authorization", "Bearer a"), ("Authorization", "Bearer b")], {}, "multiple_tokens"),
    ([("Authorization", "Bearer")], {}, "malformed_authorization"),
    ([("Authorization", "Bearer a b")], {}, "malformed_authorization"),
    ([("Authorization", "Bearer a\"b")], {}, "malformed_authorization"),
])
def test_refusals(headers: list[tuple[str, str]], query: dict[str, str], reason: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        _call(headers, query)
    assert info.value.reason == reason
    assert info.value.status == 400
