"""Fixtures live in gwtest.py (importable by test modules); re-exported here for pytest."""

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

__all__ = ["fast_lane", "gateway", "issuer", "make_gateway", "pki", "raw_upstream", "rsa_keys",
           "upstream"]
