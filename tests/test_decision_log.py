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


BURST = """
import logging, sys
from mtls_gateway.decision_log import configure_logging, log_decision
configure_logging("INFO")
for i in range(5000):
    log_decision(decision="allow", reason="allowed", status=200, n=i)
    if i % 1000 == 0:
        logging.getLogger("mtls_gateway.proxy").warning("between %d", i)
log_decision(decision="allow", reason="allowed", status=200, n="last")
sys.stdin.readline()        # still running: the lines must be out already
"""


def _lines_until_last(script: str) -> list[dict[str, object]]:
    """The JSON lines ``script`` writes up to the one with ``"n": "last"``, all read while it
    still runs (it waits on its stdin until the end)."""
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    try:
        lines: list[dict[str, object]] = []
        while not lines or lines[-1].get("n") != "last":
            line = proc.stdout.readline()       # bounded: the process ends on its own error
            assert line, "stdout closed before the last line"
            lines.append(json.loads(line))
        assert proc.poll() is None              # out before exit
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    return lines


def test_a_burst_is_written_whole_in_order_and_without_waiting_for_exit() -> None:
    """The writer thread batches what is queued; nothing is lost or reordered, and an idle
    gateway's lines are out at once, not at exit."""
    lines = _lines_until_last(BURST)
    numbers = [r["n"] for r in lines if "n" in r]
    assert numbers == [*range(5000), "last"]
    warnings = [r["message"] for r in lines if r["level"] == "warning"]
    assert warnings == [f"between {i}" for i in range(0, 5000, 1000)]
    for i in range(0, 5000, 1000):           # each warning right after its decision line
        at = next(k for k, r in enumerate(lines) if r.get("n") == i)
        assert lines[at + 1]["message"] == f"between {i}"


ON_A_LOOP = """
import asyncio, logging, sys
from mtls_gateway.decision_log import configure_logging, log_decision
configure_logging("INFO")

async def main() -> None:
    for i in range(N):
        log_decision(decision="allow", reason="allowed", status=200, n=i)
        if i % 100 == 0:
            logging.getLogger("mtls_gateway.proxy").warning("between %d", i)
        if i % 7 == 0:
            await asyncio.sleep(0)
    log_decision(decision="allow", reason="allowed", status=200, n="last")
    # still running, the loop idle: the lines must be out already
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

asyncio.run(main())
"""


@pytest.mark.parametrize("count", [1, 300, 5000])
def test_lines_logged_on_a_running_loop_come_out_in_order_while_it_runs(count: int) -> None:
    """On an event loop decision lines are handed to the writer in batches (one wake-up of
    the writer thread per batch, not per request): still every line, in order, with other
    records in their place, and out while the gateway idles, not at exit."""
    lines = _lines_until_last(ON_A_LOOP.replace("range(N)", f"range({count})"))
    assert [r["n"] for r in lines if "n" in r] == [*range(count), "last"]
    for i in range(0, count, 100):           # each warning right after its decision line
        at = next(k for k, r in enumerate(lines) if r.get("n") == i)
        assert lines[at + 1]["message"] == f"between {i}"
    assert len(lines) == count + 1 + len(range(0, count, 100))
