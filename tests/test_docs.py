"""The user's documents stay true: links resolve, the README stays short, examples are real.

README.md is the short user's document; the rest lives in docs/. A moved section must not
leave a dead link behind, a config example must be one the gateway accepts, and every command
in the README's command table must be one the CLI has.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mtls_gateway.cli import main
from mtls_gateway.config_load import load_config_text
from mtls_gateway.pki import issue_server, make_ca

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = sorted([README, REPO / "SECURITY.md", *(REPO / "docs").glob("*.md"),
               REPO / "deploy" / "README.md", REPO / "bench" / "README.md"])
MAX_README_LINES = 260

_FENCE = re.compile(r"^```.*?^```[ \t]*$", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)\)")
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _prose(text: str) -> str:
    """``text`` without fenced code blocks (their brackets are code, not links)."""
    return _FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link keeps its text
    text = text.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a Markdown file; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for heading in _HEADING.findall(_prose(path.read_text(encoding="utf-8"))):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def relative_links(path: Path) -> list[str]:
    links = _LINK.findall(_prose(path.read_text(encoding="utf-8")))
    return [link for link in links if not re.match(r"^[a-z][a-z0-9+.-]*:", link)]


@pytest.mark.parametrize(("heading", "expected"), [
    ("Responses and reason codes", "responses-and-reason-codes"),
    ("`client_ca: any`: why a pyOpenSSL transport", "client_ca-any-why-a-pyopenssl-transport"),
    ("1. What the authorization server must do", "1-what-the-authorization-server-must-do"),
    ("Keycloak (reverse-proxy certificate lookup)", "keycloak-reverse-proxy-certificate-lookup"),
    ("Passing the certificate on: `forward_client_cert`",
     "passing-the-certificate-on-forward_client_cert"),
])
def test_slug_follows_github(heading: str, expected: str) -> None:
    assert slug(heading) == expected


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_relative_links_resolve(doc: Path) -> None:
    """Every relative link names a file that exists and, with ``#anchor``, a heading in it."""
    problems = []
    for link in relative_links(doc):
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        if not path.exists():
            problems.append(f"{link}: no such file {path}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            problems.append(f"{link}: no heading with anchor #{anchor} in {_rel(path)}")
        elif anchor and path.suffix != ".md":
            problems.append(f"{link}: anchor into a file that is not Markdown")
    assert problems == []


def test_link_checker_sees_links_and_catches_dead_ones(tmp_path: Path) -> None:
    """The checker itself: finds links outside code, skips URLs, reports both kinds of dead."""
    doc = tmp_path / "a.md"
    (tmp_path / "b.md").write_text("# Title here\n")
    doc.write_text("# A\n[ok](b.md#title-here) [url](https://example.com/x.md) "
                   "[`code`](b.md) [gone](c.md) [bad](b.md#nope)\n```\n[in code](d.md)\n```\n")
    assert relative_links(doc) == ["b.md#title-here", "b.md", "c.md", "b.md#nope"]
    assert anchors(tmp_path / "b.md") == {"title-here"}


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines: move details to docs/"


def test_every_doc_is_linked_from_the_readme() -> None:
    """A file in docs/ that the README does not link is a file nobody finds."""
    linked = {(README.parent / link.partition("#")[0]).resolve()
              for link in relative_links(README)}
    orphans = [_rel(p) for p in sorted((REPO / "docs").glob("*.md")) if p.resolve() not in linked]
    assert orphans == []


# --- the commands the README shows are the CLI's ------------------------------------------------

def readme_commands() -> list[str]:
    """Sub-commands named in the README's command table (``| `mtls-gateway check ...` |``)."""
    rows = re.findall(r"^\| `mtls-gateway (?:\[(\w+)\]|(\w+))", README.read_text(), re.MULTILINE)
    return [a or b for a, b in rows]


def test_readme_command_table_is_found() -> None:
    assert {"run", "check", "thumbprint", "demo"} <= set(readme_commands())


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_exists(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0, capsys.readouterr().err
    assert f"usage: mtls-gateway {command}" in capsys.readouterr().out


def test_unknown_command_is_told_apart(capsys: pytest.CaptureFixture[str]) -> None:
    """The check above can fail: a word that is no command falls back to ``run`` (the default
    command), whose usage line is not the one the test looks for."""
    with pytest.raises(SystemExit):
        main(["no-such-command", "--help"])
    assert "usage: mtls-gateway no-such-command" not in capsys.readouterr().out


# --- complete gateway.yaml examples load --------------------------------------------------------

_YAML_BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.MULTILINE | re.DOTALL)
_ETC_PATH = re.compile(r"/etc/mtls-gateway/[\w./-]+")


def full_configs() -> list[tuple[str, int, str]]:
    """(file, index, text) of every YAML example that is a whole config: it has the three
    required sections (fragments showing one feature leave some out)."""
    out = []
    for doc in DOCS:
        for index, block in enumerate(_YAML_BLOCK.findall(doc.read_text(encoding="utf-8"))):
            if all(re.search(rf"^{key}:", block, re.MULTILINE)
                   for key in ("listen", "upstream", "routes")):
                out.append((_rel(doc), index, block))
    return out


def test_config_examples_are_found() -> None:
    files = {name for name, _, _ in full_configs()}
    assert {"README.md", "docs/authorization-servers.md"} <= files


@pytest.mark.parametrize(("doc", "index", "text"), full_configs(),
                         ids=[f"{d}[{i}]" for d, i, _ in full_configs()])
def test_config_example_loads(doc: str, index: int, text: str, tmp_path: Path) -> None:
    """Each full example passes the loader once its /etc/mtls-gateway files exist for real."""
    ca = make_ca("docs example CA")
    server = issue_server(ca)
    contents = {".crt": ca.cert_pem, ".key": server.key_pem}

    def real_file(match: re.Match[str]) -> str:
        name = Path(match.group(0))
        path = tmp_path / name.relative_to("/etc/mtls-gateway")
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.name == "tls.crt":
            path.write_bytes(server.cert_pem)
        else:
            path.write_bytes(contents.get(name.suffix, b"example-secret\n"))
        return str(path)

    load_config_text(_ETC_PATH.sub(real_file, text), base_dir=tmp_path)
