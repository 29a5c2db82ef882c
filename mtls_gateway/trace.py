"""The checks one decision went through, recorded only when someone asks (``explain``).

A running gateway never records: :class:`~mtls_gateway.pipeline.RequestView` has
``trace=None`` and the verifiers find no list in :data:`current`, so the only cost on the
request path is one test for None in the pipeline and one context-variable read on a
verifier's cache miss (next to a signature or an HTTP call). ``mtls-gateway explain``
(:mod:`mtls_gateway.explain`) gives the view a list; the pipeline appends its steps and
lends the list to the verifiers (:func:`tracing`) while they verify, so the trace is
written by the code that decides, never by a second implementation of the checks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

__all__ = ["Check", "current", "note", "tracing"]


@dataclass(frozen=True, slots=True)
class Check:
    """One check: ``verdict`` is ``pass``, ``fail``, ``info`` or ``not checked``;
    ``values`` what was compared (never the token or its signature)."""

    step: str
    verdict: str
    values: dict[str, object] = field(default_factory=dict)


_CURRENT: ContextVar[list[Check] | None] = ContextVar("mtls_gateway_trace", default=None)


def current() -> list[Check] | None:
    """The list a verifier appends to, None when nobody traces (always, in the gateway)."""
    return _CURRENT.get()


def note(steps: list[Check] | None, step: str, verdict: str, **values: object) -> None:
    if steps is not None:
        steps.append(Check(step, verdict, values))


@contextlib.contextmanager
def tracing(steps: list[Check]) -> Iterator[None]:
    """Lend ``steps`` to the verifiers called inside (this task only)."""
    token = _CURRENT.set(steps)
    try:
        yield
    finally:
        _CURRENT.reset(token)
