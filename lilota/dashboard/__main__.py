"""``python -m lilota.dashboard [--db-url URL] [--host H] [--port P] [--token T] [--insecure]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The dashboard's options; the ``lilota dashboard`` subcommand reuses them."""
    if parser is None:
        parser = argparse.ArgumentParser(
            prog="python -m lilota.dashboard", description="Serve lilota's web dashboard."
        )
    parser.add_argument(
        "--db-url",
        default=None,
        help="database URL (default: $LILOTA_DB_URL, else sqlite:///lilota.db)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--token",
        default=None,
        help="access token required to use the dashboard (default: $LILOTA_DASHBOARD_TOKEN)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="serve a non-loopback --host without a token (anyone who reaches it can act)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Serve with parsed options; returns an exit status."""
    try:
        from lilota.dashboard import serve
    except ImportError as e:
        print(f"lilota dashboard: {e}", file=sys.stderr)
        return 2
    from lilota.errors import LilotaError

    try:
        serve(
            args.db_url or os.environ.get("LILOTA_DB_URL"),
            host=args.host,
            port=args.port,
            token=args.token,
            insecure=args.insecure,
        )
    except LilotaError as e:
        print(f"lilota dashboard: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
