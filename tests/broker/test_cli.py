"""The real command line as a subprocess: start-up line, ready file, Unix socket, signals, errors, audit."""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, List

import pytest

from agenshield_shim.broker.runner import BrokerProcess

from .conftest import raw_exchange, status_of

ROOT = Path(__file__).resolve().parents[2]


def run_cli(args: List[str], timeout: float = 20) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "agenshield_shim.broker", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def unix_exchange(path: str, data: bytes, half_close: bool = True) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


def test_port_zero_prints_address_and_ready_file(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    audit = tmp_path / "audit.jsonl"
    with BrokerProcess(["--port", "0", "--ready-file", str(ready), "--audit", str(audit)]) as p:
        assert p.urls[0].startswith("http://127.0.0.1:") and p.port > 0
        assert ready.read_text().strip() == "127.0.0.1:%d" % p.port
        out = raw_exchange(p.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(out) == 200 and b'"extensions"' in out
        raw_exchange(p.port, b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
        code = p.stop()
    assert code == 0
    assert not ready.exists()
    entries = [json.loads(x) for x in audit.read_text().splitlines()]
    assert len(entries) == 1
    e = entries[0]
    assert set(e) == {"id", "timestamp", "operation", "channel", "allowed", "policyId", "target", "result",
                      "durationMs", "metadata"}
    assert e["operation"] == "forward" and e["allowed"] is False and e["channel"] == "http"
    assert e["target"] == "http://example.com/" and e["result"] == "denied"


def test_shim_cli_forwards_to_broker() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "agenshield_shim", "broker", "--port", "0", "--compat"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("agenshield broker listening on http://127.0.0.1:")
        port = int(line.rsplit(":", 1)[1])
        out = raw_exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert out.endswith(b'{"status": "ok", "version": "0.1.0"}')  # --compat: no extensions
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


def test_unix_socket_only(tmp_path: Path, servers: Any) -> None:
    path = str(tmp_path / "broker.sock")
    with BrokerProcess(["--unix", path]) as p:
        assert p.urls == ["unix:" + path]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        out = unix_exchange(path, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(out) == 200
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "http_request",
                           "params": {"url": servers.http + "/hello"}}).encode()
        out = unix_exchange(path, b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        assert b'"body": "hello"' in out
        req = b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        out = unix_exchange(path, b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % servers.http_port + req, half_close=False)
        assert out.startswith(b"HTTP/1.1 200 Connection Established") and out.endswith(b"hello")
        curl = subprocess.run(["/usr/bin/curl", "-sS", "--unix-socket", path, "http://localhost/health"],
                              capture_output=True, text=True, timeout=20)
        assert json.loads(curl.stdout)["status"] == "ok"
        assert p.stop() == 0
        err = p.proc.stderr
    assert not os.path.exists(path)
    del err


def test_unix_socket_mode_and_tcp_together(tmp_path: Path) -> None:
    path = str(tmp_path / "b.sock")
    with BrokerProcess(["--unix", path, "--unix-mode", "660", "--port", "0"]) as p:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        assert len(p.urls) == 2
        assert status_of(raw_exchange(p.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")) == 200


def test_unix_socket_audit_channel(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")
    audit = tmp_path / "a.jsonl"
    with BrokerProcess(["--unix", path, "--audit", str(audit)]):
        unix_exchange(path, b"CONNECT example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n")
    e = json.loads(audit.read_text().splitlines()[0])
    assert e["channel"] == "socket" and e["operation"] == "connect" and e["allowed"] is False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_closes_tunnels_and_exits_zero(servers: Any, sig: int) -> None:
    p = BrokerProcess(["--port", "0"])
    s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    s.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % servers.http_port)
    assert s.recv(4096).startswith(b"HTTP/1.1 200")
    t0 = time.monotonic()
    assert p.stop(sig) == 0
    assert time.monotonic() - t0 < 5
    assert s.recv(100) == b""  # the tunnel was closed
    s.close()


def test_ipv6_loopback() -> None:
    with BrokerProcess(["--host", "::1", "--port", "0"]) as p:
        assert p.url.startswith("http://[::1]:")
        out = raw_exchange(p.port, b"GET /health HTTP/1.1\r\nHost: [::1]\r\n\r\n", host="::1")
        assert status_of(out) == 200


def test_malformed_policy_refused_at_start(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text('[[rules]]\naction = "allow"\nhosts = ["a.test"]\n[[rules]]\nid = "web"\naction = "allow"\nports = [70000]\n')
    r = run_cli(["--port", "0", "--policy", str(f)])
    assert r.returncode == 2 and r.stdout == ""
    assert "rule 1 (id 'web')" in r.stderr and "field 'ports'" in r.stderr


def test_bad_flags_and_busy_port() -> None:
    r = run_cli(["--port", "x"])
    assert r.returncode == 2 and "not a port" in r.stderr
    r = run_cli(["--port", "0", "--allow", "a:b:c:d:"])
    assert r.returncode == 2 and "--allow" in r.stderr
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        r = run_cli(["--port", str(busy.getsockname()[1])])
        assert r.returncode == 1 and "cannot listen" in r.stderr
    finally:
        busy.close()


def test_policy_file_and_limits_flags(tmp_path: Path, servers: Any) -> None:
    f = tmp_path / "p.toml"
    f.write_text('[[rules]]\nid = "up"\naction = "allow"\nhosts = ["127.0.0.1"]\nports = [%d]\n' % servers.http_port)
    with BrokerProcess(["--port", "0", "--policy", str(f), "--max-body-size", "1KiB", "--max-head-size", "2k"]) as p:
        ok = raw_exchange(p.port, b"GET http://127.0.0.1:%d/hello HTTP/1.1\r\nHost: x\r\n\r\n" % servers.http_port)
        assert ok.endswith(b"hello")
        assert status_of(raw_exchange(p.port, b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: x\r\n\r\n")) == 403
        assert status_of(raw_exchange(p.port, b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n")) == 413
        assert status_of(raw_exchange(p.port, b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 3000 + b"\r\n\r\n")) == 431
