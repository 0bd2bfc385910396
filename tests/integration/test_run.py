"""``agenshield-shim run -- COMMAND``: a broker for the command's lifetime, routed and blocked, its exit status."""

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

from .conftest import skip_unless_local as _skip_unless_local, PYTHONS, ROOT, Listener, ShimEnv, clean_env

RUN_VERSION = next((v for v in ("3.11", "3.12", "3.13", "3.8") if v in PYTHONS), None)

CHILD = r"""
import socket, sys, urllib.request
url, port = sys.argv[1], int(sys.argv[2])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
print("routed", opener.open(url, timeout=10).status)
try:
    socket.create_connection(("127.0.0.2", port), timeout=5)
    print("direct went through")
except ConnectionRefusedError as exc:
    print("direct refused", type(exc).__name__)
sys.exit(7)
"""


def free_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port: int = probe.getsockname()[1]
    probe.close()
    return port


def run_cmd(args: List[str], env: Dict[str, str] = None, **kwargs) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([sys.executable, "-m", "agenshield_shim", "run", *args], capture_output=True, text=True,
                          timeout=120, cwd=str(ROOT), env=clean_env(PYTHONPATH=str(ROOT), **(env or {})), **kwargs)


@pytest.fixture(scope="module")
def agent(shim_env_factory) -> ShimEnv:
    if RUN_VERSION is None:
        _skip_unless_local("no CPython 3.8-3.13 found (pyenv versions, or AGENSHIELD_TEST_PYTHONS)")
    return shim_env_factory(RUN_VERSION)


@pytest.fixture
def listener():
    server = Listener("127.0.0.2")
    yield server
    server.close()


def test_starts_a_broker_routes_blocks_and_returns_the_status(agent: ShimEnv, upstream, listener: Listener,
                                                               tmp_path: Path) -> None:
    port = free_port()
    audit = tmp_path / "audit.jsonl"
    result = run_cmd(["--audit", str(audit), "--", agent.python, "-c", CHILD, upstream.http_url + "/echo?tag=run1",
                      str(listener.port)], env={"AGENSHIELD_BROKER_PORT": str(port), "AGENSHIELD_ENABLED": "false"})
    assert result.returncode == 7, result.stdout + result.stderr
    assert "routed 200" in result.stdout and "direct refused NetworkBlockedError" in result.stdout
    assert "started the reference broker on localhost:%d" % port in result.stderr
    assert upstream.request_count("run1") == 1 and listener.settle() == 0
    assert "127.0.0.1:%d" % upstream.http_port in audit.read_text()  # the broker saw it
    with pytest.raises(OSError):  # and is gone with the command
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_uses_the_running_broker(agent: ShimEnv, broker, upstream, listener: Listener) -> None:
    mark = broker.mark()
    result = run_cmd(["--allow", "example.com", "--", agent.python, "-c", CHILD, upstream.http_url + "/echo?tag=run2",
                      str(listener.port)], env=broker.env)
    assert result.returncode == 7, result.stderr
    assert "started" not in result.stderr and "--allow/--policy apply only" in result.stderr
    assert broker.connects("127.0.0.1:%d" % upstream.http_port, mark) or broker.forwards("tag=run2", mark)


def test_policy_of_the_started_broker(agent: ShimEnv, upstream, tmp_path: Path) -> None:
    """--allow replaces the default loopback policy: the upstream is then refused by the broker."""
    code = ("import sys, urllib.request\n"
            "try:\n urllib.request.build_opener(urllib.request.ProxyHandler({})).open(sys.argv[1], timeout=10)\n"
            "except Exception as exc:\n print('refused', exc); sys.exit(3)\n")
    result = run_cmd(["--allow", "api.example.com:443", "--audit", str(tmp_path / "a"), "--", agent.python, "-c",
                      code, upstream.http_url + "/echo"], env={"AGENSHIELD_BROKER_PORT": str(free_port())})
    assert result.returncode == 3 and "refused" in result.stdout, result.stdout + result.stderr


def test_warns_for_a_python_without_the_shim(tmp_path: Path) -> None:
    result = run_cmd(["--audit", str(tmp_path / "a"), "--", sys.executable, "-c", "print('hi')"],
                     env={"AGENSHIELD_BROKER_PORT": str(free_port())})
    assert result.returncode == 0 and result.stdout.strip() == "hi"
    assert "does not have agenshield-shim installed" in result.stderr and "agenshield-shim install --python" in result.stderr


def test_forwards_signals(agent: ShimEnv, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    code = ("import signal, sys, time, pathlib\n"
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))\n"
            "pathlib.Path(sys.argv[1]).write_text('x')\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-m", "agenshield_shim", "run", "--audit", str(tmp_path / "a"), "--",
                             agent.python, "-c", code, str(ready)], cwd=str(ROOT), stdin=subprocess.DEVNULL,
                            env=clean_env(PYTHONPATH=str(ROOT), AGENSHIELD_BROKER_PORT=str(free_port())))
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 42


def test_exit_status_of_a_killed_command(agent: ShimEnv, tmp_path: Path) -> None:
    code = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    result = run_cmd(["--audit", str(tmp_path / "a"), "--", agent.python, "-c", code],
                     env={"AGENSHIELD_BROKER_PORT": str(free_port())})
    assert result.returncode == 128 + signal.SIGKILL


def test_missing_command() -> None:
    """Refused before a broker starts: one line, exit 2 (tests/test_cli_errors.py has the whole class)."""
    result = run_cmd(["--", "/nonexistent/program"], env={"AGENSHIELD_BROKER_PORT": str(free_port())})
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "agenshield-shim run: /nonexistent/program: no such program; check the path; see agenshield-shim run --help"]


REACHES = r"""
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
for url in sys.argv[1:]:
    try:
        print(url, opener.open(url, timeout=10).status)
    except OSError as exc:
        print(url, "refused")
"""


def test_refusals_end_the_output_with_the_allow_flags(agent: ShimEnv, upstream, tmp_path: Path) -> None:
    """No audit JSON on the terminal; one sentence per refused destination, then the --allow for all of them.

    The refused names are decided on by the broker before any resolution: nothing leaves loopback.
    """
    audit = tmp_path / "audit.jsonl"
    audit.write_text('{"timestamp":"2026-01-01T00:00:00.000Z","operation":"connect","allowed":false,'
                     '"target":"old.example:443","result":"denied"}\n')  # an earlier run's line: not this run's
    urls = ["https://example.com/", "https://example.com/again", "https://api.example.org:8443/v1",
            upstream.http_url + "/echo?tag=run-summary"]
    result = run_cmd(["--audit", str(audit), "--", agent.python, "-c", REACHES, *urls],
                     env={"AGENSHIELD_BROKER_PORT": str(free_port())})
    assert result.returncode == 0, result.stderr
    assert "refused" in result.stdout and "%s 200" % urls[-1] in result.stdout
    assert '{"' not in result.stderr and "old.example" not in result.stderr
    assert result.stderr.splitlines()[-3:] == [
        "agenshield-shim run: the broker refused example.com:443 (2 times): Host 'example.com' is not allowed "
        "(the default policy allows loopback only)",
        "agenshield-shim run: the broker refused api.example.org:8443: Host 'api.example.org' is not allowed "
        "(the default policy allows loopback only)",
        "agenshield-shim run: to let them through, run again with --allow example.com:443 --allow api.example.org:8443 "
        "--allow 127.0.0.1",  # --allow replaces the loopback default, which the upstream needed
    ]
    assert len(audit.read_text().splitlines()) == 1 + 4  # the broker's audit went to the file


def test_a_deny_rule_is_named_not_an_allow(agent: ShimEnv, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('default = "allow"\n[[rules]]\nid = "no-example"\naction = "deny"\nhosts = ["example.com"]\n')
    result = run_cmd(["--policy", str(policy), "--", agent.python, "-c", REACHES, "https://example.com/"],
                     env={"AGENSHIELD_BROKER_PORT": str(free_port())})
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[-1] == (
        "agenshield-shim run: the broker refused example.com:443 by deny rule 'no-example' of the policy: "
        "Host 'example.com:443' denied by policy 'no-example'; --allow cannot override a deny rule: change the policy")


def test_netns_sandbox(agent: ShimEnv, upstream, listener: Listener, tmp_path: Path) -> None:
    from agenshield_shim.sandbox import netns

    try:
        netns.find_backend()
    except netns.NetnsUnavailable as exc:
        _skip_unless_local(str(exc))
    result = run_cmd(["--sandbox", "netns", "--audit", str(tmp_path / "a"), "--", agent.python, "-c", CHILD,
                      upstream.http_url + "/echo?tag=run-netns", str(listener.port)],
                     env={"AGENSHIELD_BROKER_PORT": str(free_port())})
    assert result.returncode == 7, result.stdout + result.stderr
    assert "routed 200" in result.stdout and upstream.request_count("run-netns") == 1
    # python -S has no shim: only the namespace stops it
    bare = run_cmd(["--sandbox", "netns", "--audit", str(tmp_path / "b"), "--", agent.python, "-S", "-c",
                    "import socket, sys\ntry:\n socket.create_connection(('127.0.0.2', %d), timeout=5)\n"
                    "except OSError as exc:\n print('unreachable', exc); sys.exit(0)\nsys.exit(1)" % listener.port],
                   env={"AGENSHIELD_BROKER_PORT": str(free_port())})
    assert bare.returncode == 0, bare.stdout + bare.stderr
    assert listener.settle() == 0


def test_pip_refused_by_the_broker_says_why(agent: ShimEnv, tmp_path: Path) -> None:
    """pip alone says only "No matching distribution found"; run's last lines name the refused index and the fix."""
    result = run_cmd(["--", agent.python, "-m", "pip", "download", "-q", "--no-deps", "--retries", "0", "--timeout", "5",
                      "-d", str(tmp_path / "dl"), "--index-url", "https://pypi.example.org/simple", "idna"],
                     env={"AGENSHIELD_BROKER_PORT": str(free_port()), "PIP_CONFIG_FILE": "/dev/null"})
    assert result.returncode != 0
    refusal, allow = result.stderr.splitlines()[-2:]
    assert refusal.startswith("agenshield-shim run: the broker refused pypi.example.org:443") and refusal.endswith(
        ": Host 'pypi.example.org' is not allowed (the default policy allows loopback only)"), result.stderr
    assert allow == "agenshield-shim run: to let it through, run again with --allow pypi.example.org:443"
