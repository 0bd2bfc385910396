"""The ``agenshield-shim`` command line: one sub-command per job, each in its own module."""

import argparse
import sys
from typing import List, Optional

from . import __version__


def _run_broker(argv: List[str]) -> int:
    from .broker import main as broker_main

    return broker_main(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="agenshield-shim",
        description="Network isolation for Python AI agents (the Python side of AgenShield).",
    )
    parser.add_argument("--version", action="version", version="agenshield-shim " + __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("broker", help="run the reference broker (needs the [broker] extra)", add_help=False)
    if args and args[0] == "broker":
        return _run_broker(args[1:])
    parsed = parser.parse_args(args)
    if parsed.command is None:
        parser.print_help()
        return 2
    return 0
