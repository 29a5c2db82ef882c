"""docs/authorization-servers.md's node-oidc-provider recipe, run as the document shows it.

The JavaScript block under "node-oidc-provider (tested)" and the gateway.yaml of "The token
endpoint behind the gateway" are read from the document. Only what must differ on a test
machine is replaced: the client CA file, the client's subject, the issuer and the ports
(every replacement must find its text, so the document cannot drift away from this test).
Then, through a real gateway on 127.0.0.1:

client --mTLS--> gateway /token --Client-Cert--> recipe AS (plain HTTP, loopback): bound JWT
"""

from __future__ import annotations

import base64
import json
import re
import select
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import jwt
import pytest

from gwtest import Reply, Upstream
from mtls_gateway.app import GatewayServer
from mtls_gateway.config_load import load_config_text
from oidc_server import INTEROP_DIR, InteropPKI, client_ssl_context, ensure_node_modules

DOC = Path(__file__).resolve().parents[2] / "docs" / "authorization-servers.md"
API = "https://api.example.com"


def doc_block(heading: str, language: str) -> str:
    """The first ``language`` code block after the heading that starts with ``heading``."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index(f"\n{heading}")
    match = re.compile(rf"^```{language}\n(.*?)^```", re.MULTILINE | re.DOTALL).search(text, start)
    assert match is not None, f"no {language} block after {heading!r} in {DOC}"
    return match.group(1)


def replace_all(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in text, f"the document no longer contains {old!r}: update this test"
        text = text.replace(old, new)
    return text


def read_ready(proc: subprocess.Popen[str], timeout: float) -> int:
    """Port from the ``READY <port>`` line the patched recipe prints once it listens."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("READY "):
            return int(line.split()[1])
    raise AssertionError(f"the recipe AS did not start (exit code {proc.poll()})")


@pytest.fixture
def recipe_as(interop_pki: InteropPKI, tmp_path: Path) -> Iterator[str]:
    """The document's node-oidc-provider recipe, listening on 127.0.0.1; yields its URL."""
    if shutil.which("node") is None:   # as the other interop tests: skip loudly, only for this
        pytest.skip("Node.js not found: the recipe runs node-oidc-provider. Install Node.js >= 20.")
    ensure_node_modules()
    script = replace_all(doc_block("### node-oidc-provider", "js"), {
        "'/etc/as/client-ca.crt'": json.dumps(str(interop_pki.ca_file)),
        "'CN=client-a,O=Example Bank,C=GB'": json.dumps(interop_pki.client_a.subject_dn),
        "http.createServer(provider.callback()).listen(9000, '127.0.0.1');":
            "const server = http.createServer(provider.callback());\n"
            "server.listen(0, '127.0.0.1', () => "
            "process.stdout.write(`READY ${server.address().port}\\n`));\n"
            "process.stdin.on('end', () => process.exit(0));\nprocess.stdin.resume();\n",
    })
    (tmp_path / "node_modules").symlink_to(INTEROP_DIR / "node_modules")
    (tmp_path / "recipe.mjs").write_text(script)
    with (tmp_path / "recipe.stderr").open("w") as stderr:
        proc = subprocess.Popen(["node", str(tmp_path / "recipe.mjs")], cwd=tmp_path,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                text=True)
    try:
        port = read_ready(proc, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


@dataclass
class RecipeGateway:
    url: str
    pki: InteropPKI
    upstream: Upstream

    async def token(self, client: str, client_id: str, headers: dict[str, str] | None = None,
                    ) -> Reply:
        identity = getattr(self.pki, client)
        connector = aiohttp.TCPConnector(ssl=client_ssl_context(self.pki.ca_file, identity),
                                         force_close=True)
        async with aiohttp.ClientSession(connector=connector,
                                         timeout=aiohttp.ClientTimeout(total=20)) as s, \
                s.post(self.url + "/token", headers=headers or {},
                       data={"grant_type": "client_credentials", "client_id": client_id,
                             "scope": "accounts:read"}) as r:
            return Reply(r.status, r.headers, await r.read())


@pytest.fixture
async def recipe_gateway(recipe_as: str, interop_pki: InteropPKI, upstream: Upstream,
                         tmp_path: Path) -> AsyncIterator[RecipeGateway]:
    """The document's gateway.yaml for the token endpoint, in front of the recipe AS."""
    config = replace_all(doc_block("## The token endpoint behind the gateway", "yaml"), {
        "listen:\n  port: 8443\n": "listen:\n  host: 127.0.0.1\n  port: 0\n",
        "/etc/mtls-gateway/tls/tls.crt": str(interop_pki.server_cert),
        "/etc/mtls-gateway/tls/tls.key": str(interop_pki.server_key),
        "/etc/mtls-gateway/tls/client-ca.crt": str(interop_pki.ca_file),
        '"CN=client-a,O=Example Bank,C=GB"': json.dumps(interop_pki.client_a.subject_dn),
        "http://127.0.0.1:8080": upstream.url,
        "http://127.0.0.1:9000": recipe_as,
    }) + "admin: {enabled: false}\n"
    server = GatewayServer(load_config_text(config, base_dir=tmp_path))
    await server.start()
    try:
        yield RecipeGateway(f"https://127.0.0.1:{server.port}", interop_pki, upstream)
    finally:
        await server.stop()


def claims(reply: Reply) -> dict[str, object]:
    assert reply.status == 200, reply.body
    token = reply.json()["access_token"]
    decoded: dict[str, object] = jwt.decode(token, options={"verify_signature": False})
    return decoded


async def test_recipe_issues_a_token_bound_to_the_client_certificate(
        recipe_gateway: RecipeGateway, interop_pki: InteropPKI) -> None:
    got = claims(await recipe_gateway.token("client_a", "client-a"))
    assert got["cnf"] == {"x5t#S256": interop_pki.client_a.thumbprint}
    assert (got["client_id"], got["aud"], got["scope"]) == ("client-a", API, "accounts:read")
    assert recipe_gateway.upstream.seen == []     # the token route went to the AS only


async def test_recipe_behind_the_gateway_refuses_another_certificate(
        recipe_gateway: RecipeGateway) -> None:
    reply = await recipe_gateway.token("client_b", "client-a")
    assert reply.status == 401, reply.body
    assert (reply.json()["error"], reply.json()["reason"]) == (
        "invalid_client", "client_cert_mismatch")


async def test_forged_client_cert_sent_to_the_gateway_changes_nothing(
        recipe_gateway: RecipeGateway, interop_pki: InteropPKI) -> None:
    """Half one of the trust rule: the gateway replaces any inbound Client-Cert."""
    forged = f":{base64.b64encode(interop_pki.client_b.cert_der).decode()}:"
    got = claims(await recipe_gateway.token("client_a", "client-a", {"Client-Cert": forged}))
    assert got["cnf"] == {"x5t#S256": interop_pki.client_a.thumbprint}
