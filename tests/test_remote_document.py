"""The one remote-document fetcher (JWT providers' and client registries' jwks_uri): real
HTTPS on loopback, every rule tried with an answer that breaks it."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web

from gwtest import LoopbackServer, Pki
from mtls_gateway.remote_document import (
    MAX_DOCUMENT_BYTES,
    FetchFailed,
    RemoteDocument,
    keep_refreshed,
)

DOC = {"keys": [{"kty": "EC", "crv": "P-256", "x": "x", "y": "y"}]}


class DocumentServer(LoopbackServer):
    """HTTPS on loopback: /doc answers as the test says; /elsewhere counts visits."""

    def __init__(self, pki: Pki) -> None:
        self.pki = pki
        self.answer: Callable[[], web.Response] = lambda: web.json_response(DOC)
        self.delay = 0.0
        self.elsewhere = 0
        self.base = ""

    async def start(self) -> None:
        async def doc(_: web.Request) -> web.Response:
            if self.delay:
                await asyncio.sleep(self.delay)
            return self.answer()

        async def elsewhere(_: web.Request) -> web.Response:
            self.elsewhere += 1
            return web.json_response(DOC)

        app = web.Application()
        app.router.add_get("/doc", doc)
        app.router.add_get("/elsewhere", elsewhere)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.pki.server_cert, self.pki.server_key)
        self.base = await self.serve(app, ctx)


@pytest.fixture
async def server(pki: Pki) -> AsyncIterator[DocumentServer]:
    s = DocumentServer(pki)
    await s.start()
    yield s
    await s.stop()


async def test_a_good_document_is_returned(server: DocumentServer, pki: Pki) -> None:
    source = RemoteDocument(server.base + "/doc", ca_file=Path(pki.ca_file), timeout=5)
    try:
        assert await source.fetch() == DOC
        assert await source.fetch() == DOC          # the session is reused
    finally:
        await source.close()


@pytest.mark.parametrize(("answer", "why"), [
    (lambda base: web.Response(status=302, headers={"Location": base + "/elsewhere"}),
     "HTTP 302"),
    (lambda _: web.Response(status=500), "HTTP 500"),
    (lambda _: web.Response(text=json.dumps(DOC), content_type="text/plain"), "is not JSON"),
    (lambda _: web.Response(text=json.dumps(DOC), content_type="text/html"), "is not JSON"),
    (lambda _: web.Response(body=b"{" + b" " * MAX_DOCUMENT_BYTES + b"}",
                            content_type="application/json"), "larger than"),
    (lambda _: web.Response(text='{"keys": [], "keys": []}', content_type="application/json"),
     "ValueError"),                                   # duplicate members: strict JSON
    (lambda _: web.Response(text="[1, 2]", content_type="application/json"), "ValueError"),
    (lambda _: web.Response(text="{", content_type="application/jwk-set+json"),
     "JSONDecodeError"),
])
async def test_a_document_that_breaks_a_rule_is_refused(server: DocumentServer, pki: Pki,
                                                        answer: object, why: str) -> None:
    server.answer = lambda: answer(server.base)  # type: ignore[operator,no-any-return]
    source = RemoteDocument(server.base + "/doc", ca_file=Path(pki.ca_file), timeout=5)
    try:
        with pytest.raises(FetchFailed, match=why):
            await source.fetch()
    finally:
        await source.close()
    assert server.elsewhere == 0                      # a redirect is never followed


async def test_unknown_ca_and_timeout_are_failures(server: DocumentServer, pki: Pki) -> None:
    untrusting = RemoteDocument(server.base + "/doc", ca_file=None, timeout=5)
    slow = RemoteDocument(server.base + "/doc", ca_file=Path(pki.ca_file), timeout=0.3)
    try:
        with pytest.raises(FetchFailed, match=r"Certificate|SSL"):
            await untrusting.fetch()                  # the system store does not know our CA
        server.delay = 3.0
        with pytest.raises(FetchFailed, match="TimeoutError"):
            await slow.fetch()
    finally:
        await untrusting.close()
        await slow.close()


@pytest.mark.parametrize(("first_ok", "outcomes", "delays"), [
    (True, [True, True], [60, 60, 60]),
    (False, [False, False, False, True, False], [1, 2, 4, 8, 60, 1]),
    (False, [False] * 8, [1, 2, 4, 8, 16, 32, 60, 60, 60]),   # capped at the interval
    (True, [False, True], [60, 1, 60]),
])
async def test_refresh_interval_and_back_off(first_ok: bool, outcomes: list[bool],
                                             delays: list[float]) -> None:
    waited: list[float] = []
    results = iter(outcomes)

    async def sleep(delay: float) -> None:
        waited.append(delay)

    async def refresh() -> bool:
        try:
            return next(results)
        except StopIteration:
            raise asyncio.CancelledError from None   # the end of the script

    with pytest.raises(asyncio.CancelledError):
        await keep_refreshed(refresh, 60, ok=first_ok, sleep=sleep)
    assert waited == delays


async def test_a_wake_refreshes_at_once() -> None:
    wake = asyncio.Event()
    calls = 0

    async def refresh() -> bool:
        nonlocal calls
        calls += 1
        return True

    task = asyncio.create_task(keep_refreshed(refresh, 3600, ok=True, wake=wake))
    try:
        for expected in (1, 2):
            wake.set()
            for _ in range(100):
                await asyncio.sleep(0.01)
                if calls == expected:
                    break
            assert calls == expected
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
