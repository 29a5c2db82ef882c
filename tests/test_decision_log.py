"""Decision log lines: one JSON object each, written off the event loop."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from mtls_gateway.decision_log import token_hash

SCRIPT = """
import logging
from mtls_gateway.decision_log import configure_logging, log_decision
configure_logging("INFO")
log_decision(decision="deny", reason="binding_mismatch", status=401, route="api",
             token_hash="0123456789ab", provider=None)
logging.getLogger("mtls_gateway.jwks").debug("not shown at INFO")
try:
    raise ValueError("boom")
except ValueError:
    logging.getLogger("mtls_gateway.gateway").exception("internal error")
"""


def test_lines_are_json_none_fields_dropped_and_flushed_at_exit() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 2
    decision, error = lines
    assert decision["reason"] == "binding_mismatch" and decision["status"] == 401
    assert "provider" not in decision and decision["level"] == "info" and decision["pid"] > 0
    assert set(decision) == {"time", "level", "logger", "pid", "decision", "reason", "status",
                             "route", "token_hash"}
    assert decision["logger"] == "mtls_gateway.access" and decision["decision"] == "deny"
    assert error["level"] == "error" and "ValueError: boom" in error["message"]


@pytest.mark.parametrize("token", ["tok-1", "eyJhbGciOiJSUzI1NiJ9.e30.sig", "x" * 5000])
def test_token_hash_is_a_short_prefix_that_reveals_nothing(token: str) -> None:
    digest = token_hash(token)
    assert digest == hashlib.sha256(token.encode()).hexdigest()[:12]
    assert token not in digest
