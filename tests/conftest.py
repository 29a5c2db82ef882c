"""Fixtures live in gwtest.py and introspection_server.py (importable by test modules);
re-exported here for pytest."""

from introspection_server import auth_server

from gwtest import (
    fast_lane,
    gateway,
    issuer,
    make_gateway,
    pki,
    raw_upstream,
    rsa_keys,
    upstream,
)

__all__ = ["auth_server", "fast_lane", "gateway", "issuer", "make_gateway", "pki", "raw_upstream",
           "rsa_keys", "upstream"]
