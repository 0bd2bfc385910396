"""The rpc transport's core (``agenshield_shim._rpc``) against the real reference broker.

The broker runs in-process (``BrokerThread``), with extensions and in ``compat`` mode (the daemon's
behaviour); the upstream is a real loopback ``http.server``; fake brokers (raw socket servers) stand
in where the real one cannot misbehave: garbage answers, capturing the JSON sent on the wire.
"""

import asyncio
import base64
import gzip
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agenshield_shim import _rpc
from agenshield_shim._config import Config
from agenshield_shim._rpc import (
    Capabilities, ResponseParser, RpcBodyError, RpcBrokerUnavailable, RpcDenied, RpcError, RpcNetworkError,
    RpcProtocolError, RpcTimeout, build_params, split_set_cookie,
)
from agenshield_shim.broker.config import BrokerConfig
from agenshield_shim.broker.runner import BrokerThread

EXPIRES = "Wed, 21 Oct 2026 07:28:00 GMT"
BINARY = bytes(range(256)) * 16 + b"\xff\xfe\x00\x80"
TEXT = "h\u00e9llo w\u00f6rld \u2615\n"

# -- upstream --------------------------------------------------------------------------------------


class Upstream(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.seen: List[Dict[str, Any]] = []

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that gave up (timeout tests) break the pipe: expected

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.server_address[1]


class Handler(BaseHTTPRequestHandler):
    server: Upstream

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, ctype: Optional[str] = "text/plain; charset=utf-8",
              extra: Tuple[Tuple[str, str], ...] = (), reason: Optional[str] = None) -> None:
        self.send_response(status, reason)
        if ctype:
            self.send_header("Content-Type", ctype)
        for k, v in extra:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        self.server.seen.append({"method": self.command, "path": self.path})
        if path == "/text":
            self._send(200, TEXT.encode("utf-8"), extra=(("X-Multi", "a"), ("X-Multi", "b")))
        elif path == "/json":
            self._send(200, json.dumps({"a": [1, "\u00fc"]}).encode(), "application/json")
        elif path == "/problem":
            self._send(200, b'{"x": 1}', "application/problem+json")
        elif path == "/binary":
            self._send(200, BINARY, "application/octet-stream")
        elif path == "/big":
            self._send(200, os.urandom(1 << 20) + BINARY, "application/octet-stream")
        elif path == "/gzip":
            self._send(200, gzip.compress(b"compressed text " * 20), "text/plain", (("Content-Encoding", "gzip"),))
        elif path == "/latin1":
            self._send(200, "caf\u00e9".encode("latin-1"), "text/plain; charset=iso-8859-1")
        elif path == "/notype":
            self._send(200, b"plain ascii", None)
        elif path == "/cookies":
            self._send(200, b"c", extra=(
                ("Set-Cookie", "session=abc123; Expires=%s; Path=/; HttpOnly" % EXPIRES),
                ("Set-Cookie", "theme=dark; Max-Age=3600; SameSite=Lax"),
            ))
        elif path.startswith("/status/"):
            self._send(int(path.rsplit("/", 1)[1]), b"status body", reason="Custom Reason")
        elif path == "/redirect":
            self._send(302, b"moved", extra=(("Location", "/text"),))
        elif path == "/slow":
            time.sleep(float(query.partition("=")[2] or "3"))
            self._send(200, b"slow")
        elif path == "/headers":
            raw = [[k, v.encode("latin-1").decode("utf-8", "replace")] for k, v in self.headers.items()]
            self._send(200, json.dumps(raw).encode(), "application/json")
        else:
            self._send(404, b"no such path")

    do_HEAD = do_GET

    def do_POST(self) -> None:
        body = self._read_body()
        self.server.seen.append({
            "method": self.command, "path": self.path, "body": body,
            "headers": [(k, v.encode("latin-1")) for k, v in self.headers.items()],
        })
        ctype = self.headers.get("Content-Type") or "application/octet-stream"
        self._send(200, body, ctype, (("X-Sha256", hashlib.sha256(body).hexdigest()),))

    do_PUT = do_POST


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


# -- brokers -----------------------------------------------------------------------------------------


class Running:
    def __init__(self, config: BrokerConfig) -> None:
        self.audit = io.StringIO()
        self.thread = BrokerThread(config, audit_stream=self.audit)
        if config.tcp:
            self.cfg = Config(broker_host="127.0.0.1", broker_port=self.thread.port)
        else:  # the port is unused then: any closed one proves the Unix socket is what is used
            self.cfg = Config(broker_host="127.0.0.1", broker_port=free_port(), broker_socket=config.unix)

    def audit_lines(self) -> List[Dict[str, Any]]:
        return [json.loads(line) for line in self.audit.getvalue().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def broker() -> Iterator[Running]:
    r = Running(BrokerConfig(port=0))
    yield r
    r.thread.stop()


@pytest.fixture(scope="module")
def compat() -> Iterator[Running]:
    r = Running(BrokerConfig(port=0, compat=True))
    yield r
    r.thread.stop()


@pytest.fixture(autouse=True)
def fresh_caps() -> None:
    _rpc.forget_capabilities()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeBroker:
    """A raw socket server: answers ``ping`` like a broker, anything else with ``answer(request_json)``."""

    def __init__(self, answer: Callable[[Dict[str, Any]], bytes], extensions: Optional[List[str]] = None) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.answer = answer
        self.extensions = extensions
        self.requests: List[bytes] = []
        self.connections = 0
        self.cfg = Config(broker_host="127.0.0.1", broker_port=self.port)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int([ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")][0]
                             .split(b":")[1])
                while len(body) < length:
                    body += conn.recv(65536)
                self.requests.append(data.partition(b"\r\n\r\n")[0] + b"\r\n\r\n" + body)
                obj = json.loads(body)
                if obj["method"] == "ping":
                    result: Dict[str, Any] = {"pong": True, "version": "9"}
                    if self.extensions is not None:
                        result["extensions"] = self.extensions
                    conn.sendall(http_json({"jsonrpc": "2.0", "id": obj["id"], "result": result}))
                else:
                    conn.sendall(self.answer(obj))

    def calls(self) -> List[Dict[str, Any]]:
        return [json.loads(r.partition(b"\r\n\r\n")[2]) for r in self.requests]

    def close(self) -> None:
        self.sock.close()


def http_json(obj: Any) -> bytes:
    body = json.dumps(obj).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- capabilities ------------------------------------------------------------------------------------


def test_capabilities_from_ping(broker: Running, compat: Running) -> None:
    caps = _rpc.capabilities(broker.cfg)
    assert caps.body_base64 and caps.redirect_policy
    assert not _rpc.capabilities(compat.cfg).body_base64
    assert run(_rpc.capabilities_async(broker.cfg)).body_base64


def test_capabilities_cached_per_broker_and_missing_key_is_daemon() -> None:
    fake = FakeBroker(lambda obj: b"", extensions=None)
    try:
        assert _rpc.capabilities(fake.cfg).extensions == frozenset()
        assert _rpc.capabilities(fake.cfg).extensions == frozenset()
        assert run(_rpc.capabilities_async(fake.cfg)).extensions == frozenset()
        assert fake.connections == 1
        assert Capabilities.from_ping({"pong": True, "extensions": "body-base64"}).extensions == frozenset()
    finally:
        fake.close()


# -- fidelity ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["broker", "compat"])
def test_text_and_json(request: pytest.FixtureRequest, upstream: Upstream, mode: str) -> None:
    b: Running = request.getfixturevalue(mode)
    r = _rpc.http_request(b.cfg, "GET", upstream.url + "/text")
    assert (r.status, r.reason, r.body) == (200, "OK", TEXT.encode("utf-8"))
    assert r.get("Content-Type") == "text/plain; charset=utf-8"
    assert r.get_all("x-multi") == ["a, b"]  # left joined: equivalent in HTTP
    assert all(k == k.lower() for k, _ in r.headers)
    j = run(_rpc.http_request_async(b.cfg, "GET", upstream.url + "/json"))
    assert json.loads(j.body) == {"a": [1, "\u00fc"]} and j.get("content-type") == "application/json"
    assert _rpc.http_request(b.cfg, "GET", upstream.url + "/problem").body == b'{"x": 1}'
    assert _rpc.http_request(b.cfg, "GET", upstream.url + "/notype").body == b"plain ascii"


@pytest.mark.parametrize("mode", ["broker", "compat"])
def test_statuses_are_results(request: pytest.FixtureRequest, upstream: Upstream, mode: str) -> None:
    b: Running = request.getfixturevalue(mode)
    for code in (404, 500):
        r = _rpc.http_request(b.cfg, "GET", upstream.url + "/status/%d" % code)
        assert (r.status, r.reason, r.body) == (code, "Custom Reason", b"status body")


def test_set_cookie_split_back(broker: Running, compat: Running, upstream: Upstream) -> None:
    for b in (broker, compat):
        r = _rpc.http_request(b.cfg, "GET", upstream.url + "/cookies")
        assert r.get_all("set-cookie") == [
            "session=abc123; Expires=%s; Path=/; HttpOnly" % EXPIRES,
            "theme=dark; Max-Age=3600; SameSite=Lax",
        ]


@pytest.mark.parametrize("mode", ["broker", "compat"])
def test_redirect_not_followed(request: pytest.FixtureRequest, upstream: Upstream, mode: str) -> None:
    b: Running = request.getfixturevalue(mode)
    r = _rpc.http_request(b.cfg, "GET", upstream.url + "/redirect")
    assert r.status == 302 and r.get("location") == "/text" and r.body == b"moved"


def test_binary_round_trip_with_extension(broker: Running, upstream: Upstream) -> None:
    r = _rpc.http_request(broker.cfg, "GET", upstream.url + "/big")
    assert len(r.body) == (1 << 20) + len(BINARY) and r.body.endswith(BINARY)
    gz = _rpc.http_request(broker.cfg, "GET", upstream.url + "/gzip")
    assert gz.get("content-encoding") == "gzip" and gzip.decompress(gz.body) == b"compressed text " * 20
    payload = os.urandom(300_000) + BINARY
    up = run(_rpc.http_request_async(broker.cfg, "POST", upstream.url + "/upload", {"Content-Type": "image/png"},
                                     payload))
    assert up.get("x-sha256") == hashlib.sha256(payload).hexdigest()
    assert hashlib.sha256(up.body).digest() == hashlib.sha256(payload).digest()
    assert upstream.seen[-1]["body"] == payload


def test_compat_refuses_binary_upload_before_sending(compat: Running, upstream: Upstream) -> None:
    before, audit_before = len(upstream.seen), len(compat.audit_lines())
    for attempt in (lambda: _rpc.http_request(compat.cfg, "POST", upstream.url + "/upload", None, BINARY),
                    lambda: run(_rpc.http_request_async(compat.cfg, "PUT", upstream.url + "/upload", None, BINARY))):
        with pytest.raises(RpcBodyError) as info:
            attempt()
        msg = str(info.value)
        assert msg.startswith("AgenShield") and "AGENSHIELD_TRANSPORT=tunnel" in msg
        assert upstream.url in msg and compat.cfg.broker in msg and "body-base64" in msg
    assert len(upstream.seen) == before and len(compat.audit_lines()) == audit_before
    ok = _rpc.http_request(compat.cfg, "POST", upstream.url + "/upload", {"Content-Type": "text/plain"},
                           TEXT.encode("utf-8"))
    assert ok.body == TEXT.encode("utf-8")


@pytest.mark.parametrize("path", ["/binary", "/gzip", "/latin1"])
def test_compat_refuses_responses_that_cannot_survive(compat: Running, upstream: Upstream, path: str) -> None:
    with pytest.raises(RpcBodyError) as info:
        _rpc.http_request(compat.cfg, "GET", upstream.url + path)
    msg = str(info.value)
    assert msg.startswith("AgenShield") and "AGENSHIELD_TRANSPORT=tunnel" in msg and upstream.url + path in msg
    with pytest.raises(RpcBodyError):
        run(_rpc.http_request_async(compat.cfg, "GET", upstream.url + path))
    head = _rpc.http_request(compat.cfg, "HEAD", upstream.url + path)  # nothing to corrupt
    assert head.status == 200 and head.body == b""


def test_non_ascii_header_and_body_arrive_intact(broker: Running, compat: Running, upstream: Upstream) -> None:
    for b in (broker, compat):
        note = "caf\u00e9 \u2615 \U0001f600"
        r = _rpc.http_request(b.cfg, "POST", upstream.url + "/echo",
                              [("X-Note", note), ("Content-Type", "text/plain; charset=utf-8")],
                              ("gr\u00fc\u00dfe \u2603 " * 3000).encode("utf-8"))
        seen = upstream.seen[-1]
        assert dict(seen["headers"])["X-Note"] == note.encode("utf-8")
        assert seen["body"] == ("gr\u00fc\u00dfe \u2603 " * 3000).encode("utf-8") == r.body


# -- errors --------------------------------------------------------------------------------------------


def test_policy_denial_is_1001(upstream: Upstream) -> None:
    denier = Running(BrokerConfig(port=0, allow=("127.0.0.1:1",)))
    try:
        before = len(upstream.seen)
        with pytest.raises(RpcDenied) as info:
            _rpc.http_request(denier.cfg, "GET", upstream.url + "/text")
        assert info.value.code == 1001 and "is not allowed" in info.value.broker_message
        msg = str(info.value)
        assert msg.startswith("AgenShield") and upstream.url + "/text" in msg and denier.cfg.broker in msg
        with pytest.raises(RpcDenied):
            run(_rpc.http_request_async(denier.cfg, "GET", upstream.url + "/json"))
        assert len(upstream.seen) == before
        assert isinstance(info.value, OSError)
    finally:
        denier.thread.stop()


def test_closed_upstream_port_is_1004(broker: Running) -> None:
    url = "http://127.0.0.1:%d/" % free_port()
    with pytest.raises(RpcNetworkError) as info:
        _rpc.http_request(broker.cfg, "GET", url)
    assert info.value.code == 1004 and not isinstance(info.value, RpcTimeout)
    assert str(info.value).startswith("AgenShield") and url in str(info.value)
    with pytest.raises(RpcNetworkError):
        run(_rpc.http_request_async(broker.cfg, "GET", url))


def test_timeout_at_the_broker(broker: Running, upstream: Upstream) -> None:
    for sync in (True, False):
        start = time.monotonic()
        with pytest.raises(RpcTimeout) as info:
            if sync:
                _rpc.http_request(broker.cfg, "GET", upstream.url + "/slow?s=3", timeout_s=0.3, deadline_s=5)
            else:
                run(_rpc.http_request_async(broker.cfg, "GET", upstream.url + "/slow?s=3", timeout_s=0.3,
                                            deadline_s=5))
        assert time.monotonic() - start < 2
        assert info.value.code == 1004 and info.value.broker_message == "Request timeout"
        assert isinstance(info.value, TimeoutError) and isinstance(info.value, RpcNetworkError)


def test_timeout_locally(broker: Running, upstream: Upstream) -> None:
    _rpc.capabilities(broker.cfg)
    for sync in (True, False):
        start = time.monotonic()
        with pytest.raises(RpcTimeout) as info:
            if sync:
                _rpc.http_request(broker.cfg, "GET", upstream.url + "/slow?s=3", timeout_s=10, deadline_s=0.3)
            else:
                run(_rpc.http_request_async(broker.cfg, "GET", upstream.url + "/slow?s=3", timeout_s=10,
                                            deadline_s=0.3))
        assert time.monotonic() - start < 1.5
        assert info.value.code is None and "within 0.3 s" in str(info.value)
    # the default local deadline is the timeout plus a grace: the broker's answer wins
    with pytest.raises(RpcTimeout) as info:
        _rpc.http_request(broker.cfg, "GET", upstream.url + "/slow?s=3", timeout_s=0.3)
    assert info.value.code == 1004


def test_broker_down_fails_fast(tmp_path: Any) -> None:
    port = free_port()
    cfg = Config(broker_host="127.0.0.1", broker_port=port)
    start = time.monotonic()
    with pytest.raises(RpcBrokerUnavailable) as info:
        _rpc.http_request(cfg, "GET", "http://127.0.0.1:9/")
    assert "127.0.0.1:%d" % port in str(info.value) and str(info.value).startswith("AgenShield")
    assert "http://127.0.0.1:9/" in str(info.value)
    with pytest.raises(RpcBrokerUnavailable) as info:
        run(_rpc.http_request_async(cfg, "GET", "http://127.0.0.1:9/"))
    assert "http://127.0.0.1:9/" in str(info.value)
    with pytest.raises(RpcBrokerUnavailable) as info:
        _rpc.call(Config(broker_socket=str(tmp_path / "nope.sock")), "http_request", {"url": "http://x/"},
                  url="http://x/")
    assert "unix:" in str(info.value) and "http://x/" in str(info.value)
    assert time.monotonic() - start < 1
    assert isinstance(info.value, ConnectionError)


GARBAGE = {
    "not-http": b"garbage garbage garbage\r\n\r\n",
    "not-json": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    "not-envelope": http_json({"hello": "world"}),
    "wrong-id": http_json({"jsonrpc": "2.0", "id": 123456789, "result": {}}),
    "bad-result": http_json({"jsonrpc": "2.0", "id": "ID", "result": {"status": "x"}}),
    "truncated-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{\"jsonrpc\"",
    "bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "empty": b"",
    "http-404": b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found",
    "bad-base64": http_json({"jsonrpc": "2.0", "id": "ID", "result": {
        "status": 200, "statusText": "OK", "headers": {}, "body": "@@@", "bodyEncoding": "base64"}}),
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_garbage_answering_broker_is_protocol_error(kind: str) -> None:
    def answer(obj: Dict[str, Any]) -> bytes:
        return GARBAGE[kind].replace(b'"ID"', str(obj["id"]).encode())

    fake = FakeBroker(answer, extensions=["body-base64"])
    try:
        url = "http://127.0.0.1:9/x"
        with pytest.raises(RpcProtocolError) as info:
            _rpc.http_request(fake.cfg, "GET", url, deadline_s=5)
        assert str(info.value).startswith("AgenShield") and fake.cfg.broker in str(info.value)
        with pytest.raises(RpcProtocolError):
            run(_rpc.http_request_async(fake.cfg, "GET", url, deadline_s=5))
    finally:
        fake.close()


def test_broker_that_ignores_base64_is_caught_and_forgotten() -> None:
    fake = FakeBroker(lambda obj: http_json({"jsonrpc": "2.0", "id": obj["id"], "result": {
        "status": 200, "statusText": "OK", "headers": {}, "body": "text"}}), extensions=["body-base64"])
    try:
        with pytest.raises(RpcProtocolError, match="ignored bodyEncoding"):
            _rpc.http_request(fake.cfg, "GET", "http://127.0.0.1:9/")
        fake.extensions = None
        assert _rpc.http_request(fake.cfg, "GET", "http://127.0.0.1:9/").body == b"text"  # re-asked: daemon
    finally:
        fake.close()


@pytest.mark.parametrize("method,code", [("no_such_method", -32601), ("exec", 1008)])
def test_protocol_errors_from_the_real_broker(broker: Running, method: str, code: int) -> None:
    with pytest.raises(RpcProtocolError) as info:
        _rpc.call(broker.cfg, method, {})
    assert info.value.code == code
    with pytest.raises(RpcProtocolError):
        run(_rpc.call_async(broker.cfg, method, {}))
    with pytest.raises(RpcProtocolError) as info:
        _rpc.call(broker.cfg, "http_request", {"method": "GET"})
    assert info.value.code == 1003


@pytest.mark.parametrize("code,cls", [
    (1001, RpcDenied), (1004, RpcNetworkError), (-32700, RpcProtocolError), (-32600, RpcProtocolError),
    (-32601, RpcProtocolError), (-32603, RpcProtocolError), (1003, RpcProtocolError), (1008, RpcProtocolError),
    (4242, RpcProtocolError), ("x", RpcProtocolError),
])
def test_error_classes(code: Any, cls: type) -> None:
    err = _rpc.error_for_code(code, "msg", "b:1", "http://u/", "GET")
    assert type(err) is cls and isinstance(err, RpcError) and isinstance(err, OSError)
    assert str(err).startswith("AgenShield") and "b:1" in str(err) and "http://u/" in str(err)
    assert type(_rpc.error_for_code(1004, "Request timeout", "b", "u")) is RpcTimeout


def test_request_over_the_size_limit_is_413() -> None:
    small = Running(BrokerConfig(port=0, max_body_size=4096))
    try:
        for sync in (True, False):
            with pytest.raises(RpcProtocolError) as info:
                if sync:
                    _rpc.http_request(small.cfg, "POST", "http://127.0.0.1:9/", None, b"x" * 2_000_000)
                else:
                    run(_rpc.http_request_async(small.cfg, "POST", "http://127.0.0.1:9/", None, b"x" * 2_000_000))
            assert "413" in str(info.value) and "AGENSHIELD_TRANSPORT=tunnel" in str(info.value)
    finally:
        small.thread.stop()


# -- the wire -------------------------------------------------------------------------------------------


def test_what_goes_on_the_wire(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENSHIELD_TRACE_ID", "trace-123")
    monkeypatch.setenv("AGENSHIELD_DEPTH", "2")
    fake = FakeBroker(lambda obj: http_json({"jsonrpc": "2.0", "id": obj["id"], "result": {
        "status": 201, "statusText": "Created", "headers": {"set-cookie": "a=1, b=2; Expires=%s" % EXPIRES},
        "body": base64.b64encode(b"\x00\xff").decode(), "bodyEncoding": "base64"}}), extensions=["body-base64"])
    try:
        r = _rpc.http_request(fake.cfg, "post", "http://127.0.0.1:9/p",
                              [("Cookie", "a=1"), ("cookie", "b=2"), ("Accept", "x"), ("ACCEPT", "y"),
                               ("X-U", "\u00fc\u2603")], b"\x00\x01", timeout_s=2.5)
        assert (r.status, r.reason, r.body) == (201, "Created", b"\x00\xff")
        assert r.get_all("set-cookie") == ["a=1", "b=2; Expires=%s" % EXPIRES]
        wire = fake.requests[-1]
        wire.decode("ascii")  # ASCII-only JSON
        head = wire.split(b"\r\n\r\n")[0]
        assert head.startswith(b"POST /rpc HTTP/1.1\r\n") and b"Content-Length:" in head
        call = fake.calls()[-1]
        assert call["method"] == "http_request" and call["jsonrpc"] == "2.0"
        p = call["params"]
        assert p["context"] == {"parentTraceId": "trace-123", "depth": 2}
        assert p["followRedirects"] is False and p["timeout"] == 2500 and p["method"] == "POST"
        assert p["bodyEncoding"] == "base64" and base64.b64decode(p["body"]) == b"\x00\x01"
        assert p["headers"] == {"Cookie": "a=1; b=2", "Accept": "x, y", "X-U": "\u00fc\u2603",
                                "Content-Length": "2"}
        monkeypatch.delenv("AGENSHIELD_TRACE_ID")
        monkeypatch.setenv("AGENSHIELD_DEPTH", "deep")
        run(_rpc.http_request_async(fake.cfg, "GET", "http://127.0.0.1:9/"))
        assert "context" not in fake.calls()[-1]["params"]
    finally:
        fake.close()


def test_build_params_rules() -> None:
    daemon = _rpc.DAEMON
    with pytest.raises(RpcBodyError, match="AGENSHIELD_TRANSPORT=tunnel"):
        build_params("POST", "http://h/", None, b"\xff", caps=daemon, broker="b:1")
    p = build_params("PUT", "http://h/", {"Transfer-Encoding": "chunked"}, "t\u00e9xt", 0.0001, caps=daemon,
                     environ={})
    assert p == {"url": "http://h/", "method": "PUT", "followRedirects": False, "timeout": 1,
                 "headers": {"Transfer-Encoding": "chunked", "Accept-Encoding": "identity"}, "body": "t\u00e9xt"}
    with pytest.raises(ValueError):
        build_params("GET", "http://h/", follow_redirects=True, caps=daemon)
    assert build_params("GET", "http://h/", follow_redirects=True, caps=Capabilities(["redirect-policy"]),
                        environ={})["followRedirects"] is True
    assert build_params("GET", "http://h/", [(b"X-B", b"\xe9")], caps=daemon, environ={})["headers"] == {
        "X-B": "\u00e9", "Accept-Encoding": "identity"}
    # text-only broker: no compressed answers (they could not come back intact); base64: as asked
    asked = [("accept-encoding", "gzip, deflate"), ("X-A", "1")]
    assert build_params("GET", "http://h/", asked, caps=daemon, environ={})["headers"] == {
        "X-A": "1", "Accept-Encoding": "identity"}
    assert build_params("GET", "http://h/", asked, caps=Capabilities(["body-base64"]), environ={})["headers"] == {
        "accept-encoding": "gzip, deflate", "X-A": "1"}


def test_unix_socket_broker(tmp_path: Any, upstream: Upstream) -> None:
    path = str(tmp_path / "broker.sock")
    b = Running(BrokerConfig(port=0, unix=path, tcp=False))
    try:
        assert b.cfg.broker_socket == path
        assert _rpc.http_request(b.cfg, "GET", upstream.url + "/text").body == TEXT.encode("utf-8")
        assert run(_rpc.http_request_async(b.cfg, "GET", upstream.url + "/binary")).body == BINARY
        assert run(_rpc.ping_async(b.cfg))["pong"] is True
    finally:
        b.thread.stop()


def test_no_http_library_imported() -> None:
    code = ("import sys, agenshield_shim._rpc; "
            "bad = [m for m in ('http.client', 'urllib.request', 'urllib3', 'requests', 'aiohttp', 'httpx', "
            "'asyncio') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr


# -- property tests ----------------------------------------------------------------------------------

TOKEN = st.text(alphabet="!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
                min_size=1, max_size=12)
COOKIE_VALUE = st.text(alphabet=[chr(c) for c in range(0x21, 0x7F) if chr(c) not in '",;\\'], max_size=20)
DAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
DATE = st.builds(lambda d, n, m, y, t: "%s, %02d %s %d %s GMT" % (d, n, m, y, t),
                 st.sampled_from(DAYS), st.integers(1, 31), st.sampled_from(MONTHS), st.integers(1970, 2100),
                 st.sampled_from(["00:00:00", "07:28:00", "23:59:59"]))
OLD_DATE = st.builds(lambda d, n, m, y: "%sday, %02d-%s-%02d 08:49:37 GMT" % (d, n, m, y),
                     st.sampled_from(["Sun", "Mon", "Wednes"]), st.integers(1, 28), st.sampled_from(MONTHS),
                     st.integers(0, 99))
ATTRIBUTE = st.one_of(
    DATE.map(lambda d: "Expires=" + d), OLD_DATE.map(lambda d: "expires=" + d),
    st.integers(-5, 10 ** 8).map(lambda n: "Max-Age=%d" % n),
    st.from_regex(r"\A/[A-Za-z0-9/_.-]{0,15}\Z").map(lambda p: "Path=" + p),
    st.from_regex(r"\A[a-z0-9.-]{1,20}\Z").map(lambda d: "Domain=" + d),
    st.sampled_from(["Secure", "HttpOnly", "SameSite=Lax", "SameSite=None", "Partitioned"]),
)
COOKIE = st.builds(lambda n, v, attrs: "; ".join(["%s=%s" % (n, v)] + attrs), TOKEN, COOKIE_VALUE,
                   st.lists(ATTRIBUTE, max_size=5))


@given(st.lists(COOKIE, min_size=1, max_size=6))
def test_set_cookie_splitter(cookies: List[str]) -> None:
    assert split_set_cookie(", ".join(cookies)) == cookies


@given(st.binary(max_size=3000), st.lists(st.integers(1, 64), min_size=1, max_size=20))
def test_response_parser_any_split(body: bytes, cuts: List[int]) -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    rest = body
    while rest:
        part, rest = rest[:700], rest[700:]
        chunked += b"%x;ext=1\r\n%s\r\n" % (len(part), part)
    chunked += b"0\r\nX-Trailer: t\r\n\r\n"
    for raw in (chunked, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)):
        parser = ResponseParser()
        pos, i = 0, 0
        while pos < len(raw):
            step = cuts[i % len(cuts)]
            parser.feed(raw[pos:pos + step])
            pos, i = pos + step, i + 1
        assert parser.done and bytes(parser.body) == body and parser.status == 200


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=4096))
def test_body_round_trip_with_extension(broker: Running, upstream: Upstream, body: bytes) -> None:
    r = _rpc.http_request(broker.cfg, "POST", upstream.url + "/echo", {"Content-Type": "application/octet-stream"}, body)
    assert r.body == body


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(st.binary(max_size=2048), st.text(max_size=1000).map(lambda t: t.encode("utf-8"))))
def test_body_round_trip_without_extension(compat: Running, upstream: Upstream, body: bytes) -> None:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        before = len(upstream.seen)
        with pytest.raises(RpcBodyError):
            _rpc.http_request(compat.cfg, "POST", upstream.url + "/echo", {"Content-Type": "text/plain"}, body)
        assert len(upstream.seen) == before
        return
    if "\ufffd" in text:  # indistinguishable from a replaced byte: refused rather than trusted
        with pytest.raises(RpcBodyError):
            _rpc.http_request(compat.cfg, "POST", upstream.url + "/echo", {"Content-Type": "text/plain"}, body)
        return
    r = _rpc.http_request(compat.cfg, "POST", upstream.url + "/echo", {"Content-Type": "text/plain"}, body)
    assert r.body == body


# -- one codec: the rules the broker reads requests with read its answers -----------------------------------

_ANSWER = b'{"jsonrpc":"2.0","id":1,"result":{"allowed":false,"reason":"no rule"}}'


@pytest.mark.parametrize("framing,ok", [
    (b"Transfer-Encoding: chunked\r\n\r\n%x;a=b\r\n%s\r\n0\r\nX-T: 1\r\n\r\n" % (len(_ANSWER), _ANSWER), True),
    (b"Content-Length: %d\r\n\r\n%s" % (len(_ANSWER), _ANSWER), True),
    (b"Transfer-Encoding: chunked\r\n\r\n0x%x\r\n%s\r\n0\r\n\r\n" % (len(_ANSWER), _ANSWER), False),  # 0x
    (b"Transfer-Encoding: chunked\r\n\r\n4_6\r\n%s\r\n0\r\n\r\n" % _ANSWER, False),  # int("4_6", 16) is 70
    (b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n\r\n%s" % (len(_ANSWER), _ANSWER), False),
])
def test_broker_answers_are_read_with_the_codec(framing: bytes, ok: bool) -> None:
    """The ``policy_check`` reason reader and the rpc ResponseParser refuse what the broker refuses
    (they took ``0x46`` and ``4_6`` as chunk sizes, and Transfer-Encoding beside Content-Length)."""
    from agenshield_shim._broker_client import policy_check_reason

    raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + framing
    assert policy_check_reason(raw) == ("no rule" if ok else None)
    parser = ResponseParser()
    if ok:
        parser.feed(raw)
        assert parser.done and bytes(parser.body) == _ANSWER
    else:
        with pytest.raises(_rpc._Garbage):
            parser.feed(raw)
            parser.feed_eof()
