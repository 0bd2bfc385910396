"""Bad input to every command: one line on stderr naming the input, what is wrong and what to do; exit 2.

Each case runs the real command line (``python -m agenshield_shim ...``) as a user would. None of
them may start anything (a broker, a command, pip): they fail before, so each takes a fraction of
a second. ``what`` is the input as the message must name it, ``todo`` the words that say what to do.
"""

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def cli(args: List[str], env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AGENSHIELD_", "PYTHON"))}
    base.update(PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([PY, "-m", "agenshield_shim", *args], capture_output=True, text=True, timeout=60,
                          env=base, cwd=cwd)


@pytest.fixture(scope="module")
def bad_policy(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("policy") / "agent-policy.toml"
    path.write_text('[[rules]]\nid = "openai"\naction = "allow"\nhosts = ["api.openai.com"]\nports = ["https"]\n')
    return str(path)


@pytest.fixture(scope="module")
def not_an_audit_log(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("log") / "notes.txt"
    path.write_text("hello\nworld\n")
    return str(path)


# (args, extra environment, the input the line names, what-to-do words)
CASES = [
    # the list
    pytest.param(["wrapper", "--python", PY, "--out", "/nonexistent-dir/w.sh"], {}, "/nonexistent-dir/w.sh",
                 "create it first", id="wrapper-out-in-missing-dir"),
    pytest.param(["broker", "--allow", "127.0.0.1:abc"], {}, "127.0.0.1:abc", "write HOST or HOST:PORT",
                 id="broker-allow-bad-port"),
    pytest.param(["run", "--allow", "127.0.0.1:abc", "--", PY, "-c", "pass"], {}, "127.0.0.1:abc",
                 "write HOST or HOST:PORT", id="run-allow-bad-port"),
    pytest.param(["install", "--python", PY, "--broker-port", "0"], {}, "'0'", "give a number from 1 to 65535",
                 id="install-broker-port-0"),
    pytest.param(["sandbox-profile", "--workspace", "/nonexistent-dir"], {}, "/nonexistent-dir", "create it first",
                 id="sandbox-profile-missing-workspace"),
    pytest.param(["broker", "--policy", "{bad_policy}"], {}, "{bad_policy}, rule 0 (id 'openai'), field 'ports'",
                 "docs/policy.md", id="broker-policy-rule-names-file-and-rule"),
    pytest.param(["run", "--policy", "{bad_policy}", "--", PY, "-c", "pass"], {},
                 "{bad_policy}, rule 0 (id 'openai'), field 'ports'", "docs/policy.md", id="run-policy-rule"),
    pytest.param(["run", "--", PY, "-c", "pass"], {"AGENSHIELD_DEPTH": "abc"}, "AGENSHIELD_DEPTH='abc'",
                 "use a whole number", id="run-depth-abc"),
    pytest.param(["run", "--", "/nonexistent/cmd"], {}, "/nonexistent/cmd", "check the path", id="run-missing-program"),
    # the rest of the class
    pytest.param(["run", "--", "no-such-program-agenshield"], {}, "no-such-program-agenshield", "give its path",
                 id="run-program-not-in-path"),
    pytest.param(["run"], {}, "--", "give the command to run after --", id="run-no-command"),
    pytest.param(["run", "--policy", "/nonexistent/p.toml", "--", PY], {}, "/nonexistent/p.toml", "check the path",
                 id="run-missing-policy"),
    pytest.param(["run", "--audit", "/nonexistent-dir/a.jsonl", "--", PY], {}, "/nonexistent-dir/a.jsonl",
                 "create it first", id="run-audit-in-missing-dir"),
    pytest.param(["run", "--sandbox", "jail", "--", PY], {}, "'jail'", "choose from", id="run-bad-sandbox"),
    pytest.param(["run", "--", PY], {"AGENSHIELD_BROKER_PORT": "0"}, "AGENSHIELD_BROKER_PORT", "fix or unset it",
                 id="run-env-broker-port"),
    pytest.param(["run", "--", PY], {"AGENSHIELD_ALLOW": "db.local"}, "'db.local'", "write host:port",
                 id="run-env-allow-without-port"),
    pytest.param(["run", "--", PY], {"AGENSHIELD_LOG_LEVEL": "loud"}, "AGENSHIELD_LOG_LEVEL='loud'", "use one of",
                 id="run-env-log-level"),
    pytest.param(["run", "--", PY], {"AGENSHIELD_AUDIT_LOG": "audit.jsonl"}, "AGENSHIELD_AUDIT_LOG='audit.jsonl'",
                 "must be an absolute path", id="run-env-relative-audit-log"),
    pytest.param(["run", "--", PY], {"AGENSHIELD_TRACE_ID": "a\nb"}, "AGENSHIELD_TRACE_ID='a\\nb'",
                 "use printable text", id="run-env-trace-id-control-char"),
    pytest.param(["broker", "--port", "abc"], {}, "'abc'", "give a number from 0", id="broker-port-abc"),
    pytest.param(["broker", "--port", "70000"], {}, "'70000'", "give a number from 0", id="broker-port-too-big"),
    pytest.param(["broker", "--connect-timeout", "soon"], {}, "'soon'", "e.g. 10 or 0.5", id="broker-timeout-word"),
    pytest.param(["broker", "--idle-timeout", "0"], {}, "'0'", "above 0", id="broker-timeout-zero"),
    pytest.param(["broker", "--max-body-size", "lots"], {}, "'lots'", "e.g. 65536", id="broker-size-word"),
    pytest.param(["broker", "--unix-mode", "rw"], {}, "'rw'", "e.g. 0600", id="broker-unix-mode"),
    pytest.param(["broker", "--allow", "[::1"], {}, "[::1", "[::1]:8080", id="broker-allow-unclosed-bracket"),
    pytest.param(["broker", "--allow", "exa mple.com"], {}, "exa mple.com", "write HOST or HOST:PORT",
                 id="broker-allow-bad-host"),
    pytest.param(["broker", "--policy", "/nonexistent/p.toml"], {}, "/nonexistent/p.toml", "check the path",
                 id="broker-missing-policy"),
    pytest.param(["broker", "--audit", "/nonexistent-dir/a.jsonl"], {}, "/nonexistent-dir/a.jsonl", "create it first",
                 id="broker-audit-in-missing-dir"),
    pytest.param(["broker", "--upstream-ca", "/nonexistent/ca.pem"], {}, "/nonexistent/ca.pem", "check the path",
                 id="broker-missing-upstream-ca"),
    pytest.param(["broker", "--ready-file", "/nonexistent-dir/ready"], {}, "/nonexistent-dir/ready",
                 "create it first", id="broker-ready-file-in-missing-dir"),
    pytest.param(["broker", "--unix", "/nonexistent-dir/b.sock"], {}, "/nonexistent-dir/b.sock", "create it first",
                 id="broker-unix-in-missing-dir"),
    pytest.param(["install", "--python", "/nonexistent/python"], {}, "/nonexistent/python",
                 "give the path of a Python interpreter", id="install-missing-python"),
    pytest.param(["install", "--python", PY, "--wheel", "/nonexistent/x.whl"], {}, "/nonexistent/x.whl",
                 "check the path", id="install-missing-wheel"),
    pytest.param(["install", "--python", PY, "--broker-host", "exa mple"], {}, "'exa mple'", "e.g. localhost",
                 id="install-bad-broker-host"),
    pytest.param(["verify", "--python", "/nonexistent/python"], {}, "/nonexistent/python",
                 "give the path of a Python interpreter", id="verify-missing-python"),
    pytest.param(["uninstall", "--python", "/nonexistent/python"], {}, "/nonexistent/python",
                 "give the path of a Python interpreter", id="uninstall-missing-python"),
    pytest.param(["install"], {}, "--python", "required", id="install-without-python"),
    pytest.param(["wrapper", "--python", PY, "--out", "{tmp}/w.sh", "--broker-port", "0"], {}, "'0'",
                 "give a number from 1 to 65535", id="wrapper-broker-port-0"),
    pytest.param(["wrapper", "--python", PY, "--out", "{tmp}/w.sh", "--env", "NOVALUE"], {}, "'NOVALUE'",
                 "write NAME=VALUE", id="wrapper-env-without-value"),
    pytest.param(["wrapper", "--python", "/nonexistent/python", "--out", "{tmp}/w.sh"], {}, "/nonexistent/python",
                 "give the path of a Python interpreter", id="wrapper-missing-python"),
    pytest.param(["wrapper", "--python", PY, "--out", "{tmp}/w.sh", "--workspace", "/nonexistent-dir"], {},
                 "/nonexistent-dir", "create it first", id="wrapper-missing-workspace"),
    pytest.param(["restore", "--out", "/nonexistent-dir/w.sh"], {}, "/nonexistent-dir/w.sh", "give the path of a wrapper",
                 id="restore-missing-wrapper"),
    pytest.param(["sandbox-profile", "--workspace", "{tmp}", "--broker-port", "abc"], {}, "'abc'",
                 "give a number from 1 to 65535", id="sandbox-profile-port-abc"),
    pytest.param(["sandbox-profile", "--workspace", "{tmp}", "--allow-write", "/nonexistent-dir"], {},
                 "/nonexistent-dir", "create it first", id="sandbox-profile-missing-allow-write"),
    pytest.param(["audit", "/nonexistent/audit.jsonl"], {}, "/nonexistent/audit.jsonl", "give the path of an audit log",
                 id="audit-missing-file"),
    pytest.param(["audit", "{not_an_audit_log}"], {}, "{not_an_audit_log}", "is it an audit log", id="audit-not-a-log"),
    pytest.param(["frobnicate"], {}, "'frobnicate'", "choose from", id="unknown-command"),
]


@pytest.mark.parametrize("args, env, what, todo", CASES)
def test_bad_input_is_one_line_and_exit_2(args: List[str], env: Dict[str, str], what: str, todo: str,
                                          tmp_path: Path, bad_policy: str, not_an_audit_log: str) -> None:
    values = {"tmp": str(tmp_path), "bad_policy": bad_policy, "not_an_audit_log": not_an_audit_log}
    args = [a.format(**values) for a in args]
    what = what.format(**values)
    result = cli(args, env, cwd=str(tmp_path))
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr  # no usage block, no traceback, no second message
    assert lines[0].startswith("agenshield-shim"), lines[0]
    assert what in lines[0] and todo in lines[0], lines[0]
    assert "Traceback" not in result.stderr and "invalid literal" not in result.stderr
    assert result.stdout == "" and os.listdir(str(tmp_path)) == []  # nothing was written


def test_install_names_the_flag_once() -> None:
    line = cli(["install", "--python", PY, "--broker-port", "0"]).stderr
    assert line.count("--broker-port") == 1, line
    assert "--broker-port: --broker-port" not in line


def test_run_refuses_a_missing_program_without_calling_it_not_python() -> None:
    result = cli(["run", "--", "/nonexistent/cmd"])
    assert "is not a Python program" not in result.stderr and "broker" not in result.stderr


def test_run_bad_allow_never_reaches_a_broker() -> None:
    result = cli(["run", "--allow", "127.0.0.1:abc", "--", PY, "-c", "pass"])
    assert "broker exited" not in result.stderr and "started the reference broker" not in result.stderr
