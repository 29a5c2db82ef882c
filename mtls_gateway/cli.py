"""``mtls-gateway``: run (default), check, explain, thumbprint, demo."""

from __future__ import annotations

import argparse
import os
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import AuthPolicy, GatewayConfig
from .config_load import load_config, unreadable_files
from .errors import ConfigError

__all__ = ["main"]

_COMMANDS = ("run", "check", "explain", "thumbprint", "demo")
_CONFIG_ENV = "MTLS_GATEWAY_CONFIG"
#: USER of the Dockerfile's final stage: the files the config names must be readable by it.
IMAGE_USER = (65532, 65532)


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", type=Path,
        default=Path(os.environ.get(_CONFIG_ENV, "gateway.yaml")),
        help=f"path to gateway.yaml (default: ${_CONFIG_ENV} or ./gateway.yaml)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtls-gateway",
        description="Reverse proxy that enforces RFC 8705 certificate-bound access tokens.")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="serve with a config file (the default command)")
    _config_arg(run)
    run.add_argument("--workers", "-w", type=int,
                     default=int(os.environ.get("MTLS_GATEWAY_WORKERS", "1")),
                     help="processes sharing the listening port via SO_REUSEPORT "
                          "(default: $MTLS_GATEWAY_WORKERS or 1)")
    check = sub.add_parser("check", help="validate a config file and list every problem")
    _config_arg(check)
    check.add_argument("--run-as", metavar="UID:GID", default=None,
                       help="also fail when a file the config names is unreadable by this "
                            f"user (without it: warn for the container image's user, "
                            f"{IMAGE_USER[0]}:{IMAGE_USER[1]})")
    _explain_parser(sub.add_parser(
        "explain", help="say what the gateway would answer to a request, and why",
        description="Run the gateway's own decision on one request (no upstream call) and "
                    "print every check with the values it compared. Exit 0: allowed, "
                    "1: refused, 2: usage or config error, 3: undetermined (--offline)."))
    thumb = sub.add_parser("thumbprint", help="print the x5t#S256 of a certificate")
    thumb.add_argument("cert", type=Path, help="PEM or DER certificate file")
    demo = sub.add_parser("demo", help="a complete local setup to try with curl")
    demo.add_argument("--dir", type=Path, default=None,
                      help="folder for the generated certificates and tokens "
                           "(default: a temporary folder, removed on exit)")
    demo.add_argument("--port", type=int, default=8443, help="gateway port (default 8443)")
    return parser


def _explain_parser(explain: argparse.ArgumentParser) -> None:
    _config_arg(explain)
    explain.add_argument("method", help="request method, e.g. GET")
    explain.add_argument("target", help="request path (with its query), or a whole URL "
                                        "whose authority is then the Host")
    explain.add_argument("--cert", type=Path, default=None,
                         help="the client certificate (PEM) the request comes with")
    token = explain.add_mutually_exclusive_group()
    token.add_argument("--token", default=None, help="the access token ('-': stdin)")
    token.add_argument("--token-file", type=Path, default=None,
                       help="file holding the access token ('-': stdin)")
    explain.add_argument("--scheme", choices=("Bearer", "DPoP"), default=None,
                         help="Authorization scheme (default: DPoP with --dpop-proof, "
                              "else Bearer)")
    explain.add_argument("--dpop-proof", default=None, help="the DPoP header (a proof JWT)")
    explain.add_argument("--host", default=None,
                         help="the Host header (default: the URL's, else listen.host:port)")
    explain.add_argument("--offline", action="store_true",
                         help="no network: inline keys only; says which checks it could "
                              "not make")
    explain.add_argument("--json", action="store_true", help="machine-readable output")


def _run_explain(args: argparse.Namespace, config: GatewayConfig) -> int:
    import asyncio

    from .explain import EXIT_USAGE, explain, peer_from_pem, render_text

    try:
        token = args.token
        if token == "-" or (args.token_file is not None and str(args.token_file) == "-"):
            token = sys.stdin.read()
        elif args.token_file is not None:
            token = args.token_file.read_text()
        token = token.strip() if token is not None else None
        peer = peer_from_pem(args.cert.read_bytes()) if args.cert is not None else None
    except (OSError, ValueError) as exc:
        print(f"mtls-gateway explain: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = asyncio.run(explain(config, args.method, args.target, token=token,
                                     scheme=args.scheme, dpop_proof=args.dpop_proof,
                                     host=args.host, peer=peer, offline=args.offline))
    except ValueError as exc:
        print(f"mtls-gateway explain: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(result.as_json() if args.json else render_text(result))
    return result.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if not args_in or (args_in[0] not in _COMMANDS and args_in[0] not in ("-h", "--help")):
        args_in.insert(0, "run")
    args = _parser().parse_args(args_in)
    if args.command == "thumbprint":
        from .thumbprint import x5t_s256_of_pem_file

        try:
            print(x5t_s256_of_pem_file(args.cert))
        except (OSError, ValueError) as exc:
            print(f"mtls-gateway: cannot read certificate {args.cert}: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(directory=args.dir, port=args.port)
    files: list[tuple[str, Path]] = []
    try:
        config = load_config(args.config, read_files=files)
    except ConfigError as exc:
        print(f"mtls-gateway: {args.config}: {exc}", file=sys.stderr)
        return 2
    if args.command == "explain":
        return _run_explain(args, config)
    from .anchors import handshake_warnings

    warnings = handshake_warnings(config)
    for warning in warnings:
        print(f"mtls-gateway: {args.config}: warning: {warning}", file=sys.stderr)
    if args.command == "check":
        from .config_advice import config_warnings

        advice = config_warnings(config)
        for warning in advice:
            print(f"mtls-gateway: {args.config}: warning: {warning}", file=sys.stderr)
        return _check_files(args.config, files, args.run_as, config.routes,
                            len(config.providers), len(warnings) + len(advice))
    from .app import serve_forever
    from .decision_log import configure_logging

    configure_logging(config.logging.level)
    if args.workers > 1:
        if config.listen.port == 0:
            print("mtls-gateway: --workers needs a fixed listen.port (not 0)", file=sys.stderr)
            return 2
        if _dpop_memory_store(config):
            print("mtls-gateway: --workers with routes that accept DPoP needs a shared "
                  "dpop.replay_store (redis://...): each worker's in-process replay cache "
                  "would accept a proof another worker has seen", file=sys.stderr)
            return 2
        from .workers import run_workers

        try:
            return run_workers(config, args.workers)
        except ConfigError as exc:
            print(f"mtls-gateway: {args.config}: {exc}", file=sys.stderr)
            return 2
    if args.workers < 1:
        print("mtls-gateway: --workers must be at least 1", file=sys.stderr)
        return 2
    from .eventloop import run

    try:
        run(serve_forever(config))
    except ConfigError as exc:      # what only starting shows: a port in use, a bad host...
        print(f"mtls-gateway: {args.config}: {exc}", file=sys.stderr)
        return 2
    except (OSError, ssl.SSLError, ValueError) as exc:
        print(f"mtls-gateway: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def _check_files(config: Path, files: list[tuple[str, Path]], run_as: str | None,
                 routes: Sequence[object], providers: int, warned: int = 0) -> int:
    """``check``'s last step: files the gateway's user could not read at run time."""
    if run_as is None:
        for line in unreadable_files(files, *IMAGE_USER):
            print(f"warning: {line} (the container image runs as "
                  f"{IMAGE_USER[0]}:{IMAGE_USER[1]}; check with --run-as to fail on this)",
                  file=sys.stderr)
    else:
        uid, _, gid = run_as.partition(":")
        if not uid.isdigit() or not (gid or uid).isdigit():
            print(f"mtls-gateway: --run-as {run_as!r}: expected UID:GID (numbers)",
                  file=sys.stderr)
            return 2
        problems = unreadable_files(files, int(uid), int(gid or uid))
        if problems:
            print(f"mtls-gateway: {config}: {ConfigError(problems)}", file=sys.stderr)
            return 2
    print(f"{config}: OK ({len(routes)} routes, {providers} providers"
          f"{f', {warned} warnings' if warned else ''})")
    return 0


def _dpop_memory_store(config: GatewayConfig) -> bool:
    """Some route accepts DPoP and the replay store is this process's own."""
    return config.dpop.replay_store == "memory" and any(
        isinstance(r.auth, AuthPolicy) and r.auth.sender_constraint != "mtls"
        for r in config.routes)


if __name__ == "__main__":
    sys.exit(main())
