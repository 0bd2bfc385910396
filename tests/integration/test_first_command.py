"""The README's first command, run as the README says it, from a copy of this checkout.

What a newcomer sees must fit a screen and end with the refusal, its reason and the ``--allow``
that would let it through. And the refusal of ``example.com`` must not cost a packet off the
machine: the reference broker decides on the name before it resolves it, so no DNS query and no
connection may leave loopback. ``strace`` records every connect/send of the command's whole process
tree (run, the broker it starts, the agent): every TCP/UDP endpoint must be loopback, no socket may
go to port 53, and the name ``example.com`` may travel only over loopback TCP (the agent's
``CONNECT`` to the broker and the broker's 403), never to a resolver (nscd's Unix socket included).

Only the agent's command runs under strace; the venv and ``pip install`` before it need the index.
"""

import os
import re
import shutil
import socket
import subprocess
from typing import Dict, List

import pytest

from .conftest import PYTHONS, ROOT, clean_env, skip_unless_local

VERSION = next((v for v in ("3.11", "3.12", "3.13", "3.10", "3.9", "3.8") if v in PYTHONS), None)
SCREEN_LINES = 24
#: Lines of a syscall on a socket, as ``strace -yy`` decorates its file descriptor.
_SOCKET_FD = re.compile(r"\((\d+)<(TCP|UDP|TCPv6|UDPv6|UNIX|UNIX-STREAM|UNIX-DGRAM|NETLINK)(?::\[(.*?)\])?>")
_LOOPBACK_V4 = re.compile(r"^127\.\d+\.\d+\.\d+$")


def readme_command() -> List[str]:
    """The first command of the README's first ``sh`` block, split at ``&&`` into its three steps."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert block is not None
    line = next(l for l in block.group(1).splitlines() if l.strip() and not l.startswith("#"))
    steps = [s.strip() for s in line.split(" && ")]
    assert len(steps) == 3 and steps[0].startswith("python3 -m venv agent-env"), steps
    assert "pip install -q" in steps[1], "the README must install quietly: %s" % steps[1]
    assert steps[2].startswith("agent-env/bin/agenshield-shim run -- ") and "example.com" in steps[2], steps[2]
    return steps


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, str]:
    """Run the README command in a copy of the checkout; returns its output and the strace log (or "")."""
    if VERSION is None:
        skip_unless_local("no CPython 3.8-3.13 found (pyenv versions, or AGENSHIELD_TEST_PYTHONS)")
    steps = readme_command()
    work = tmp_path_factory.mktemp("first-command")
    src = work / "agenshield-shim"
    shutil.copytree(str(ROOT), str(src), ignore=shutil.ignore_patterns(
        ".git", ".cache", "__pycache__", "*.pyc", "build", "dist", "*.egg-info", "agent-env", ".pytest_cache"))
    bin_dir = work / "bin"
    bin_dir.mkdir()
    os.symlink(PYTHONS[str(VERSION)], str(bin_dir / "python3"))
    # A port of our own: another broker on this machine's 6969 would be used instead of a fresh one.
    env = clean_env(PATH=str(bin_dir) + os.pathsep + os.environ.get("PATH", ""),
                    AGENSHIELD_BROKER_PORT=str(free_port()))
    setup = subprocess.run(["sh", "-c", " && ".join(steps[:2])], cwd=str(src), env=env, capture_output=True,
                           text=True, timeout=900)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    strace = shutil.which("strace")
    trace = work / "trace.txt"
    prefix = [strace, "-f", "-qq", "-yy", "-s", "256", "-o", str(trace),
              "-e", "trace=connect,sendto,sendmsg,sendmmsg,write,writev"] if strace else []
    run = subprocess.run(prefix + ["sh", "-c", steps[2]], cwd=str(src), env=env, capture_output=True, text=True,
                         timeout=120)
    return {"output": setup.stdout + setup.stderr + run.stdout + run.stderr, "status": str(run.returncode),
            "trace": trace.read_text(errors="replace") if strace else "", "port": env["AGENSHIELD_BROKER_PORT"]}


def test_output_fits_a_screen_and_ends_with_the_refusal_and_the_allow(first_run: Dict[str, str]) -> None:
    output = first_run["output"]
    lines = output.splitlines()
    assert first_run["status"] == "1", output
    assert len(lines) <= SCREEN_LINES, output
    assert "Traceback" not in output and '{"id"' not in output, output  # no traceback wall, no raw audit JSON
    assert lines[-2] == ("agenshield-shim run: the broker refused example.com:443: Host 'example.com' is not allowed "
                         "(the default policy allows loopback only)"), output
    assert lines[-1] == "agenshield-shim run: to let it through, run again with --allow example.com:443", output
    assert any(l.startswith("urllib.error.URLError: <urlopen error AgenShield: ") for l in lines), output


def test_no_packet_leaves_loopback(first_run: Dict[str, str]) -> None:
    trace = first_run["trace"]
    if not trace:
        skip_unless_local("strace is not installed (apt-get install -y strace): it records what the command sends")
    lines = trace.splitlines()
    assert any(" connect(" in l and "htons(%s)" % first_run["port"] in l for l in lines), trace  # it saw the agent
    for line in lines:
        assert "htons(53)" not in line and ":53]" not in line, line  # no resolver, on any address
        for address in re.findall(r'inet_addr\("([^"]+)"\)', line):
            assert _LOOPBACK_V4.match(address), line
        for address in re.findall(r'inet_pton\(AF_INET6, "([^"]+)"', line):
            assert address in ("::1", "::ffff:127.0.0.1"), line
        fd = _SOCKET_FD.search(line)
        if fd is None:
            continue  # a file, a pipe or the terminal: the messages and the audit log
        for pair in re.findall(r"\[([0-9a-f.:]+)\]:\d+|(\d+\.\d+\.\d+\.\d+):\d+", fd.group(3) or ""):
            host = pair[0] or pair[1]
            assert _LOOPBACK_V4.match(host) or host == "::1", line
        if "example.com" in line:  # the name travels over loopback TCP only: never to nscd, never over UDP
            assert fd.group(2) in ("TCP", "TCPv6") and fd.group(3), line
    assert any("CONNECT example.com:443" in l for l in lines), trace  # the name went to the broker, and only there
