"""Malformed and hostile input, limits, timeouts, disconnect cleanup, shutdown: raw sockets, real broker."""

import socket
import threading
import time
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agenshield_shim.broker import access, server
from agenshield_shim.broker.http1 import HttpError, parse_request_head

from .conftest import BrokerHandle, raw_exchange, status_of


def healthy(b: BrokerHandle) -> bool:
    out = raw_exchange(b.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    return out.startswith(b"HTTP/1.1 200 OK") and b'"status": "ok"' in out


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


@pytest.mark.parametrize(
    "data, status",
    [
        (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", 400),
        (b"GET\r\n\r\n", 400),
        (b"GET / HTTP/1.1 extra\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nNo-Colon\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nA: b\x00c\r\n\r\n", 400),
        (b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
        (b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST /rpc HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
        (b"GET / HTTP/3.0\r\n\r\n", 505),
        (b"GET relative HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET ftp://127.0.0.1/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"DELETE /health HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        (b"GET /rpc HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    ],
)
def test_malformed_heads_get_their_answer(broker: BrokerHandle, data: bytes, status: int) -> None:
    out = raw_exchange(broker.port, data)
    assert status_of(out) == status, out
    assert healthy(broker)


def test_oversized_head_431(make_broker: Any) -> None:
    b = make_broker(max_head_size=4096)
    out = raw_exchange(b.port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n")
    assert status_of(out) == 431
    out = raw_exchange(b.port, b"GET /" + b"a" * 8000)  # never-ending request line
    assert status_of(out) == 431
    assert healthy(b)
    ok = raw_exchange(b.port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 3000 + b"\r\nConnection: close\r\n\r\n")
    assert status_of(ok) == 200


def test_slowloris_gets_408_while_others_are_served(make_broker: Any) -> None:
    b = make_broker(head_timeout=0.8)
    result = {}

    def slow() -> None:
        with socket.create_connection(("127.0.0.1", b.port), timeout=10) as s:
            t0 = time.monotonic()
            try:
                for ch in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                    s.sendall(bytes([ch]))
                    time.sleep(0.05)
            except OSError:
                pass
            data = b""
            try:
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                pass
            result["elapsed"] = time.monotonic() - t0
            result["data"] = data

    threads = [threading.Thread(target=slow) for _ in range(5)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    for _ in range(10):
        assert healthy(b)
    assert time.monotonic() - t0 < 2.0  # served promptly despite the slow clients
    for t in threads:
        t.join(15)
    assert status_of(result["data"]) == 408
    assert result["elapsed"] < 5


def test_silent_connection_closed_without_answer(make_broker: Any) -> None:
    b = make_broker(head_timeout=0.3)
    with socket.create_connection(("127.0.0.1", b.port), timeout=5) as s:
        assert s.recv(100) == b""


def test_keepalive_timeout_closes_idle_connection(make_broker: Any) -> None:
    b = make_broker(keepalive_timeout=0.3)
    with socket.create_connection(("127.0.0.1", b.port), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        t0 = time.monotonic()
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        assert data.count(b"HTTP/1.1 200") == 1
        assert time.monotonic() - t0 < 3


def test_non_loopback_callers_refused_function() -> None:
    """No connection from a non-loopback source can be made on this machine, so: the decision function..."""
    assert access.caller_allowed(socket.AF_INET, ("127.0.0.1", 5))
    assert access.caller_allowed(socket.AF_INET, ("127.8.9.10", 5))
    assert access.caller_allowed(socket.AF_INET6, ("::1", 5, 0, 0))
    assert access.caller_allowed(socket.AF_INET6, ("::ffff:127.0.0.1", 5, 0, 0))
    assert access.caller_allowed(socket.AF_UNIX, "")
    for addr in ("10.0.0.1", "192.168.1.2", "8.8.8.8", "0.0.0.0"):
        assert not access.caller_allowed(socket.AF_INET, (addr, 5))
    for addr in ("fe80::1", "::ffff:10.0.0.1", "2001:db8::1", "::"):
        assert not access.caller_allowed(socket.AF_INET6, (addr, 5, 0, 0))
    assert not access.caller_allowed(socket.AF_INET, None)
    assert not access.caller_allowed(-1, ("127.0.0.1", 1))


def test_non_loopback_callers_refused_server(broker: BrokerHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """... and the server path: with the decision saying "remote", a real connection gets 403."""
    monkeypatch.setattr(server, "caller_allowed", lambda family, peer: False)
    out = raw_exchange(broker.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(out) == 403
    assert broker.stats()["callers_refused"] == 1


def _tunnel_infinite(b: BrokerHandle, name: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", b.port), timeout=10)
    port = b.servers.http_port
    s.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % port)
    assert s.recv(4096).startswith(b"HTTP/1.1 200 Connection Established")
    s.sendall(b"GET /infinite?name=%s HTTP/1.1\r\nHost: x\r\n\r\n" % name.encode())
    got = 0
    while got < 1_000_000:
        got += len(s.recv(65536))
    return s


def test_client_disconnect_mid_tunnel_frees_everything(broker: BrokerHandle, servers: Any) -> None:
    s = _tunnel_infinite(broker, "tun-disc")
    assert broker.stats()["pipes"] == 1 and broker.stats()["upstreams"] == 1
    s.close()
    assert wait_for(lambda: broker.stats()["pipes"] == 0 and broker.stats()["upstreams"] == 0
                    and broker.stats()["connections"] == 0)
    assert wait_for(lambda: "tun-disc" in servers.upstream.disconnects)


def test_client_disconnect_mid_forward_frees_everything(broker: BrokerHandle, servers: Any) -> None:
    s = socket.create_connection(("127.0.0.1", broker.port), timeout=10)
    s.sendall(b"GET http://127.0.0.1:%d/infinite?name=fwd-disc HTTP/1.1\r\nHost: x\r\n\r\n" % servers.http_port)
    got = 0
    while got < 1_000_000:
        got += len(s.recv(65536))
    assert broker.stats()["upstreams"] == 1
    s.close()
    assert wait_for(lambda: broker.stats()["upstreams"] == 0 and broker.stats()["connections"] == 0)
    assert wait_for(lambda: "fwd-disc" in servers.upstream.disconnects)


def test_slow_reader_does_not_make_broker_buffer(broker: BrokerHandle, servers: Any) -> None:
    """Back-pressure: a client that stops reading stops the upstream too (bounded memory)."""
    s = socket.create_connection(("127.0.0.1", broker.port), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s.sendall(b"GET http://127.0.0.1:%d/big?n=%d HTTP/1.1\r\nHost: x\r\n\r\n" % (servers.http_port, 200_000_000))
    time.sleep(1.0)  # without back-pressure the broker would read ~all 200 MB from loopback in this time

    async def buffered() -> int:
        total = 0
        for task, conn in broker.broker._conn_tasks.items():
            total += len(conn.stream.buf)
            w = conn.stream.writer
            total += w.transport.get_write_buffer_size()
            if conn.upstream is not None:
                total += len(conn.upstream.buf) + len(conn.upstream.reader._buffer)
        return total

    held = broker.bt.loop_thread.run(buffered())
    s.close()
    assert held < 8 * 1024 * 1024, held


def test_slow_reader_does_not_make_tunnel_buffer(broker: BrokerHandle, servers: Any) -> None:
    s = socket.create_connection(("127.0.0.1", broker.port), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % servers.http_port)
    assert s.recv(39).startswith(b"HTTP/1.1 200")
    s.sendall(b"GET /big?n=%d HTTP/1.1\r\nHost: x\r\n\r\n" % 200_000_000)
    time.sleep(1.0)

    async def buffered() -> int:
        return sum(cw.transport.get_write_buffer_size() + uw.transport.get_write_buffer_size()
                   for cw, uw in broker.broker.services.pipes)

    assert broker.stats()["pipes"] == 1
    held = broker.bt.loop_thread.run(buffered())
    s.close()
    assert held < 4 * 1024 * 1024, held


def test_tunnel_idle_timeout(make_broker: Any) -> None:
    b = make_broker(idle_timeout=0.5)
    with socket.create_connection(("127.0.0.1", b.port), timeout=10) as s:
        s.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % b.servers.http_port)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        assert s.recv(100) == b""
        assert 0.3 < time.monotonic() - t0 < 5
    assert wait_for(lambda: b.stats()["upstreams"] == 0)


def test_forward_idle_timeout_before_response_is_502(make_broker: Any) -> None:
    b = make_broker(idle_timeout=0.5)
    out = raw_exchange(b.port, b"GET http://127.0.0.1:%d/slow?s=3 HTTP/1.1\r\nHost: x\r\n\r\n" % b.servers.http_port)
    assert status_of(out) == 502 and b"X-Proxy-Error: network-error" in out


def test_graceful_stop_closes_tunnels_and_lets_inflight_finish(make_broker: Any, servers: Any) -> None:
    b = make_broker()
    tunnel = _tunnel_infinite(b, "stop-tun")
    answer = {}

    def slow_rpc() -> None:
        answer["r"] = b.rpc("http_request", {"url": servers.http + "/slow?s=1"})

    t = threading.Thread(target=slow_rpc)
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    b.bt.stop()
    assert time.monotonic() - t0 < 4
    t.join(10)
    assert answer["r"]["result"]["body"] == "slow"
    tunnel.settimeout(5)
    data = b"x"
    while data:
        data = tunnel.recv(1 << 20)  # drains to EOF: the tunnel was closed
    tunnel.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", b.port), timeout=2).close()
    assert wait_for(lambda: "stop-tun" in servers.upstream.disconnects)


# -- fuzz ---------------------------------------------------------------------------------------------

_line = st.binary(min_size=0, max_size=60).filter(lambda b: b"\r\n" not in b)
_heads = st.one_of(
    st.binary(max_size=300).map(lambda b: b + b"\r\n\r\n"),
    st.builds(lambda a, b, c: a + b"\r\n" + b + b"\r\n" + c + b"\r\n\r\n", _line, _line, _line),
    st.builds(lambda m, t, v: m + b" " + t + b" HTTP/" + v + b"\r\nHost: x\r\n\r\n",
              st.sampled_from([b"GET", b"POST", b"CONNECT", b"G\x00T", b""]), _line, _line),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(head=_heads)
def test_fuzz_heads(broker: BrokerHandle, head: bytes) -> None:
    """Any head gets an HTTP answer (or a silent close for an empty one); the broker stays up."""
    out = raw_exchange(broker.port, head, timeout=15)
    if out:
        assert out.startswith(b"HTTP/1.1 "), out[:100]
        assert status_of(out) in (200, 400, 403, 404, 405, 411, 413, 431, 501, 502, 505)
    try:
        parse_request_head(head)
    except HttpError as exc:
        assert exc.status in (400, 505)


def test_broker_survives_fuzzing(broker: BrokerHandle) -> None:
    for junk in (b"\xff" * 100 + b"\r\n\r\n", b"\r\n" * 50, b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 500 + b"\r\n"):
        raw_exchange(broker.port, junk)
    assert healthy(broker)
