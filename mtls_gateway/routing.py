"""First-match routing: the first route whose path and method match decides.

A request that matches no route is refused with 404 (``no_route``): nothing
reaches the upstream by omission. Paths an upstream might read differently from
the gateway are refused before matching (``bad_path``), so that the path a route
saw is the path the upstream gets: dot segments (also encoded, ``%2e``),
backslashes and encoded slashes (``%2f``, ``%5c``), double-encoded separators
(``%252f``), empty segments (``//``, merged by many servers), ``;`` path
parameters (``/admin;x`` is ``/admin`` to Tomcat and Spring), and control
characters including NUL (raw or encoded). Matching is case-sensitive: an
upstream that matches paths case-insensitively needs routes that say so
(``path_regex: (?i)^/admin``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .config import Route
from .errors import InvalidRequest, NoRoute

__all__ = ["Router"]

_ENCODED_SEPARATOR = re.compile(r"%(25)*(2f|5c|2e|3b|[01][0-9a-f]|7f)", re.IGNORECASE)
_AMBIGUOUS = re.compile(r"[\\;\x00-\x1f\x7f]|//")


class Router:
    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)

    def match(self, method: str, path: str, raw_path: str) -> Route:
        """The route for a request, or :class:`NoRoute` / :class:`InvalidRequest`."""
        segments = path.split("/")
        raw = raw_path.split("?", 1)[0]
        if not path.startswith("/") or ".." in segments or "." in segments or \
                _AMBIGUOUS.search(path) or _AMBIGUOUS.search(raw) or \
                _ENCODED_SEPARATOR.search(raw):
            raise InvalidRequest("bad_path", "request path is not in normal form")
        for route in self.routes:
            if route.match.matches(path) and (route.methods is None or method in route.methods):
                return route
        raise NoRoute("no_route", "no route for this request")
