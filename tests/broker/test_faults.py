"""Faults the broker must handle (issue 15): stalled bodies, too many connections, stalled tunnels,
aborted uploads, an unwritable audit log, and bad input that used to drop the connection with a
traceback. Each prints its figure where the issue asks for one (``pytest -s`` shows them)."""

import asyncio
import gc
import json
import os
import resource
import socket
import subprocess
import sys
import time
import tracemalloc
from typing import Any, Callable, Dict, List

import pytest

from agenshield_shim.broker.audit import AuditError
from agenshield_shim.broker.config import BrokerConfig
from agenshield_shim.broker.http1 import READ_SIZE
from agenshield_shim.broker.runner import BrokerThread
from agenshield_shim.broker.server import listen_warnings
from agenshield_shim.broker.tunnel import PIPE_BUFFER

from .conftest import BrokerHandle, raw_exchange, status_of
from .test_binding import Listener


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def figure(text: str) -> None:
    print("\n[figure] " + text)


# -- timeouts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [b"/rpc", b"/health", b"/nowhere"])
def test_a_stalled_body_is_408_after_body_timeout(make_broker: Any, path: bytes) -> None:
    b = make_broker(body_timeout=0.5)
    t0 = time.monotonic()
    out = raw_exchange(b.port, b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"js" % path, half_close=False)
    took = time.monotonic() - t0
    assert status_of(out) == 408 and b"request body not received within 0.5 s" in out
    assert 0.4 < took < 3
    assert wait_for(lambda: b.stats()["connections"] == 0)


def test_a_stalled_socket_line_is_closed_after_body_timeout(make_broker: Any, tmp_path: Any) -> None:
    path = str(tmp_path / "b.sock")
    b = make_broker(unix=path, body_timeout=0.5)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        t0 = time.monotonic()
        s.sendall(b'{"jsonrpc": "2.0", ')  # and never the rest of the line
        assert s.recv(100) == b""
        assert 0.4 < time.monotonic() - t0 < 3
    assert b.stats().get("bad_requests_408") == 1


# -- a cap on connections, back-pressure ------------------------------------------------------------------


def test_connections_past_the_cap_wait_in_the_backlog(make_broker: Any) -> None:
    """20 silent connections against a cap of 8: 8 are held, the rest wait unaccepted; as the held
    ones go, the waiting ones are served (a /health behind them is answered)."""
    b = make_broker(max_connections=8, head_timeout=30, keepalive_timeout=30)
    idle = [socket.create_connection(("127.0.0.1", b.port), timeout=10) for _ in range(20)]
    assert wait_for(lambda: b.stats()["connections"] == 8)
    time.sleep(0.2)
    held = b.stats()["connections"]
    figure("connections held with 20 open and max_connections=8: %d" % held)
    assert held == 8
    late = socket.create_connection(("127.0.0.1", b.port), timeout=10)
    late.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    late.settimeout(0.5)
    with pytest.raises(socket.timeout):
        late.recv(100)  # not accepted yet: the broker does not read it
    for s in idle:
        s.close()
    late.settimeout(10)
    data = b""
    while True:
        chunk = late.recv(65536)
        if not chunk:
            break
        data += chunk
    late.close()
    assert status_of(data) == 200
    assert wait_for(lambda: b.stats()["connections"] == 0)


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96))


@pytest.mark.parametrize("cap", [None, "1000"])
def test_out_of_descriptors_is_one_line_not_a_traceback_flood(cap: Any, tmp_path: Any) -> None:
    """A broker with 96 descriptors and 300 callers. With the default cap (a quarter of the limit)
    it never runs out; told to serve 1000, it runs out: one stderr line, no traceback, and it
    serves again once callers leave."""
    args = ["--port", "0", "--audit", str(tmp_path / "audit.log"), "--head-timeout", "30"]
    if cap:
        args += ["--max-connections", cap]
    err = open(str(tmp_path / "stderr"), "w+")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, AGENSHIELD_ENABLED="false", PYTHONPATH=root)
    proc = subprocess.Popen([sys.executable, "-m", "agenshield_shim.broker", *args], stdout=subprocess.PIPE,
                            stderr=err, env=env, text=True, preexec_fn=_low_fd_limit)
    line = proc.stdout.readline() if proc.stdout else ""
    assert "listening on http://" in line, line
    port = int(line.strip().rsplit(":", 1)[1])
    clients: List[socket.socket] = []
    try:
        for _ in range(300):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        time.sleep(1.0)
        for s in clients:
            s.close()
        clients = []
        time.sleep(0.5)
        out = raw_exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status_of(out) == 200
    finally:
        for s in clients:
            s.close()
        proc.terminate()
        proc.wait(10)
    err.seek(0)
    text = err.read()
    err.close()
    figure("stderr with cap=%s: %d bytes, %d lines" % (cap or "default(24)", len(text), len(text.splitlines())))
    assert "Traceback" not in text and "exception" not in text.lower(), text[:2000]
    if cap:
        assert text.count("cannot accept a connection") == 1, text
    else:
        assert "cannot accept" not in text, text


# -- stalled tunnels: bounded memory ----------------------------------------------------------------------


def test_memory_per_stalled_tunnel_is_bounded(broker: BrokerHandle, servers: Any) -> None:
    """20 tunnels whose client never reads a 200 MB download: the broker holds at most one pipe
    buffer and one read per tunnel, and gives it back when they close (Python heap, tracemalloc)."""
    n = 20
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        socks = []
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", broker.port), timeout=10)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            s.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % servers.http_port)
            assert s.recv(39).startswith(b"HTTP/1.1 200")
            s.sendall(b"GET /big?n=%d HTTP/1.1\r\nHost: x\r\n\r\n" % 200_000_000)
            socks.append(s)

        async def buffered() -> int:
            return sum(cw.transport.get_write_buffer_size() for cw, _uw in broker.broker.services.pipes)

        last = -1
        for _ in range(100):  # until every tunnel has stalled (the buffers stop growing)
            time.sleep(0.1)
            now = broker.bt.loop_thread.run(buffered())
            if now == last:
                break
            last = now
        held = tracemalloc.get_traced_memory()[0] - base
        per_tunnel = held / n
        figure("memory per stalled tunnel: %.0f KiB of Python heap, %.0f KiB in write buffers (bound %d KiB)"
               % (per_tunnel / 1024, last / n / 1024, (PIPE_BUFFER + READ_SIZE) // 1024))
        assert last / n <= PIPE_BUFFER + READ_SIZE
        assert per_tunnel < PIPE_BUFFER + READ_SIZE + 256 * 1024
        for s in socks:
            s.close()
        assert wait_for(lambda: broker.stats()["pipes"] == 0 and broker.stats()["upstreams"] == 0)
        time.sleep(0.3)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0] - base
        figure("after the 20 tunnels closed: %.0f KiB still held" % (after / 1024))
        assert after < held / 4
    finally:
        tracemalloc.stop()


# -- aborted uploads --------------------------------------------------------------------------------------


def test_an_aborted_upload_releases_its_upstream_at_once(broker: BrokerHandle, servers: Any) -> None:
    errors: List[Dict[str, Any]] = []

    async def install() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))

    broker.bt.loop_thread.run(install())
    try:
        s = socket.create_connection(("127.0.0.1", broker.port), timeout=10)
        s.sendall(b"POST http://127.0.0.1:%d/upload?name=aborted HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n"
                  % servers.http_port)
        s.sendall(b"x" * 1_000_000)
        assert wait_for(lambda: servers.upstream.upload_progress.get("aborted", 0) > 0)
        t0 = time.monotonic()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()  # a reset: the client is gone mid-body
        assert wait_for(lambda: broker.stats()["upstreams"] == 0 and broker.stats()["connections"] == 0)
        figure("aborted upload: upstream released %.2f s after the client left" % (time.monotonic() - t0))
        assert time.monotonic() - t0 < 2
        gc.collect()
        time.sleep(0.1)
        assert [e.get("message") for e in errors] == []
    finally:
        async def restore() -> None:
            asyncio.get_running_loop().set_exception_handler(None)

        broker.bt.loop_thread.run(restore())


def test_a_bad_chunk_size_in_a_forwarded_body_fails_fast(broker: BrokerHandle, servers: Any) -> None:
    t0 = time.monotonic()
    out = raw_exchange(broker.port, b"POST http://127.0.0.1:%d/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"5\r\nhello\r\nzz\r\n" % servers.http_port, half_close=False)
    assert status_of(out) == 400 and b"malformed request body" in out
    assert time.monotonic() - t0 < 3
    assert wait_for(lambda: broker.stats()["upstreams"] == 0)


# -- the audit log ----------------------------------------------------------------------------------------


def test_an_unwritable_audit_log_refuses_decisions(loop_thread: Any, servers: Any, capfd: Any) -> None:
    """Audit to /dev/full (every write fails): tunnels, forwards and rpc calls are refused, stderr
    says so once, and after the first failure no upstream is even contacted."""
    listener = Listener("127.0.0.1")
    bt = BrokerThread(BrokerConfig(port=0, audit_file="/dev/full", allow=("127.0.0.1",)), loop_thread=loop_thread)
    try:
        port = bt.port
        refused = 0
        for _ in range(3):
            out = raw_exchange(port, b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % listener.port)
            assert status_of(out) == 503 and b"audit log cannot be written" in out
            refused += 1
            out = raw_exchange(port, b"GET http://127.0.0.1:%d/hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                               % servers.http_port)
            assert status_of(out) == 503 and b"audit-failed" in out
            refused += 1
            body = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "http_request",
                               "params": {"url": "%s/hello" % servers.http}}).encode()
            out = raw_exchange(port, b"POST /rpc HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                               % (len(body), body))
            envelope = json.loads(out.split(b"\r\n\r\n", 1)[1].split(b"\r\n")[1])
            assert envelope["error"]["code"] == -32603 and "audit log cannot be written" in envelope["error"]["message"]
            refused += 1
        stats = bt.loop_thread.run(_stats(bt))
        measured = ("audit to /dev/full: %d of %d allowed decisions refused, %d upstream connections made"
                    % (refused, 9, listener.accepted))
        assert listener.accepted <= 1  # at most the first tunnel, whose line failed after its connect
        assert stats.get("tunnels", 0) == 0 and stats.get("forwards", 0) == 0
    finally:
        bt.stop()
        listener.close()
    err = capfd.readouterr().err
    figure(measured)
    assert err.count("cannot write the audit log /dev/full") == 1, err


async def _stats(bt: BrokerThread) -> Dict[str, int]:
    return bt.broker.stats()


def test_an_unopenable_audit_path_is_a_clear_start_error(tmp_path: Any) -> None:
    from agenshield_shim.broker.server import Broker

    async def start() -> None:
        await Broker(BrokerConfig(port=0, audit_file="/proc/version")).start()

    with pytest.raises(AuditError, match="cannot open the audit log /proc/version"):
        asyncio.run(start())
    p = subprocess.run([sys.executable, "-m", "agenshield_shim.broker", "--port", "0", "--audit", "/proc/version"],
                       capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, AGENSHIELD_ENABLED="false"))
    assert p.returncode == 1
    assert "cannot open the audit log /proc/version" in p.stderr and "cannot listen" not in p.stderr


# -- bad input: each its documented answer ----------------------------------------------------------------


@pytest.mark.parametrize("data, status", [
    (b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Length: \xc2\xb2\r\n\r\n", 400),
    (b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\n", 400),
    (b"CONNECT 127.0.0.1:\xc2\xb2 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"CONNECT 127.0.0.1:\xb2 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"POST /rpc HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\xa0\r\n\r\n0\r\n\r\n", 501),
    (b"GET /health HTTP/1.2\r\nHost: x\r\n\r\n", 505),
    (b"POST /rpc HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1_0\r\n", 400),
    (b"POST /rpc HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0x4\r\n", 400),
    (b"GET /health HTTP/1.9\r\nHost: x\r\n\r\n", 505),
    (b"GET http://[::ffff:7f00:2%25eth0]/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
])
def test_bad_input_gets_its_documented_status(broker: BrokerHandle, data: bytes, status: int) -> None:
    out = raw_exchange(broker.port, data)
    assert status_of(out) == status, out[:300]
    assert broker.stats().get("internal_errors", 0) == 0


def test_chunked_with_nbsp_is_not_forwarded(make_broker: Any) -> None:
    listener = Listener("127.0.0.1")
    try:
        b = make_broker(allow=["127.0.0.1"])
        out = raw_exchange(b.port, b"POST http://127.0.0.1:%d/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\xa0\r\n\r\n"
                           b"0\r\n\r\n" % listener.port)
        assert status_of(out) == 501 and listener.accepted == 0
    finally:
        listener.close()


def test_deep_nesting_on_rpc_is_a_parse_error(broker: BrokerHandle) -> None:
    status, body = broker.post_raw(b"[" * 100_000)
    assert status == 200 and body["error"]["code"] == -32700 and body["id"] == 0


@pytest.mark.parametrize("raw", [b'{"jsonrpc":"2.0","id":NaN,"method":"ping"}',
                                 b'{"jsonrpc":"2.0","id":Infinity,"method":"ping"}',
                                 b'{"jsonrpc":"2.0","id":1e400,"method":"ping"}'])
def test_non_json_numbers_are_never_echoed(broker: BrokerHandle, compat_broker: BrokerHandle, raw: bytes) -> None:
    for b in (broker, compat_broker):
        status, body = b.post_raw(raw)  # post_raw parses the answer with json.loads: strict enough here
        assert status == 200 and body["error"]["code"] == -32700 and body["id"] == 0
        assert isinstance(body, dict)


def test_non_json_numbers_on_the_0_7_2_socket(make_broker: Any, tmp_path: Any) -> None:
    path = str(tmp_path / "l.sock")
    make_broker(unix=path, tcp=False, compat_version="0.7.2")
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(b'{"jsonrpc":"2.0","id":NaN,"method":"ping","params":{"echo":1}}\n' + b"[" * 100_000 + b"\n")
        data = b""
        while data.count(b"\n") < 2:
            chunk = s.recv(65536)
            assert chunk
            data += chunk
    answers = [json.loads(line, parse_constant=lambda c: pytest.fail("non-JSON %s" % c)) for line in data.splitlines()]
    assert [a["error"]["code"] for a in answers] == [-32700, -32700]


def test_non_loopback_listen_addresses_warn() -> None:
    assert listen_warnings(["127.0.0.1", "::1", "127.0.0.5"]) == []
    warned = listen_warnings(["0.0.0.0", "::", "192.0.2.1"])
    assert len(warned) == 3 and all("not a loopback address" in w for w in warned)
