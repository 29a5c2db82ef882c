"""A real DPoP client for the tests (RFC 9449 section 4.2), and a real redis-server.

:class:`DpopKey` holds a private key and signs proofs with pyjwt, as a client library
would; the knobs let a test break exactly one thing in a proof. :class:`RedisServer`
runs ``redis-server`` on 127.0.0.1 on a free port (installed by the project's own test
setup when missing, as nginx and HAProxy are: see debian_tools.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from debian_tools import debian_program

__all__ = ["DpopKey", "RedisServer", "b64url"]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class DpopKey:
    """A client's DPoP key pair; ``alg`` is the algorithm it signs with."""

    private: Any
    alg: str

    @classmethod
    def generate(cls, alg: str = "ES256") -> DpopKey:
        if alg.startswith("ES"):
            curve = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(),
                     "ES512": ec.SECP521R1()}[alg]
            return cls(ec.generate_private_key(curve), alg)
        if alg == "EdDSA":
            return cls(ed25519.Ed25519PrivateKey.generate(), alg)
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048), alg)

    @property
    def public_jwk(self) -> dict[str, Any]:
        pub = self.private.public_key()
        if isinstance(pub, ec.EllipticCurvePublicKey):
            return ECAlgorithm.to_jwk(pub, as_dict=True)
        if isinstance(pub, ed25519.Ed25519PublicKey):
            return OKPAlgorithm.to_jwk(pub, as_dict=True)
        return RSAAlgorithm.to_jwk(pub, as_dict=True)

    @property
    def private_jwk(self) -> dict[str, Any]:
        key = self.private
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return ECAlgorithm.to_jwk(key, as_dict=True)
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return OKPAlgorithm.to_jwk(key, as_dict=True)
        return RSAAlgorithm.to_jwk(key, as_dict=True)

    @property
    def thumbprint(self) -> str:
        """RFC 7638, computed here independently of the gateway's code."""
        jwk = self.public_jwk
        members = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"),
                   "OKP": ("crv", "kty", "x")}[jwk["kty"]]
        canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"))
        return b64url(hashlib.sha256(canonical.encode()).digest())

    def proof(self, method: str, url: str, token: str | None = None, *,
              iat: float | None = None, nonce: str | None = None, jti: str | None = None,
              claims: dict[str, Any] | None = None, header: dict[str, Any] | None = None,
              drop: tuple[str, ...] = (), signer: DpopKey | None = None) -> str:
        """A proof for ``method url``: ``claims``/``header`` override members, ``drop``
        removes claims, ``signer`` signs with another key (the header keeps ours)."""
        body: dict[str, Any] = {"jti": jti or uuid.uuid4().hex, "htm": method, "htu": url,
                                "iat": int(time.time() if iat is None else iat)}
        if token is not None:
            body["ath"] = b64url(hashlib.sha256(token.encode()).digest())
        if nonce is not None:
            body["nonce"] = nonce
        body.update(claims or {})
        for name in drop:
            body.pop(name, None)
        head = {"typ": "dpop+jwt", "jwk": self.public_jwk, **(header or {})}
        head = {k: v for k, v in head.items() if v is not None}
        return jwt.encode(body, (signer or self).private, algorithm=self.alg, headers=head)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """``redis-server`` on 127.0.0.1, no persistence; stopped by :meth:`stop`."""

    def __init__(self, workdir: Path) -> None:
        self.program = debian_program("redis-server", "redis-server")
        self.workdir = workdir
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [self.program, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
