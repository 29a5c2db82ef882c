"""The reason-code registry (reasons.py) is what the code raises and what the documents say.

README.md's "Responses and reason codes" table and SECURITY.md's "How refusals look" table
are read here: every code they name is in the registry with the status of its row, and
every registered code is in both tables.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mtls_gateway import errors
from mtls_gateway.dpop import dpop_refusal
from mtls_gateway.reasons import ALLOWED, REASONS, generic_error
from mtls_gateway.refusal import render, render_code

REPO = Path(__file__).resolve().parent.parent
#: Backticked snake_case words in those tables that are settings, not reason codes.
_NOT_CODES = {"tls_client_auth", "ca_file", "max_body_bytes", "jwks_uri", "jwks_max_age",
              "client_id", "mtls_client", "resource_metadata"}
#: Registered codes the README table does not list yet (it is being rewritten elsewhere):
#: add its line there, then drop the code from here.
_README_PENDING: set[str] = set()


def _table(path: Path, heading: str) -> list[tuple[set[int], set[str]]]:
    """(statuses, codes) of each row of the first table under ``heading``."""
    text = path.read_text()
    section = text.split(heading, 1)[1]
    rows = []
    for line in section.splitlines():
        if line.startswith("## "):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or not cells[0][:1].isdigit():
            continue
        statuses = {int(s) for s in re.findall(r"\d{3}", cells[0])}
        codes = {c for c in re.findall(r"`([a-z][a-z0-9_]*)`", cells[1])
                 if "_" in c and c not in _NOT_CODES}
        rows.append((statuses, codes))
    assert rows, f"no table under {heading!r} in {path.name}"
    return rows


TABLES = {
    "README.md": (REPO / "README.md", "## Responses and reason codes"),
    "SECURITY.md": (REPO / "SECURITY.md", "## How refusals look (reason codes)"),
}


@pytest.mark.parametrize("document", list(TABLES))
def test_every_documented_code_is_registered_with_its_status(document: str) -> None:
    for statuses, codes in _table(*TABLES[document]):
        for code in codes:
            assert code in REASONS, f"{document} names {code}, which reasons.py lacks"
            assert REASONS[code].status in statuses, (
                f"{document} says {code} is {sorted(statuses)}, reasons.py says "
                f"{REASONS[code].status}")


@pytest.mark.parametrize("document", list(TABLES))
def test_every_registered_code_is_documented(document: str) -> None:
    documented = set().union(*(codes for _, codes in _table(*TABLES[document])))
    pending = _README_PENDING if document == "README.md" else set()
    assert set(REASONS) - documented - pending == set()
    assert not pending & documented, "documented now: drop it from _README_PENDING"


def test_allowed_codes_are_documented_in_the_readme() -> None:
    text = (REPO / "README.md").read_text().split("## Responses and reason codes", 1)[1]
    assert {code for code in ALLOWED if f"`{code}`" not in text} == set()


def _codes_in_source() -> set[str]:
    """Reason codes given to Refusal classes anywhere in the package."""
    names = "|".join(n for n in errors.__all__ if isinstance(getattr(errors, n), type)
                     and issubclass(getattr(errors, n), errors.Refusal))
    pattern = re.compile(rf"\b(?:{names})\(\s*\"([a-z_]+)\"")
    found: set[str] = set()
    for path in (REPO / "mtls_gateway").glob("*.py"):
        found |= set(pattern.findall(path.read_text()))
    return found


def test_every_code_the_code_raises_is_registered() -> None:
    raised = _codes_in_source()
    assert len(raised) > 30                 # (the pattern still finds them)
    assert raised - set(REASONS) == set()


@pytest.mark.parametrize("code", sorted(REASONS))
def test_the_rendered_answer_agrees_with_the_registry(code: str) -> None:
    """A refusal of each class the registry names renders with the registry's status and
    ``error`` (the Refusal class that raises the code fixes both)."""
    reason = REASONS[code]
    classes = {400: errors.InvalidRequest, 401: errors.InvalidToken, 403: errors.Refusal,
               404: errors.NoRoute, 408: errors.RequestTimeout, 413: errors.BodyTooLarge,
               500: errors.InternalError, 502: errors.UpstreamFailed,
               503: errors.DependencyDown, 504: errors.UpstreamTimeout}
    if reason.error == "invalid_client":
        exc: errors.Refusal = errors.InvalidClient(code)
    elif code.startswith("token_request_"):
        exc = errors.InvalidTokenRequest(code)
    elif code.startswith("dpop_"):      # (dpop.py raises its own, with the DPoP challenge)
        exc = dpop_refusal(code)
    elif code == "no_token":
        exc = errors.NoToken()
    elif code == "insufficient_scope":
        exc = errors.InsufficientScope(code, "", "s")
    elif reason.status in (414, 431):       # (the connection guard's, from parse errors)
        exc = errors.InvalidRequest(code)
        rendered = render_code(code)
        assert rendered.status == reason.status
        assert f'"error": "{generic_error(reason.status)}"'.encode() in rendered.body
        return
    else:
        exc = classes[reason.status](code)
    rendered = render(exc, "realm")
    assert rendered.status == reason.status
    assert f'"error": "{reason.error or generic_error(reason.status)}"'.encode() \
        in rendered.body
