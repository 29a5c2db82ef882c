"""``mtls-gateway``: run (default), check, thumbprint, demo."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import AuthPolicy, GatewayConfig
from .config_load import load_config
from .errors import ConfigError

__all__ = ["main"]

_COMMANDS = ("run", "check", "thumbprint", "demo")
_CONFIG_ENV = "MTLS_GATEWAY_CONFIG"


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
    thumb = sub.add_parser("thumbprint", help="print the x5t#S256 of a certificate")
    thumb.add_argument("cert", type=Path, help="PEM or DER certificate file")
    demo = sub.add_parser("demo", help="a complete local setup to try with curl")
    demo.add_argument("--dir", type=Path, default=None,
                      help="folder for the generated certificates and tokens "
                           "(default: a temporary folder, removed on exit)")
    demo.add_argument("--port", type=int, default=8443, help="gateway port (default 8443)")
    return parser


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
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"mtls-gateway: {args.config}: {exc}", file=sys.stderr)
        return 2
    if args.command == "check":
        print(f"{args.config}: OK ({len(config.routes)} routes, "
              f"{len(config.providers)} providers)")
        return 0
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

        return run_workers(config, args.workers)
    if args.workers < 1:
        print("mtls-gateway: --workers must be at least 1", file=sys.stderr)
        return 2
    from .eventloop import run

    run(serve_forever(config))
    return 0


def _dpop_memory_store(config: GatewayConfig) -> bool:
    """Some route accepts DPoP and the replay store is this process's own."""
    return config.dpop.replay_store == "memory" and any(
        isinstance(r.auth, AuthPolicy) and r.auth.sender_constraint != "mtls"
        for r in config.routes)


if __name__ == "__main__":
    sys.exit(main())
