"""The Unix socket's two framings: newline-delimited JSON-RPC (the daemon's) beside HTTP.

A connection whose first byte opens a JSON value (``{``, ``[``, whitespace) is served one JSON-RPC
call per line, one line back, in order; any other connection is HTTP. ``--compat 0.7.2`` serves
only lines there, as the published daemon does. Real in-process brokers, real Unix sockets.
"""

import json
import os
import shutil
import socket
import tempfile
from typing import Any, Callable, Iterator, List

import pytest

from .conftest import BrokerHandle

PING = b'{"jsonrpc":"2.0","id":%d,"method":"ping","params":{}}\n'


@pytest.fixture
def sock_path() -> Iterator[str]:
    """A short path: AF_UNIX paths are limited to ~107 bytes and pytest's tmp paths can be longer."""
    folder = tempfile.mkdtemp(prefix="agsl-")
    yield os.path.join(folder, "broker.sock")
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def unix_broker(make_broker: Callable[..., BrokerHandle], sock_path: str) -> BrokerHandle:
    return make_broker(unix=sock_path, allow=["127.0.0.1"])


class LineClient:
    """One connection to the socket: send bytes, read answer lines one at a time."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> Any:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, "the broker closed the connection; received so far: %r" % self.buf
            self.buf += chunk
        raw, _, self.buf = self.buf.partition(b"\n")
        assert raw.decode("ascii")  # the reference broker answers ASCII-only JSON
        return json.loads(raw)

    def closed(self) -> bool:
        """True once the broker has closed the connection (nothing more was sent before)."""
        data = self.sock.recv(65536)
        self.buf += data
        return data == b""

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def lines(sock_path: str) -> Iterator[Callable[[], LineClient]]:
    opened: List[LineClient] = []

    def connect() -> LineClient:
        c = LineClient(sock_path)
        opened.append(c)
        return c

    yield connect
    for c in opened:
        c.close()


def test_several_calls_on_one_connection_answered_in_order(unix_broker: BrokerHandle, lines: Any) -> None:
    c = lines()
    url = unix_broker.servers.http + "/hello"
    c.send(PING % 1 + json.dumps({"jsonrpc": "2.0", "id": "two", "method": "http_request", "params": {"url": url}}).encode()
           + b"\n" + json.dumps({"jsonrpc": "2.0", "id": 3, "method": "policy_check",
                                 "params": {"operation": "http_request", "target": "http://127.0.0.2/"}}).encode() + b"\n")
    first, second, third = c.line(), c.line(), c.line()
    assert first["id"] == 1 and first["result"]["pong"] is True and "tunnel" in first["result"]["extensions"]
    assert second["id"] == "two" and second["result"]["status"] == 200 and second["result"]["body"] == "hello"
    assert third == {"jsonrpc": "2.0", "id": 3, "result": {"allowed": False, "reason": "Host '127.0.0.2' is not allowed"}}
    c.send(PING % 4)  # the connection stays open for more
    assert c.line()["id"] == 4


def test_a_line_split_across_writes_is_one_call(unix_broker: BrokerHandle, lines: Any) -> None:
    c = lines()
    call = PING % 5
    c.send(call[:10])
    c.send(call[10:])
    assert c.line()["id"] == 5


def test_malformed_lines_get_error_lines_and_the_connection_goes_on(unix_broker: BrokerHandle, lines: Any) -> None:
    c = lines()
    c.send(b"{not json\n" + b"\n  \r\n" + b"[" + PING.rstrip(b"\n") % 1 + b"]\n" + b'{"jsonrpc":"2.0","id":2,"method":"nope","params":{}}\n'
           + b"\xff\xfe\n" + PING % 3)
    assert c.line() == {"jsonrpc": "2.0", "id": 0, "error": {"code": -32700, "message": "Parse error"}}
    # the blank lines got no answer: the next line answers the batch
    batch = c.line()
    assert batch["id"] == 0 and batch["error"]["code"] == -32600
    unknown = c.line()
    assert unknown["id"] == 2 and unknown["error"]["code"] == -32601
    assert c.line() == {"jsonrpc": "2.0", "id": 0, "error": {"code": -32700, "message": "Parse error"}}
    assert c.line()["id"] == 3


def test_an_over_long_line_closes_that_connection_only(make_broker: Any, sock_path: str, lines: Any) -> None:
    b = make_broker(unix=sock_path, max_body_size=4096)
    c = lines()
    c.send(PING % 1)
    assert c.line()["id"] == 1
    c.send(b'{"jsonrpc":"2.0","id":2,"method":"ping","params":{"pad":"' + b"x" * 8192)  # no newline in sight
    assert c.closed(), "an over-long line must end the connection, not be buffered without bound"
    assert b.stats().get("bad_requests_413") == 1
    other = lines()
    other.send(PING % 3)
    assert other.line()["id"] == 3


def test_http_is_still_served_on_the_socket(unix_broker: BrokerHandle, sock_path: str, lines: Any) -> None:
    c = lines()
    c.send(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    raw = b""
    while not raw.endswith(b"}"):
        chunk = c.sock.recv(65536)
        assert chunk, raw
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and json.loads(body)["extensions"][0] == "tunnel"
    body = PING.rstrip(b"\n") % 7
    c.send(b"POST /rpc HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    rest = b""
    while True:
        chunk = c.sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    assert rest.startswith(b"HTTP/1.1 200 ") and b'"id": 7' in rest  # keep-alive HTTP, then closed as asked
    # and a line client on the same socket, at the same time
    other = lines()
    other.send(PING % 8)
    assert other.line()["id"] == 8


def test_audit_says_socket_for_lines_and_http_for_tcp(unix_broker: BrokerHandle, lines: Any) -> None:
    url = unix_broker.servers.http + "/hello"
    c = lines()
    c.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "http_request", "params": {"url": url}}).encode() + b"\n")
    assert c.line()["result"]["status"] == 200
    c.send(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "http_request", "params": {"url": "http://127.0.0.2/"}}).encode() + b"\n")
    assert c.line()["error"]["code"] == 1001
    assert unix_broker.rpc("http_request", {"url": url})["result"]["status"] == 200
    entries = [e for e in unix_broker.audit.entries() if e["operation"] == "http_request"]
    assert [(e["channel"], e["allowed"], e["target"]) for e in entries] == [
        ("socket", True, url), ("socket", False, "http://127.0.0.2/"), ("http", True, url)]


def test_compat_072_socket_speaks_only_lines(make_broker: Any, sock_path: str, lines: Any) -> None:
    """0.7.2's socket is newline-delimited JSON only: an HTTP request is lines that do not parse."""
    make_broker(unix=sock_path, compat_version="0.7.2")
    c = lines()
    c.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" + PING % 1)
    parse_error = {"jsonrpc": "2.0", "id": 0, "error": {"code": -32700, "message": "Parse error"}}
    assert [c.line(), c.line()] == [parse_error, parse_error]  # the empty line after the head is skipped
    pong = c.line()
    assert pong["id"] == 1 and set(pong["result"]) == {"pong", "timestamp", "version"}  # no extensions
    c.send(b'{"jsonrpc":"2.0","id":2,"method":"ping"}\n' b'{"jsonrpc":"2.0","id":3,"method":"exec","params":{}}\n')
    assert c.line() == {"jsonrpc": "2.0", "id": 0, "error": {"code": -32603, "message": "Internal error"}}
    assert c.line() == {"jsonrpc": "2.0", "id": 3, "error": {"code": 1001, "message": "No matching allow policy"}}
