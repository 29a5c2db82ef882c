"""First-match routing: the first route whose path and method match decides.

A request that matches no route is refused with 404 (``no_route``): nothing
reaches the upstream by omission. Paths with dot segments, backslashes or
encoded slashes are refused before matching (``bad_path``), so that the path a
route saw is the path the upstream gets.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .config import Route
from .errors import InvalidRequest, NoRoute

__all__ = ["Router"]

_ENCODED_SEPARATOR = re.compile(r"%(2f|5c|2e)", re.IGNORECASE)


class Router:
    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)

    def match(self, method: str, path: str, raw_path: str) -> Route:
        """The route for a request, or :class:`NoRoute` / :class:`InvalidRequest`."""
        segments = path.split("/")
        if "\\" in path or ".." in segments or "." in segments or \
                _ENCODED_SEPARATOR.search(raw_path.split("?", 1)[0]):
            raise InvalidRequest("bad_path", "request path is not in normal form")
        for route in self.routes:
            if route.match.matches(path) and (route.methods is None or method in route.methods):
                return route
        raise NoRoute("no_route", "no route for this request")
