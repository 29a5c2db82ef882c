"""bench/ stays runnable: the HAProxy peer's config renders and HAProxy accepts it, and the
bench's raw upstream answers keep-alive and pipelined requests correctly. (Speed itself is
measured in bench/, never asserted here.)"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import jwt  # noqa: E402
import micro as bench_micro  # noqa: E402
import pyload as bench_pyload  # noqa: E402
import run as bench_run  # noqa: E402
import servers as bench_servers  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402


def test_haproxy_config_renders_and_haproxy_accepts_it(tmp_path: Path) -> None:
    m = bench_run.make_material(tmp_path)
    text = bench_run.haproxy_config(m, 18443, 18080)
    for needle in ("verify required", "ssl_c_der,sha2(256),ub64enc", "jwt_verify(txn.alg",
                   str(m.es256_public_pem), "$.cnf.x5t#S256", "strcmp(sess.x5t)",
                   "http-reuse always", "server up 127.0.0.1:18080"):
        assert needle in text
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed: bench/haproxy.cfg.template was rendered but not "
                    "checked by HAProxy (apt-get install -y --no-install-recommends haproxy)")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(text)
    done = subprocess.run([haproxy, "-c", "-f", str(cfg)], capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_pyload_mint_key_resigns_the_token_with_a_new_jti(tmp_path: Path) -> None:
    """``pyload -mint-key`` (row jwt-fresh-es256): every token it sends is a new one, valid
    under the issuer's key, with the original claims (binding included) and a new jti."""
    m = bench_run.make_material(tmp_path)
    assert m.issuer_key is not None
    original = m.tokens["es256"].read_text().strip()
    mint = bench_pyload._minter(str(m.issuer_key), original)
    first, second = mint(), mint()
    assert len({original, first, second}) == 3
    private = serialization.load_pem_private_key(m.issuer_key.read_bytes(), None)
    public = private.public_key()  # type: ignore[union-attr]
    claims = [jwt.decode(t, public, algorithms=["ES256"],  # type: ignore[arg-type]
                         audience=bench_run.AUDIENCE) for t in (original, first, second)]
    assert len({c["jti"] for c in claims}) == 3
    for c in claims[1:]:
        assert {k: v for k, v in c.items() if k != "jti"} == \
            {k: v for k, v in claims[0].items() if k != "jti"}
    assert jwt.get_unverified_header(first) == jwt.get_unverified_header(original)


def test_extra_verify_wraps_authorize_only_when_asked() -> None:
    """``bench/extra_verify`` (row xverify-es256) puts one real ES256 verification before
    ``Pipeline.authorize`` in the process that asks for it, and nowhere else."""
    probe = ("import sys, mtls_gateway.pipeline as p; "
             "print(p.Pipeline.authorize.__name__)")
    env = {"PYTHONPATH": str(BENCH / "extra_verify"), "PATH": "/usr/bin:/bin"}
    on = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                        timeout=60, check=True,
                        env={**env, "MTLS_GATEWAY_BENCH_EXTRA_VERIFY": "1"})
    assert on.stdout.strip() == "_authorize_after_one_verification"
    assert "one extra ES256 verification" in on.stderr
    off = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, check=True, env=env)
    assert off.stdout.strip() == "authorize"
    assert off.stderr == ""


def test_micro_dpop_mode_checks_real_proofs(capsys: pytest.CaptureFixture[str]) -> None:
    """``micro.py --dpop`` runs: every proof it times is accepted by the real verifier and
    every decision it times is an allow (it raises otherwise)."""
    assert bench_micro.dpop_main(100, 1, False) == 0
    out = capsys.readouterr().out
    for needle in ("ES256 verification alone", "DpopVerifier.check, whole",
                   "bound JWT ES256 (dpop-ref-es256)", "added by DPoP"):
        assert needle in out


async def test_raw_upstream_answers_keep_alive_pipelined_and_bodies() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(bench_servers.RawUpstream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhel")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"lo" + b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        answers = []
        for _ in range(3):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            answers.append((head.split(b" ")[1], await reader.readexactly(length)))
        assert answers == [(b"200", bench_servers._BODY)] * 3
        writer.write(b"POST /d HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 400")
        assert await reader.read() == b""      # and the connection is closed
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
