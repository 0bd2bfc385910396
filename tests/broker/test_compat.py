"""``--compat [VERSION]``: the flag, the configuration, and 0.7.2's wire answers where node is absent.

``test_daemon_differential.py`` compares ``--compat 0.7.2`` with the daemon itself; these checks
pin the same answers (as measured there) without node, so a machine without it still tests them.
"""

import base64
import json
import re
from typing import Any

import pytest

from agenshield_shim.broker.cli import build_parser, config_from_args
from agenshield_shim.broker.config import COMPAT_VERSIONS, BrokerConfig

from .conftest import BrokerHandle, raw_exchange
from .test_cli import run_cli


def test_compat_flag_versions() -> None:
    def config(*argv: str) -> BrokerConfig:
        return config_from_args(build_parser().parse_args(list(argv)))

    assert (config().compat, config().daemon_version) == (False, None)
    plain = config("--compat")
    assert (plain.compat, plain.compat_version, plain.daemon_version, plain.rpc_only) == (True, "0.7.3", "0.7.3", False)
    old = config("--compat", "0.7.2")
    assert (old.compat, old.daemon_version, old.rpc_only, old.extensions) == (True, "0.7.2", True, ())
    assert config("--compat=0.7.3", "--port", "0").daemon_version == "0.7.3"
    assert COMPAT_VERSIONS == ("0.7.2", "0.7.3")


def test_unknown_compat_version_is_a_clear_error() -> None:
    out = run_cli(["--compat", "0.7.1", "--port", "0"])
    assert out.returncode == 2
    assert "argument --compat: invalid choice: '0.7.1' (choose from '0.7.2', '0.7.3')" in out.stderr


def test_config_keeps_compat_bool_and_checks_the_version() -> None:
    assert BrokerConfig(compat=True).daemon_version == "0.7.3"  # existing callers: the later daemon
    assert BrokerConfig(compat_version="0.7.2").compat is True
    with pytest.raises(ValueError, match="0.7.9"):
        BrokerConfig(compat_version="0.7.9")


@pytest.fixture
def old_broker(make_broker: Any) -> BrokerHandle:
    return make_broker(compat_version="0.7.2", allow=["127.0.0.1"])


def _norm_date(raw: bytes) -> bytes:
    return re.sub(rb"Date: [^\r]+\r\n", b"Date: D\r\n", raw)


def test_072_http_front_door(old_broker: BrokerHandle) -> None:
    port = old_broker.port
    seen = len(old_broker.servers.upstream.seen)
    assert _norm_date(raw_exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")) == (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nDate: D\r\nConnection: close\r\n"
        b'Transfer-Encoding: chunked\r\n\r\n21\r\n{"status":"ok","version":"0.1.0"}\r\n0\r\n\r\n')
    not_found = (b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nDate: D\r\nConnection: close\r\n"
                 b'Transfer-Encoding: chunked\r\n\r\n15\r\n{"error":"Not found"}\r\n0\r\n\r\n')
    for req in (b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                b"GET http://127.0.0.1:%d/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % old_broker.servers.http_port,
                b"GET /rpc HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                b"POST /api/proxy HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}"):
        assert _norm_date(raw_exchange(port, req)) == not_found, req
    connect = b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /echo HTTP/1.1\r\nHost: x\r\n\r\n" % (
        old_broker.servers.http_port)
    assert raw_exchange(port, connect, half_close=False) == b""  # closed without a byte
    assert raw_exchange(port, b"GARBAGE\r\n\r\n") == b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n"
    assert len(old_broker.servers.upstream.seen) == seen  # nothing was forwarded or tunnelled


def test_072_rpc_answers(old_broker: BrokerHandle) -> None:
    def post(obj: Any) -> Any:
        status, body = old_broker.post_raw(obj if isinstance(obj, bytes) else json.dumps(obj).encode())
        assert status == 200
        return body

    assert post({"jsonrpc": "2.0", "id": 9, "method": "ping"}) == {
        "jsonrpc": "2.0", "id": 0, "error": {"code": -32603, "message": "Internal error"}}
    pong = post({"jsonrpc": "2.0", "id": None, "method": "ping", "params": {"echo": [1]}})
    assert pong["id"] is None and list(pong["result"]) == ["pong", "echo", "timestamp", "version"]
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", pong["result"]["timestamp"])
    assert post({"jsonrpc": "2.0", "method": "ping", "params": {}})["error"] == {"code": -32600, "message": "Invalid Request"}
    assert post({"jsonrpc": "2.0", "id": 2, "method": "exec", "params": {}})["error"] == {
        "code": 1008, "message": "Operation 'exec' not allowed over HTTP. Use Unix socket."}
    assert post({"jsonrpc": "2.0", "id": 2, "method": "nope", "params": {}})["error"] == {
        "code": -32601, "message": "Method not found"}
    assert post(b"null")["error"]["code"] == -32603
    url = "http://127.0.0.1:1/"
    assert post({"jsonrpc": "2.0", "id": 3, "method": "http_request", "params": {"url": url}})["error"] == {
        "code": 1004, "message": "Network error: fetch failed"}
    assert post({"jsonrpc": "2.0", "id": 3, "method": "http_request"})["error"] == {
        "code": 1001, "message": "Policy check failed"}
    assert post({"jsonrpc": "2.0", "id": 3, "method": "policy_check", "params": {}})["error"] == {
        "code": -32602, "message": "Missing required parameter: operation"}


def test_072_http_request_is_fetch(old_broker: BrokerHandle) -> None:
    s = old_broker.servers
    r = old_broker.rpc("http_request", {"url": s.http + "/echo", "method": "POST", "body": {"a": 1}})["result"]
    seen = json.loads(r["body"])
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert base64.b64decode(seen["body_b64"]) == b"[object Object]" and seen["chunked"] is None
    assert headers["user-agent"] == "node" and headers["accept-encoding"] == "gzip, deflate"
    assert headers["content-type"] == "text/plain;charset=UTF-8" and headers["content-length"] == "15"
    cookies = old_broker.rpc("http_request", {"url": s.http + "/cookies"})["result"]["headers"]
    assert cookies["set-cookie"] == "b=2" and cookies["x-multi"] == "x, y"  # fetch's headers, copied one by one
    assert list(cookies) == sorted(cookies)
    gz = old_broker.rpc("http_request", {"url": s.http + "/gzip"})["result"]
    assert gz["body"] == "compressed" * 10 and gz["headers"]["content-encoding"] == "gzip"

