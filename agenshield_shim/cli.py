"""The ``agenshield-shim`` command line: a table of sub-commands, each parsed by its own module.

A sub-command's module is imported only when that sub-command runs, so ``agenshield-shim --help``
stays fast and a command never pays for another's dependencies (the broker's aiohttp, say).
Each entry names ``module:function``; the function takes the remaining arguments and returns
the exit status.
"""

import importlib
import sys
from typing import Callable, Dict, List, Optional, Tuple

from . import __version__
from .cli_args import Parser

#: command -> (module:function, one-line help)
COMMANDS: Dict[str, Tuple[str, str]] = {
    "run": ("agenshield_shim.run:cli_run", "run a command with the shim active (starts a broker if none is up)"),
    "broker": ("agenshield_shim.broker:main", "run the reference broker (needs the [broker] extra)"),
    "install": ("agenshield_shim.installer:cli_install", "pip-install this wheel into the environment of a Python"),
    "verify": ("agenshield_shim.installer:cli_verify", "check that a Python is guarded and routed"),
    "uninstall": ("agenshield_shim.installer:cli_uninstall", "remove the shim from the environment of a Python"),
    "wrapper": ("agenshield_shim.wrapper:cli_wrapper", "write a wrapper script that runs a Python sandboxed"),
    "restore": ("agenshield_shim.wrapper:cli_restore", "remove a wrapper script written by 'wrapper'"),
    "sandbox-profile": ("agenshield_shim.sandbox.seatbelt:cli_profile", "print the macOS seatbelt profile"),
    "audit": ("agenshield_shim.audit_report:main", "summarise an audit log: what the agent tried to reach"),
    "selftest": ("agenshield_shim.selftest:main", "check the interpreter this runs in (python -m agenshield_shim.selftest)"),
}


def _resolve(target: str) -> Callable[[List[str]], int]:
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)  # type: ignore[no-any-return]


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS:
        return int(_resolve(COMMANDS[args[0]][0])(args[1:]) or 0)
    parser = Parser(
        prog="agenshield-shim",
        description="Network isolation for Python AI agents (the Python side of AgenShield). "
                    "'agenshield-shim COMMAND --help' describes each command.",
    )
    parser.add_argument("--version", action="version", version="agenshield-shim " + __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, text) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    parsed = parser.parse_args(args)
    if parsed.command is None:
        parser.print_help()
        return 2
    return 0
