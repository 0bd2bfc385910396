"""``agenshield-shim audit`` on the logs of the shim's guard (AGENSHIELD_AUDIT_LOG) and of the AgenShield daemon.

The shim's log is written by a guarded interpreter of a real shim venv refusing direct
connections (to listeners on 127.0.0.2 that prove nothing arrived). The daemon's log is written by
``@agenshield/broker`` (tests/daemon.py) answering JSON-RPC ``http_request`` calls over its HTTP
fallback: its built-in policy refuses 127.0.0.2 and allows 127.0.0.1 with an explicit port.
"""

import http.server
import json
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from agenshield_shim.audit_report import split_target
from agenshield_shim.broker.policy import Target, build_policy

from .conftest import ROOT, Listener, ShimEnv, clean_env, skip_unless_local

GUARDED = r"""
import socket, sys
for port in (int(sys.argv[1]), int(sys.argv[1]), int(sys.argv[2])):
    try:
        socket.create_connection(("127.0.0.2", port), timeout=5)
        print("went through")
    except ConnectionRefusedError:
        pass
try:
    socket.getaddrinfo("db.internal.example", 5432)
except OSError:
    pass
"""


def audit_cli(*args: str) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([sys.executable, "-m", "agenshield_shim", "audit", *args], capture_output=True, text=True,
                          timeout=60, env=clean_env(PYTHONPATH=str(ROOT)), cwd=str(ROOT))


def report(*files: str) -> Dict[str, Any]:
    result = audit_cli(*files, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def rows(data: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    return {r["destination"]: r for r in data["destinations"]}


def suggested(log: str, tmp_path: Path) -> Any:
    result = audit_cli(log, "--suggest-policy")
    assert result.returncode == 0, result.stderr
    path = tmp_path / "suggested.toml"
    path.write_text(result.stdout)
    return build_policy(str(path), [])


def allows(policy: Any, destination: str) -> bool:
    host, port = split_target(destination)
    assert host is not None
    return bool(policy.check(Target(host=host, port=port, tunnel=True)).allowed)


@pytest.fixture
def two_listeners() -> Iterator[List[Listener]]:
    found = [Listener("127.0.0.2"), Listener("127.0.0.2")]
    yield found
    for listener in found:
        listener.close()


def test_the_shims_own_log(shim: ShimEnv, two_listeners: List[Listener], tmp_path: Path) -> None:
    """On every Python: the guard writes the log inside each interpreter."""
    agent = shim
    log = str(tmp_path / "guard.jsonl")
    a, b = two_listeners
    result = agent.run(GUARDED, str(a.port), str(b.port), env={"AGENSHIELD_AUDIT_LOG": log})
    assert result.returncode == 0 and "went through" not in result.stdout, result.stderr
    assert a.settle() == 0 and b.settle() == 0
    data = report(log)
    found = rows(data)
    assert found["127.0.0.2:%d" % a.port]["refused"] == 2 and found["127.0.0.2:%d" % b.port]["refused"] == 1
    assert found["db.internal.example:5432"]["refused"] == 1
    assert data["allowed"] == 0 and data["refused"] == data["entries"] == 4
    policy = suggested(log, tmp_path)
    assert allows(policy, "127.0.0.2:%d" % a.port) and allows(policy, "db.internal.example:5432")
    assert not allows(policy, "127.0.0.2:1")


@pytest.fixture
def site() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def rpc(daemon: Any, url: str) -> Dict[str, Any]:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "http_request",
                       "params": {"url": url, "method": "GET", "headers": {}}}).encode()
    request = urllib.request.Request(daemon.url + "/rpc", body, {"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as answer:
        return json.loads(answer.read())  # type: ignore[no-any-return]


def test_the_daemons_log(site: int, two_listeners: List[Listener], tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    try:
        from tests.daemon import Daemon, DaemonUnavailable
    finally:
        sys.path.remove(str(ROOT))
    try:
        daemon = Daemon(tmp_path)
    except DaemonUnavailable as exc:
        skip_unless_local(str(exc))
        raise
    refused = "127.0.0.2:%d" % two_listeners[0].port
    try:
        for _ in range(3):
            assert rpc(daemon, "http://%s/x" % refused)["error"]["code"] == 1001
        assert rpc(daemon, "http://127.0.0.1:%d/" % site)["result"]["status"] == 200
        assert rpc(daemon, "http://127.0.0.1:%d/again" % site)["result"]["status"] in (200, 404)
    finally:
        daemon.stop()
    assert two_listeners[0].settle() == 0
    data = report(daemon.audit_file)
    found = rows(data)
    assert (found[refused]["refused"], found[refused]["allowed"]) == (3, 0)
    assert found[refused]["reasons"] == ["Host '127.0.0.2' is not allowed"]  # the daemon's errorMessage
    local = found["127.0.0.1:%d" % site]
    assert (local["allowed"], local["refused"]) == (2, 0) and local["operations"] == ["http_request"]
    policy = suggested(daemon.audit_file, tmp_path)
    assert allows(policy, refused) and allows(policy, "127.0.0.1:%d" % site) and not allows(policy, "127.0.0.2:1")
