"""JSON from untrusted parties (token segments, JWKS and introspection bodies), parsed strictly.

Python's :func:`json.loads` is lenient where a security boundary must not be:
it accepts ``NaN``/``Infinity`` (an ``exp`` of ``Infinity`` makes PyJWT raise
``OverflowError``), keeps the last of duplicate member names (RFC 7515 section
5.2 and RFC 8725 leave a parser free to pick either, so two parties can read two
different tokens), and a deeply nested document raises ``RecursionError``
instead of ``ValueError``. :func:`loads_object` turns every one of these into a
``ValueError``.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["loads_object", "numeric_date"]

_MAX_DEPTH = 32


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate member {key[:40]!r}")
        out[key] = value
    return out


def _depth_ok(data: str) -> bool:
    """Cheap pre-check: the nesting depth, counted on brackets outside strings."""
    if data.count("[") + data.count("{") <= _MAX_DEPTH:
        return True  # the usual case, at C speed
    depth, deepest, in_string, escaped = 0, 0, False, False
    for ch in data:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > _MAX_DEPTH:
                return False
        elif ch in "]}":
            depth -= 1
    return True


#: Built once: json.loads with these hooks would build a decoder on every call.
_DECODER = json.JSONDecoder(object_pairs_hook=_unique, parse_constant=_no_constants)


def loads_object(data: bytes | str) -> dict[str, Any]:
    """A JSON object, or ``ValueError`` (also for duplicates, NaN/Infinity, deep nesting)."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    if not _depth_ok(text):
        raise ValueError("JSON nested too deeply")
    try:
        value = _DECODER.decode(text)
    except RecursionError as exc:  # pragma: no cover - guarded by _depth_ok
        raise ValueError("JSON nested too deeply") from exc
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def numeric_date(value: object) -> bool:
    """Whether ``value`` is a NumericDate (RFC 7519 section 2): a finite JSON number, not a
    boolean or a string, within a range every consumer can represent."""
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and -(2**53) < value < 2**53
