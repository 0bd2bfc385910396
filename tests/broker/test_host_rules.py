"""RFC 9112 3.2 (``Host``) and 6.1 (``Transfer-Encoding`` in HTTP/1.0) at the broker's front door.

Raw requests on loopback sockets to a real broker: an HTTP/1.1 request without ``Host``, any request
with more than one, and an HTTP/1.0 request with ``Transfer-Encoding`` are ``400`` with the
broker's error body, on every route (``/health``, ``/rpc``, forward, ``CONNECT``), and a forward or
tunnel refused so never reaches its upstream. What real clients send stays served: HTTP/1.0
without ``Host`` (http.client's ``CONNECT`` up to Python 3.11), an empty ``Host``.
``--compat 0.7.2`` answers as the daemon 0.7.2 does (``test_daemon_differential.py`` compares).
"""

import http.client
import socket
from typing import Any

import pytest

from tests.broker.conftest import BrokerHandle, raw_exchange, status_of
from tests.broker.test_binding import Listener

RPC = b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{}}'
H = b"Host: 127.0.0.1\r\n"
CHUNKED_RPC = b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(RPC), RPC)
NO_HOST = b"HTTP/1.1 request without a Host header"
TWO_HOSTS = b"more than one Host header"
TE_10 = b"Transfer-Encoding in an HTTP/1.0 request"

LOCAL = [
    (b"GET /health HTTP/1.1\r\n\r\n", NO_HOST),
    (b"GET /health HTTP/1.1\r\n" + H + H + b"\r\n", TWO_HOSTS),
    (b"GET /health HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", TWO_HOSTS),
    (b"GET /health HTTP/1.0\r\n" + H + H + b"\r\n", TWO_HOSTS),
    (b"POST /rpc HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(RPC), RPC), NO_HOST),
    (b"POST /rpc HTTP/1.1\r\n" + H + H + b"Content-Length: %d\r\n\r\n%s" % (len(RPC), RPC), TWO_HOSTS),
    (b"POST /rpc HTTP/1.0\r\n" + CHUNKED_RPC, TE_10),
    (b"POST /rpc HTTP/1.0\r\n" + H + CHUNKED_RPC, TE_10),
    (b"GET /health HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", TE_10),
    (b"POST /rpc HTTP/1.0\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", TE_10),
]


def _assert_refused(out: bytes, message: bytes) -> None:
    """The broker's documented error answer: 400, text/plain, the rule in the body, closed."""
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 400 Bad Request", out[:300]
    assert b"\r\nContent-Type: text/plain" in head and b"\r\nConnection: close" in head, out[:300]
    assert body == message + b"\n", out[:300]


@pytest.mark.parametrize("data, message", LOCAL, ids=[
    "health-no-host", "health-two-hosts", "health-two-hosts-case", "health-http1.0-two-hosts", "rpc-no-host",
    "rpc-two-hosts", "rpc-http1.0-chunked", "rpc-http1.0-host-chunked", "health-http1.0-chunked", "rpc-http1.0-gzip"])
def test_local_routes_refuse(broker: BrokerHandle, data: bytes, message: bytes) -> None:
    _assert_refused(raw_exchange(broker.port, data), message)
    assert broker.stats().get("internal_errors", 0) == 0


@pytest.mark.parametrize("shape, message", [
    (b"GET http://127.0.0.1:%d/ HTTP/1.1\r\n\r\n", NO_HOST),
    (b"GET http://127.0.0.1:%d/ HTTP/1.1\r\n" + H + H + b"\r\n", TWO_HOSTS),
    (b"POST http://127.0.0.1:%d/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", TE_10),
    (b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\n", NO_HOST),
    (b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: 127.0.0.2\r\n\r\n", TWO_HOSTS),
    (b"CONNECT 127.0.0.1:%d HTTP/1.0\r\nHost: 127.0.0.1\r\nHost: 127.0.0.1\r\n\r\n", TWO_HOSTS),
], ids=["forward-no-host", "forward-two-hosts", "forward-http1.0-chunked", "connect-no-host", "connect-two-hosts",
        "connect-http1.0-two-hosts"])
def test_proxy_routes_refuse_before_any_upstream(make_broker: Any, shape: bytes, message: bytes) -> None:
    listener = Listener("127.0.0.1")
    try:
        b = make_broker(allow=["127.0.0.1"])
        _assert_refused(raw_exchange(b.port, shape % listener.port), message)
        assert listener.accepted == 0
    finally:
        listener.close()


def test_compat_0_7_3_refuses_too(make_broker: Any) -> None:
    b = make_broker(compat=True)
    _assert_refused(raw_exchange(b.port, b"GET /health HTTP/1.1\r\n" + H + H + b"\r\n"), TWO_HOSTS)


@pytest.mark.parametrize("data", [
    b"GET /health HTTP/1.0\r\n\r\n",  # HTTP/1.0 needs no Host
    b"GET /health HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n",  # empty: one Host, no authority
    b"GET /health HTTP/1.1\r\nHOST: x\r\nConnection: close\r\n\r\n",
], ids=["http1.0-no-host", "empty-host", "upper-case-host"])
def test_what_clients_send_is_served(broker: BrokerHandle, data: bytes) -> None:
    assert status_of(raw_exchange(broker.port, data)) == 200


def test_connect_http10_without_host_is_served(broker: BrokerHandle) -> None:
    """What http.client (so urllib3, requests, pip) sends up to Python 3.11: ``CONNECT h:p HTTP/1.0``, no Host."""
    port = broker.servers.http_port
    with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as s:
        s.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.0\r\n\r\nGET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % port)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    assert out.startswith(b"HTTP/1.1 200 "), out[:200]
    assert out.count(b"HTTP/1.1 200 ") == 2, out[:400]


def test_http_client_tunnels_through_the_broker(broker: BrokerHandle) -> None:
    """This interpreter's own ``CONNECT`` (1.0 without Host up to 3.11, 1.1 with Host from 3.12)."""
    conn = http.client.HTTPConnection("127.0.0.1", broker.port, timeout=10)
    conn.set_tunnel("127.0.0.1", broker.servers.http_port)
    try:
        conn.request("GET", "/hello")
        assert conn.getresponse().status == 200
    finally:
        conn.close()


# -- --compat 0.7.2: the daemon's answers -----------------------------------------------------------------


def test_compat_0_7_2_keeps_the_daemons_host_answers(make_broker: Any) -> None:
    b = make_broker(compat_version="0.7.2")
    out = raw_exchange(b.port, b"GET /health HTTP/1.1\r\n" + H + H + b"Connection: close\r\n\r\n")
    assert status_of(out) == 200, out[:300]  # Node keeps the first Host
    out = raw_exchange(b.port, b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 Bad Request\r\n") and out.endswith(b"\r\n\r\n0\r\n\r\n"), out[:300]


def test_compat_0_7_2_refuses_te_in_http10(make_broker: Any) -> None:
    """A deliberate difference (the daemon de-chunks it): the codec's framing rule holds in every mode."""
    b = make_broker(compat_version="0.7.2")
    out = raw_exchange(b.port, b"POST /rpc HTTP/1.0\r\n" + CHUNKED_RPC)
    assert out == b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n", out[:300]
