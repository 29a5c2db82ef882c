"""Reading a whole HTTP body from a dependency (JWKS, introspection), with a size cap.

aiohttp's ``StreamReader.read(n)`` returns *up to* ``n`` bytes: whatever has arrived so far.
A document that comes in several TCP segments or chunks would be cut short and then fail
to parse (a JWKS outage that is really a slow network). :func:`read_capped` reads until the
end of the body, and stops as soon as it is over the cap so a hostile server cannot make
the gateway buffer more than ``limit + 1`` bytes.
"""

from __future__ import annotations

from aiohttp import StreamReader

__all__ = ["read_capped"]


async def read_capped(stream: StreamReader, limit: int) -> bytes:
    """The whole body if it has at most ``limit`` bytes; else its first ``limit + 1`` bytes
    (the caller's "too large" test is ``len(body) > limit``)."""
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await stream.read(limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
