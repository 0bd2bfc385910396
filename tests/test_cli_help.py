"""Help that stands alone: every flag of every command has help, and its default where it has one.

The parsers are the ones the commands build: each command runs with ``--help`` and the parser it
made is caught on its way into ``parse_args`` (the command itself is not replaced).
"""

import argparse
import contextlib
import io
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from agenshield_shim import cli

ROOT = Path(__file__).resolve().parents[1]
#: Flags only other code passes (agenshield-shim verify runs the selftest with them).
INTERNAL = {("selftest", "--verify"), ("selftest", "--broker-host"), ("selftest", "--broker-port")}


def parser_of(command: str) -> Tuple[argparse.ArgumentParser, str]:
    """The parser ``agenshield-shim COMMAND`` builds, and its ``--help`` text."""
    caught: List[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.parse_args

    def catch(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> object:
        caught.append(self)
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    out = io.StringIO()
    argparse.ArgumentParser.parse_args = catch  # type: ignore[assignment]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
            cli.main([command, "--help"])
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[assignment]
    assert info.value.code == 0
    return caught[0], out.getvalue()


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_flag_has_help_and_its_default(command: str) -> None:
    parser, text = parser_of(command)
    assert parser.prog == "agenshield-shim " + command, parser.prog
    assert text.startswith("usage: agenshield-shim %s" % command)
    flat = " ".join(text.split())
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        name = action.option_strings[0] if action.option_strings else action.dest
        if (command, name) in INTERNAL:
            assert action.help == argparse.SUPPRESS
            continue
        assert action.help and action.help != argparse.SUPPRESS, "%s %s has no help" % (command, name)
        if not action.option_strings or action.required or action.nargs == 0:
            continue  # positionals, required flags and switches have no default to show
        shown = parser._get_formatter()._expand_help(action)  # the text --help prints for it
        assert "default" in shown, "%s %s shows no default: %r" % (command, name, shown)
        assert "".join(shown.split()) in "".join(flat.split())  # argparse may wrap at a hyphen


def test_selftest_help_names_the_command_it_was_called_as() -> None:
    _, text = parser_of("selftest")
    assert "usage: agenshield-shim selftest" in text and "python -m" not in text.split("\n")[0]


def test_run_usage_shows_every_flag() -> None:
    parser, _ = parser_of("run")
    usage = parser.format_usage()
    for action in parser._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                assert flag in usage, flag


def test_policy_help_points_at_the_policy_format() -> None:
    for command in ("broker", "run"):
        _, text = parser_of(command)
        flat = " ".join(text.split())
        assert "docs/policy.md" in flat
        # the wheel carries no docs/: the help itself says how a policy file looks and combines
        assert "[[rules]]" in flat and "deny rule wins" in flat and "--allow HOST[:PORT] adds one allow rule" in flat
    assert (ROOT / "docs" / "policy.md").is_file()


def test_broker_timeouts_and_sizes_show_their_defaults() -> None:
    parser, _ = parser_of("broker")
    helps = {a.option_strings[0]: parser._get_formatter()._expand_help(a) for a in parser._actions if a.option_strings}
    expected: Dict[str, str] = {"--connect-timeout": "10.0", "--idle-timeout": "300.0", "--head-timeout": "10.0",
                                "--keepalive-timeout": "60.0", "--max-head-size": "65536",
                                "--max-body-size": "10485760", "--max-rpc-response": "104857600",
                                "--shutdown-grace": "5.0"}
    for flag, default in expected.items():
        assert helps[flag].endswith("(default: %s)" % default) and len(helps[flag]) > 30, helps[flag]
