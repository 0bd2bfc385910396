"""The argument parser every ``agenshield-shim`` command uses: help that shows defaults, errors in one line.

Why a subclass: argparse's own error output is the whole usage block (five lines for the broker)
followed by the error, so the line that matters is buried; and ``ArgumentDefaultsHelpFormatter``
prints ``(default: None)`` / ``(default: False)`` for flags whose default is "not given". Here an
error is one line (``PROG: what is wrong; see PROG --help``, exit status 2) and ``--help`` shows
every default that has a value.

Only command-line code imports this module; nothing of it runs at interpreter start.
"""

import argparse
import os
import sys
from typing import Any, NoReturn, Optional


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to a flag's help when X is a real value (not None, False or []).

    A help text that already says ``default:`` (a default computed at run time, or spelled better
    than its value, like a file mode) is left as written.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or "default:" in text or default is argparse.SUPPRESS or default is None \
                or default is False:
            return text
        if isinstance(default, (list, tuple)) and not default:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text + " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with :class:`HelpFormatter` and one-line errors (exit status 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        hint = "" if "; see " in message else "; see %s --help" % self.prog
        self.exit(2, "%s: %s%s\n" % (self.prog, message, hint))


#: The policy format in one paragraph, for the --help of the commands that take --policy/--allow
#: (the wheel does not carry docs/policy.md, so the help must stand alone).
POLICY_EPILOG = (
    'Policy file (TOML): default = "deny" (or "allow"), then [[rules]] tables, each with action = "allow" or '
    '"deny" and any of: id, hosts (names, "*.example.com", CIDR such as "10.0.0.0/8", "*"), ports (443, '
    '"8000-8100"), schemes, methods, paths (rpc and plain-http only; never match a CONNECT tunnel). A matching deny '
    'rule wins over every allow rule; else a matching allow rule allows; else the default decides. Each --allow '
    'HOST[:PORT] adds one allow rule after the file\'s rules. Without --policy and --allow only loopback is '
    'allowed. Guide and examples: docs/policy.md in the source repository.'
)


def usage_error(prog: str, message: str) -> int:
    """Print a bad-input message the same way a :class:`Parser` does; return the exit status (2)."""
    print("%s: %s" % (prog, message), file=sys.stderr)
    return 2


def port(text: str) -> int:
    """An argparse ``type`` for a TCP port: 1-65535."""
    word = text.strip()
    if not (word.isdigit() and word.isascii() and 0 < int(word) < 65536):
        raise argparse.ArgumentTypeError("%r is not a TCP port; give a number from 1 to 65535" % text)
    return int(word)


def shown(path: str) -> str:
    """A path for a one-line message: as typed, or quoted when it holds a control character (a newline)."""
    if all(ch.isprintable() for ch in path):
        return path
    return "%r (it holds a control character)" % path


def missing_parent(path: str) -> Optional[str]:
    """The directory that must hold ``path`` when it does not exist, else None."""
    parent = os.path.dirname(os.path.abspath(path))
    return None if os.path.isdir(parent) else parent


def check_output_file(flag: str, path: Optional[str]) -> Optional[str]:
    """Why ``path`` (a file to create) cannot be written, as one message naming ``flag``; None if it can."""
    if path is None:
        return None
    parent = missing_parent(path)
    if parent is not None:
        return "%s %s: directory %s does not exist; create it first or choose another path" % (
            flag, shown(path), shown(parent))
    if os.path.isdir(path):
        return "%s %s: is a directory; give a file name" % (flag, shown(path))
    if not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
        return "%s %s: directory %s is not writable; choose another path" % (
            flag, shown(path), shown(os.path.dirname(os.path.abspath(path))))
    return None


def check_input_file(flag: str, path: Optional[str]) -> Optional[str]:
    """Why ``path`` (a file to read) cannot be used, as one message naming ``flag``; None if it can."""
    if path is None:
        return None
    if not os.path.exists(path):
        return "%s %s: no such file; check the path" % (flag, shown(path))
    if not os.path.isfile(path):
        return "%s %s: not a regular file; give a file" % (flag, shown(path))
    if not os.access(path, os.R_OK):
        return "%s %s: not readable; check its permissions" % (flag, shown(path))
    return None


def check_directory(flag: str, path: Optional[str]) -> Optional[str]:
    """Why ``path`` is not an existing directory, as one message naming ``flag``; None if it is."""
    if path is None or os.path.isdir(path):
        return None
    if os.path.exists(path):
        return "%s %s: not a directory; give a directory" % (flag, shown(path))
    return "%s %s: no such directory; create it first or give an existing one" % (flag, shown(path))


def check_python(flag: str, path: str) -> Optional[str]:
    """Why ``path`` cannot be the interpreter asked for, as one message naming ``flag``; None if it can."""
    if not os.path.exists(path):
        return "%s %s: no such file; give the path of a Python interpreter (e.g. venv/bin/python)" % (
            flag, shown(path))
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        return "%s %s: not an executable file; give the path of a Python interpreter (e.g. venv/bin/python)" % (
            flag, shown(path))
    return None


def first_problem(*problems: Optional[str]) -> Optional[str]:
    return next((p for p in problems if p), None)

