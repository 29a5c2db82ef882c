"""What each piece of the gateway's request path costs, in one process, in microseconds.

    .venv/bin/python bench/micro.py [--rounds 5] [--seconds 0.2]
    .venv/bin/python bench/micro.py --dpop [--proofs 2000] [--rounds 5] [--profile]

Companion to ``bench/run.py``: that one measures whole requests through real sockets; this
one times the gateway's own per-request pieces in isolation (token verification, the
decision log line, metrics, header copying, the per-connection certificate parse). Each is
also given as a multiple of a primitive measured in the same run (one raw RSA-2048 signature
verification with ``cryptography``), so figures compare within a run on a noisy machine.

Rows are measured round-robin (``--rounds`` passes over all rows, each pass bounded in time
and count) and each row keeps its fastest pass, so a burst of noise hits one pass of every
row rather than every pass of one row. Hot-loop figures are lower bounds: inside the real
server, with cold caches between requests, the same code costs more (see bench/README.md).
Nothing listens on any port.

``--dpop`` (issue 19) times one DPoP proof check instead: a :class:`DpopVerifier` built
once checks fresh proofs (a real P-256 key, real signatures, a new ``jti`` each, all signed
before the timed loop), in CPU time (``time.process_time``), split into the ES256
verification alone (the call ``bench/run.py``'s ``es256_verify_us`` times, same key, same
run) and the rest, as ratios to that verification. ``--profile`` adds a cProfile listing
of the check loop.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import cProfile
import hashlib
import io
import json
import logging
import pstats
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import jwt
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from jwt.algorithms import ECAlgorithm
from jwt.api_jws import PyJWS
from multidict import CIMultiDict, CIMultiDictProxy

from mtls_gateway.bearer import bearer_token
from mtls_gateway.config import DpopConfig
from mtls_gateway.config_load import load_config
from mtls_gateway.decision_log import (
    configure_logging,
    log_decision,
    stop_logging,
    token_digest,
    token_hash,
)
from mtls_gateway.dpop import DpopVerifier, ProofRequest
from mtls_gateway.fastlane import parse_plain
from mtls_gateway.gateway import Gateway
from mtls_gateway.metrics import Metrics
from mtls_gateway.pipeline import ConnectionMemo, RequestView
from mtls_gateway.proxy import strip_hop_by_hop
from mtls_gateway.tls import peer_certificate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import AUDIENCE, ISSUER, Material, gateway_config, make_material

MAX_CALLS = 100_000   # per pass and row


def completed(coro: Coroutine[Any, Any, object]) -> object:
    """Run a coroutine that never suspends (no I/O) to its end without an event loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("the coroutine waited for I/O")


def pass_us(fn: Callable[[], object], seconds: float) -> float:
    """Microseconds per call over one pass bounded by ``seconds`` and MAX_CALLS."""
    calls, started = 0, time.perf_counter()
    deadline = started + seconds
    while calls < MAX_CALLS:
        for _ in range(10):
            fn()
        calls += 10
        if time.perf_counter() > deadline:
            break
    return (time.perf_counter() - started) / calls * 1e6


class _Connection:
    """Stands in for an asyncio transport and its SSLObject: a new one per call, so
    ``peer_certificate`` does its once-per-connection work every time."""

    def __init__(self, der: bytes) -> None:
        self._der = der

    def get_extra_info(self, name: str) -> object:
        return self if name == "ssl_object" else None

    def getpeercert(self, binary_form: bool = False) -> bytes:
        return self._der


@contextlib.contextmanager
def stdout_to(path: Path) -> Iterator[None]:
    """Point sys.stdout at a file while the decision log handler is created and used."""
    saved = sys.stdout
    with path.open("w") as fh:
        sys.stdout = fh
        try:
            yield
        finally:
            sys.stdout = saved


Row = tuple[str, Callable[[], object], str]


def rows_for(m: Material) -> list[Row]:
    config = gateway_config(m, "http://127.0.0.1:9", "https://127.0.0.1:9/introspect")
    config_path = m.dir / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(config))
    cached = Gateway(load_config(config_path), Metrics()).verifiers["jwt"]
    config["providers"]["jwt"]["verify_cache_size"] = 0   # every call checks the signature
    config_path.write_text(yaml.safe_dump(config))
    verifier = Gateway(load_config(config_path), Metrics()).verifiers["jwt"]
    rs_token = m.tokens["rs256"].read_text().strip()
    es_token = m.tokens["es256"].read_text().strip()
    rs_digest, es_digest = token_digest(rs_token), token_digest(es_token)
    rsa_jwk = jwt.PyJWK(m.jwks["keys"][0], algorithm="RS256")
    ec_jwk = jwt.PyJWK(m.jwks["keys"][1], algorithm="ES256")

    def raw_parts(token: str) -> tuple[bytes, bytes]:
        head, body, sig = token.split(".")
        return f"{head}.{body}".encode(), base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))

    rs_signed, rs_sig = raw_parts(rs_token)
    es_signed, es_raw = raw_parts(es_token)
    half = len(es_raw) // 2
    es_sig = encode_dss_signature(int.from_bytes(es_raw[:half], "big"),
                                  int.from_bytes(es_raw[half:], "big"))
    rsa_pub, ec_pub = rsa_jwk.key, ec_jwk.key
    plain = jwt.PyJWT()
    segments = [s.encode() for s in rs_token.split(".")]
    headers = CIMultiDictProxy(CIMultiDict({
        "Host": "127.0.0.1:8443", "User-Agent": "mtlsload", "Authorization": f"Bearer {rs_token}",
        "Accept": "*/*", "X-Request-Id": "abc"}))
    no_query: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
    metrics = Metrics()

    def record_metrics() -> None:
        metrics.requests.labels("jwt", "allow", "allowed", "200").inc()
        metrics.request_seconds.labels("jwt").observe(0.001)
        metrics.upstream_seconds.labels("jwt").observe(0.001)

    fields: dict[str, Any] = {
        "decision": "allow", "reason": "allowed", "status": 200, "route": "jwt",
        "provider": "jwt", "method": "GET", "path": "/jwt/x", "remote": "127.0.0.1",
        "token_hash": "0123456789ab", "client_thumbprint": "x" * 43,
        "client_subject": "CN=alice,O=mtls-gateway test", "latency_ms": 1.234}
    cert_der = x509.load_pem_x509_certificate(m.certs["alice"][0].read_bytes()).public_bytes(
        serialization.Encoding.DER)
    return [
        ("raw RSA-2048 PKCS#1 v1.5 verify (cryptography)",
         lambda: rsa_pub.verify(rs_sig, rs_signed, padding.PKCS1v15(), hashes.SHA256()),
         "reference"),
        ("raw ECDSA P-256 verify (cryptography)",
         lambda: ec_pub.verify(es_sig, es_signed, ec.ECDSA(hashes.SHA256())), ""),
        ("pyjwt decode RS256 (signature + claims)",
         lambda: plain.decode(rs_token, key=rsa_jwk, algorithms=["RS256"], audience=AUDIENCE,
                              issuer=ISSUER), ""),
        ("pyjwt decode ES256 (signature + claims)",
         lambda: plain.decode(es_token, key=ec_jwk, algorithms=["ES256"], audience=AUDIENCE,
                              issuer=ISSUER), ""),
        ("  pyjwt's base64url alphabet check alone (RS256 token)",
         lambda: [PyJWS._decode_base64url_segment(s, "segment") for s in segments],
         f"{len(rs_token)} chars, a Python step each"),
        ("gateway JwtVerifier.verify RS256",
         lambda: completed(verifier.verify(rs_token, rs_digest)), "a new token (cache miss)"),
        ("gateway JwtVerifier.verify ES256",
         lambda: completed(verifier.verify(es_token, es_digest)), "a new token (cache miss)"),
        ("gateway JwtVerifier.verify, cache hit",
         lambda: completed(cached.verify(rs_token, rs_digest)), "a reused token"),
        ("bearer_token (Authorization parsing)", lambda: bearer_token(headers, no_query),
         "per request"),
        ("token_digest + token_hash (SHA-256, once)",
         lambda: token_hash(rs_token, token_digest(rs_token)), "per request with a token"),
        ("strip_hop_by_hop (5 request headers)",
         lambda: strip_hop_by_hop(headers, frozenset({"x-auth-subject"})),
         "twice per request"),
        ("metrics: requests.labels().inc() + 2 histogram observes", record_metrics,
         "per request"),
        ("decision log line (enqueue here; a thread writes JSON)", lambda: log_decision(**fields),
         "per request"),
        ("peer_certificate on a new connection", lambda: peer_certificate(
            _Connection(cert_der)), "once per connection"),
    ]


# --- --dpop: one proof check, split into the signature and the rest ---------------------------

def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _proofs(key: ec.EllipticCurvePrivateKey, count: int, htu: str, token: str) -> list[str]:
    """``count`` fresh ES256 proofs for ``GET htu``, as a client library signs them: one
    header (the client's key) for all, a new ``jti`` and the current ``iat`` each."""
    jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    head = _b64(json.dumps({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk},
                           separators=(",", ":")).encode())
    ath = _b64(hashlib.sha256(token.encode()).digest())
    out = []
    for _ in range(count):
        body = _b64(json.dumps({"jti": uuid.uuid4().hex, "htm": "GET", "htu": htu,
                                "iat": int(time.time()), "ath": ath},
                               separators=(",", ":")).encode())
        r, s = decode_dss_signature(key.sign(f"{head}.{body}".encode(),
                                             ec.ECDSA(hashes.SHA256())))
        out.append(f"{head}.{body}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}")
    return out


def dpop_main(count: int, rounds: int, profile: bool) -> int:
    """CPU microseconds per proof check: the ES256 verification alone and the rest."""
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jkt = _b64(hashlib.sha256(json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")},
                                         separators=(",", ":")).encode()).digest())
    token = "eyJhbGciOiJFUzI1NiJ9." + "A" * 600 + ".sig"     # an access token's size
    proofs = _proofs(key, count * (rounds + 1), "https://127.0.0.1:8443/dpop/x",
                     token)
    # a private in-process replay store (monotonic given), as large as bench/run.py's
    verifier = DpopVerifier(DpopConfig(replay_cache_size=1_000_000), monotonic=time.monotonic)
    request = ProofRequest("GET", "/dpop/x", "127.0.0.1:8443", "https", token,
                           hashlib.sha256(token.encode()).digest())
    alg, public = ECAlgorithm(ECAlgorithm.SHA256), key.public_key()
    signed = []
    for proof in proofs[:count]:
        head, body, sig = proof.split(".")
        signed.append((f"{head}.{body}".encode(), base64.urlsafe_b64decode(sig + "==")))

    def check(batch: list[str]) -> None:
        for proof in batch:
            completed(verifier.check((proof,), request, expected_jkt=jkt, nonce_required=False))

    def verify_alone() -> None:
        for message, signature in signed:
            if not alg.verify(message, public, signature):
                raise RuntimeError("ES256 verification failed")

    batches = [proofs[i * count:(i + 1) * count] for i in range(rounds + 1)]
    check(batches[0])      # warm-up: the key and header caches, the code paths
    verify_alone()
    verify_us, check_us = [], []
    for i in range(rounds):  # interleaved: noise hits both
        started = time.process_time()
        verify_alone()
        verify_us.append((time.process_time() - started) / count * 1e6)
        started = time.process_time()
        check(batches[1 + i])
        check_us.append((time.process_time() - started) / count * 1e6)
    # the whole decision as the fast lane makes it (head parsing included), a DPoP request
    # against the bound-JWT request bench/run.py's dpop-ref-es256 row sends
    with tempfile.TemporaryDirectory(prefix="mtls-gateway-micro-") as tmp, \
            contextlib.redirect_stderr(io.StringIO()):
        m = make_material(Path(tmp))
        config_path = m.dir / "gateway.yaml"
        config_path.write_text(yaml.safe_dump(gateway_config(
            m, "http://127.0.0.1:9", "https://127.0.0.1:9/introspect")))
        gateway = Gateway(load_config(config_path), Metrics())
        assert m.dpop_key is not None
        client_key = serialization.load_pem_private_key(m.dpop_key.read_bytes(), None)
        assert isinstance(client_key, ec.EllipticCurvePrivateKey)
        cert_der = x509.load_pem_x509_certificate(m.certs["alice"][0].read_bytes()).public_bytes(
            serialization.Encoding.DER)
        es_token = m.tokens["es256"].read_text().strip()
        dpop_token = m.tokens["dpop-es256"].read_text().strip()
    peer = peer_certificate(_Connection(cert_der))
    common = b"Host: 127.0.0.1:8443\r\nUser-Agent: pyload\r\nAccept: */*\r\n"
    ref_head = (b"GET /jwt/x HTTP/1.1\r\n" + common
                + f"Authorization: Bearer {es_token}".encode())
    dpop_heads = [b"GET /dpop/x HTTP/1.1\r\n" + common
                  + f"Authorization: DPoP {dpop_token}\r\nDPoP: {proof}".encode()
                  for proof in _proofs(client_key, count * (rounds + 1 + profile),
                                       "https://127.0.0.1:8443/dpop/x", dpop_token)]
    pipeline, memos = gateway.pipeline, (ConnectionMemo(), ConnectionMemo())

    def decide(heads: list[bytes], memo: ConnectionMemo, reason: str) -> None:
        for head in heads:
            request = parse_plain(head, max_headers=100, max_line=8190)
            assert request is not None
            view = RequestView(request.method, request.raw_path, request.path, request.host,
                               request.authorization, request.dpop, False, "https",
                               "127.0.0.1", memo, lambda: peer)
            decision = completed(pipeline.decide(view))
            if getattr(decision, "reason", None) != reason:
                raise RuntimeError(f"not allowed: {decision}")

    decide([ref_head] * 10, memos[0], "allowed")
    decide(dpop_heads[:count], memos[1], "allowed")
    ref_us, dpop_us = [], []
    for i in range(rounds):
        started = time.process_time()
        decide([ref_head] * count, memos[0], "allowed")
        ref_us.append((time.process_time() - started) / count * 1e6)
        started = time.process_time()
        decide(dpop_heads[(i + 1) * count:(i + 2) * count], memos[1], "allowed")
        dpop_us.append((time.process_time() - started) / count * 1e6)

    verify, total = sorted(verify_us)[rounds // 2], sorted(check_us)[rounds // 2]
    rest = total - verify
    ref, whole = sorted(ref_us)[rounds // 2], sorted(dpop_us)[rounds // 2]
    added = whole - ref
    print(f"python {sys.version.split()[0]}; {count} fresh ES256 proofs per round, median of "
          f"{rounds} interleaved rounds, CPU time")
    print(f"  ES256 verification alone        {verify:6.1f} us   1.00 x verification")
    print(f"  DpopVerifier.check, whole       {total:6.1f} us   {total / verify:4.2f} x")
    print(f"  the rest (whole - verification) {rest:6.1f} us   {rest / verify:4.2f} x")
    print("  one decision (parse_plain + Pipeline.decide), as the fast lane makes it:")
    print(f"    bound JWT ES256 (dpop-ref-es256)   {ref:6.1f} us")
    print(f"    DPoP-bound JWT + fresh proof        {whole:6.1f} us")
    print(f"    added by DPoP                       {added:6.1f} us   {added / verify:4.2f} x "
          f"verification (bench/run.py's target: <= {1.5:.1f} x)")
    print(f"    added minus the verification        {added - verify:6.1f} us   "
          f"{(added - verify) / verify:4.2f} x")
    if profile:
        profiler = cProfile.Profile()
        profiler.runcall(decide, dpop_heads[-count:], memos[1], "allowed")
        print("\ncProfile of the DPoP decisions (fresh proofs):")
        stats = pstats.Stats(profiler, stream=sys.stdout)
        stats.sort_stats("tottime").print_stats(30)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="passes over all rows (default 5)")
    p.add_argument("--seconds", type=float, default=0.2,
                   help="time per row and pass (default 0.2, at most 2)")
    p.add_argument("--dpop", action="store_true",
                   help="time one DPoP proof check instead (signature vs the rest)")
    p.add_argument("--proofs", type=int, default=2000,
                   help="--dpop: proofs per round (default 2000)")
    p.add_argument("--profile", action="store_true", help="--dpop: add a cProfile listing")
    args = p.parse_args()
    if args.dpop:
        return dpop_main(min(max(args.proofs, 100), 50_000), min(max(args.rounds, 1), 20),
                         args.profile)
    rounds, seconds = min(max(args.rounds, 1), 20), min(max(args.seconds, 0.02), 2.0)
    with tempfile.TemporaryDirectory(prefix="mtls-gateway-micro-") as tmp, \
            contextlib.redirect_stderr(io.StringIO()):
        m = make_material(Path(tmp))
        rows = rows_for(m)
        best = [float("inf")] * len(rows)
        with stdout_to(m.dir / "decisions.log"):
            configure_logging("INFO")  # the gateway's own handlers: the loop only enqueues
            for _ in range(rounds):
                for i, (_name, fn, _when) in enumerate(rows):
                    best[i] = min(best[i], pass_us(fn, seconds))
            stop_logging()  # the writer thread drains its queue into the file, then stops
            logging.getLogger().handlers.clear()
    ref = best[0]
    print(f"python {sys.version.split()[0]}; fastest of {rounds} interleaved passes of "
          f"{seconds}s per row")
    print(f"{'piece':<58} {'us':>7} {'x ref':>6}  when")
    for (name, _fn, when), us in zip(rows, best, strict=True):
        print(f"{name:<58} {us:>7.1f} {us / ref:>6.2f}  {when}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
