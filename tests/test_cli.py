"""The command line as a user runs it: real subprocesses, real curl against the demo."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gwtest import Pki

REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mtls_gateway", *args], capture_output=True,
                          text=True, timeout=60, env=env, cwd=REPO)


def test_thumbprint_command() -> None:
    result = _cli("thumbprint", "tests/data/rfc8705-appendix-a.pem")
    assert result.returncode == 0
    assert result.stdout.strip() == "A4DtL2JmUMhAsvJj5tKyn64SqzmuXbMrJa0n761y5v0"
    missing = _cli("thumbprint", "nope.pem")
    assert missing.returncode == 1 and "cannot read certificate" in missing.stderr


def test_check_lists_every_problem_with_paths(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "listen": {"cert_file": "missing.crt", "key_file": "missing.key",
                   "client_ca_file": "missing-ca.crt"},
        "upstream": {"url": "http://127.0.0.1:1"},
        "routes": [{"path_prefix": "/", "auth": {"provider": "corp"}}],
    }))
    result = _cli("check", "--config", str(bad))
    assert result.returncode == 2
    for expected in ("listen.cert_file: cannot read", "listen.key_file: cannot read",
                     "listen.client_ca_file: cannot read",
                     'routes[0].auth.provider: unknown provider "corp"'):
        assert expected in result.stderr, result.stderr
    assert "4 problems" in result.stderr


def test_check_accepts_a_valid_config_from_the_environment(pki: Pki, tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({
        "listen": {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key),
                   "client_ca_file": str(pki.ca_file)},
        "upstream": {"url": "http://127.0.0.1:1"},
        "routes": [{"path_prefix": "/", "auth": "none"}],
    }))
    result = _cli("check", env={**os.environ, "MTLS_GATEWAY_CONFIG": str(good)})
    assert result.returncode == 0, result.stderr
    assert "OK (1 routes, 0 providers)" in result.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed: the demo "
                    "prints curl commands and this test runs them as a user would")
def test_demo_comes_up_and_its_curl_commands_work(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "mtls_gateway", "demo", "--port", "0",
                             "--dir", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if line.startswith("Demo ready."):
                break
        assert lines and lines[-1].startswith("Demo ready."), "\n".join(lines)
        commands = [line for line in lines if line.startswith("curl ")]
        assert len(commands) == 6
        outputs = [subprocess.run(["bash", "-c", c], capture_output=True, text=True,
                                  timeout=30).stdout for c in commands]
        ok = json.loads(outputs[0])
        assert ok["upstream"] == "echo" and ok["path"] == "/accounts/42"
        assert ok["headers"]["X-Auth-Subject"] == "alice"
        assert outputs[1].startswith("HTTP/1.1 401")
        assert 'error="invalid_token"' in outputs[1] and "binding_mismatch" in outputs[1]
        assert outputs[2].startswith("HTTP/1.1 401") and "error=" not in outputs[2]
        assert outputs[3].startswith("HTTP/1.1 403") and "insufficient_scope" in outputs[3]
        assert json.loads(outputs[4])["path"] == "/public/status"
        bob_token = json.loads(outputs[5])["access_token"]
        # bob's fresh token works with bob's certificate: the demo issuer binds what it sees
        bob_call = commands[0].replace("alice.crt", "bob.crt").replace("alice.key", "bob.key")
        bob_call = bob_call.replace(f"$(cat {tmp_path / 'alice.token'})", bob_token)
        assert json.loads(subprocess.run(["bash", "-c", bob_call], capture_output=True,
                                         text=True, timeout=30).stdout)["headers"][
            "X-Auth-Subject"] == "bob"
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, rest
    assert "demo stopped" in rest


# --- start-up failures are one message, never a traceback (issue 20) --------------------------

def _config_file(pki: Pki, tmp_path: Path, **listen: object) -> Path:
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump({
        "listen": {"host": "127.0.0.1", "cert_file": str(pki.server_cert),
                   "key_file": str(pki.server_key), "client_ca_file": str(pki.ca_file),
                   **listen},
        "admin": {"enabled": False},
        "upstream": {"url": "http://127.0.0.1:1"},
        "routes": [{"path_prefix": "/", "auth": "none"}],
    }))
    return path


def test_port_in_use_is_a_message(pki: Pki, tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _cli("run", "--config", str(_config_file(pki, tmp_path, port=port)))
    assert result.returncode == 2
    assert f"listen.port: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "another process listens there" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_unresolvable_host_is_a_message(pki: Pki, tmp_path: Path) -> None:
    result = _cli("run", "--config", str(_config_file(pki, tmp_path, host="gateway.invalid",
                                                      port=0)))
    assert result.returncode == 2
    assert "listen.host: cannot resolve 'gateway.invalid'" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize(("content", "expected"), [
    (b"listen: {}\nrealm: caf\xe9\n", "is not UTF-8 text"),
    (b"a: " + b"[" * 3000 + b"]" * 3000, "nested deeper than 64 levels"),
    (b"listen: {port: 1}\nlisten: {port: 2}\n", "listen: duplicate key"),
])
def test_unreadable_config_text_is_a_message(tmp_path: Path, content: bytes,
                                             expected: str) -> None:
    path = tmp_path / "gw.yaml"
    path.write_bytes(content)
    for command in ("run", "check"):
        result = _cli(command, "--config", str(path))
        assert result.returncode == 2 and expected in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.skipif(os.geteuid() == 65532, reason="the image's own user reads what it reads")
def test_check_flags_files_the_image_user_cannot_read(pki: Pki, tmp_path: Path) -> None:
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="mtls-gw-check-"))   # outside pytest's 0700 folder
    try:
        if any(not os.stat(p).st_mode & 0o001 for p in folder.parents):
            pytest.skip(f"{tempfile.gettempdir()} is not searchable by others here")
        folder.chmod(0o755)
        files = {}
        for name, source in (("server.crt", pki.server_cert), ("server.key", pki.server_key),
                             ("ca.crt", pki.ca_file)):
            files[name] = folder / name
            files[name].write_bytes(source.read_bytes())
            files[name].chmod(0o644)
        files["server.key"].chmod(0o600)
        path = _config_file(pki, tmp_path, cert_file=str(files["server.crt"]),
                            key_file=str(files["server.key"]),
                            client_ca_file=str(files["ca.crt"]))
        warned = _cli("check", "--config", str(path))
        assert warned.returncode == 0
        assert warned.stderr.count("warning:") == 1, warned.stderr
        assert "warning: listen.key_file:" in warned.stderr and "mode 0600" in warned.stderr
        failed = _cli("check", "--config", str(path), "--run-as", "65532:65532")
        assert failed.returncode == 2
        assert "listen.key_file:" in failed.stderr
        assert "for uid 65532 gid 65532" in failed.stderr
        if os.geteuid() == 0:       # chgrp to a group we are not in needs root
            files["server.key"].chmod(0o640)
            os.chown(files["server.key"], 0, 65532)     # Kubernetes' fsGroup way
        else:
            files["server.key"].chmod(0o644)
        assert _cli("check", "--config", str(path), "--run-as", "65532:65532").returncode == 0
    finally:
        shutil.rmtree(folder)
def test_workers_refuse_an_in_process_dpop_replay_store(pki: Pki, tmp_path: Path) -> None:
    """Each worker would keep its own replay cache: a proof replayed to another worker would
    pass. A shared (redis) store is required instead (docs/dpop.md)."""
    config = tmp_path / "dpop.yaml"
    config.write_text(yaml.safe_dump({
        "listen": {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key),
                   "client_ca_file": str(pki.ca_file), "port": 18443},
        "providers": {"corp": {"type": "jwt", "issuer": "https://i.test",
                               "audiences": ["https://api.test"],
                               "jwks_uri": "https://i.test/jwks"}},
        "upstream": {"url": "http://127.0.0.1:1"},
        "routes": [{"path_prefix": "/", "auth": {"provider": "corp",
                                                 "sender_constraint": "dpop"}}],
    }))
    result = _cli("run", "--config", str(config), "--workers", "2")
    assert result.returncode == 2
    assert "needs a shared dpop.replay_store" in result.stderr
