"""``POST /rpc``: envelope rules, every error code, ``http_request`` fidelity, extensions vs ``--compat``."""

import base64
import json
import socket
import time
from typing import Any, Dict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import BINARY, BrokerHandle, raw_exchange, status_of


def result(resp: Dict[str, Any]) -> Dict[str, Any]:
    assert "error" not in resp, resp
    return resp["result"]


def error(resp: Dict[str, Any]) -> Dict[str, Any]:
    assert "result" not in resp, resp
    assert resp["jsonrpc"] == "2.0"
    return resp["error"]


# -- envelope -------------------------------------------------------------------------------------


def test_health(broker: BrokerHandle, compat_broker: BrokerHandle) -> None:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(broker.url + "/health") as r:
        data = json.loads(r.read())
        assert r.status == 200
    assert data["status"] == "ok" and data["version"] == "0.1.0"
    assert data["extensions"] == ["tunnel", "body-base64", "redirect-policy", "connect-port-policy", "proxy-error-header"]
    with opener.open(compat_broker.url + "/health") as r:
        assert json.loads(r.read()) == {"status": "ok", "version": "0.1.0"}


def test_health_is_exact_path(broker: BrokerHandle) -> None:
    out = raw_exchange(broker.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(out) == 404


def test_ping_advertises_extensions_only_outside_compat(broker: BrokerHandle, compat_broker: BrokerHandle) -> None:
    r = result(broker.rpc("ping", req_id="abc"))
    assert r["pong"] is True and r["version"] == "0.1.0"
    assert "body-base64" in r["extensions"]
    rc = result(compat_broker.rpc("ping"))
    assert rc["pong"] is True and "extensions" not in rc


def test_rpc_always_http_200_chunked_json(broker: BrokerHandle) -> None:
    body = b'{"jsonrpc":"2.0","id":3,"method":"nope"}'
    out = raw_exchange(broker.port, b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    head, _, rest = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding: chunked" in head.lower()
    assert b"application/json" in head.lower()
    size, _, payload = rest.partition(b"\r\n")
    data = json.loads(payload[: int(size, 16)])
    assert data == {"jsonrpc": "2.0", "id": 3, "error": {"code": -32601, "message": "Method not found: nope"}}


def test_parse_error_id_zero(broker: BrokerHandle) -> None:
    status, data = broker.post_raw(b'{"jsonrpc": "2.0", "id": 5, "method": ')
    assert status == 200
    assert data["id"] == 0 and error(data)["code"] == -32700


def test_invalid_utf8_is_parse_error(broker: BrokerHandle) -> None:
    status, data = broker.post_raw(b'{"jsonrpc":"2.0","id":1,"method":"ping","x":"\xff"}')
    assert status == 200 and error(data)["code"] == -32700


def test_batch_is_invalid_request(broker: BrokerHandle) -> None:
    status, data = broker.post_raw(json.dumps([{"jsonrpc": "2.0", "id": 1, "method": "ping"}]).encode())
    assert status == 200 and data["id"] == 0 and error(data)["code"] == -32600


@pytest.mark.parametrize(
    "payload, expected_id",
    [
        ({"id": 4, "method": "ping"}, 4),  # no jsonrpc
        ({"jsonrpc": "1.0", "id": "x", "method": "ping"}, "x"),
        ({"jsonrpc": "2.0", "id": 9}, 9),  # no method
        ({"jsonrpc": "2.0", "id": 9, "method": 12}, 9),
        ({"jsonrpc": "2.0", "id": {"a": 1}, "method": 12}, 0),  # unusable id
        ("just a string", 0),
        (42, 0),
    ],
)
def test_invalid_request(broker: BrokerHandle, payload: Any, expected_id: Any) -> None:
    status, data = broker.post_raw(json.dumps(payload).encode())
    assert status == 200
    assert data["id"] == expected_id and error(data)["code"] == -32600


def test_method_not_found_echoes_id(broker: BrokerHandle) -> None:
    data = broker.rpc("no_such_method", req_id=77)
    assert data["id"] == 77 and error(data)["code"] == -32601


@pytest.mark.parametrize("method", ["exec", "file_read", "file_write", "open_url", "secret_inject"])
def test_daemon_only_methods_are_1008(broker: BrokerHandle, method: str) -> None:
    e = error(broker.rpc(method, {"command": "ls"}))
    assert e["code"] == 1008 and "not allowed over HTTP" in e["message"]


def test_internal_error_is_32603(broker: BrokerHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    rpc = broker.broker.rpc

    def boom(*a: Any, **k: Any) -> Any:
        raise KeyError("unexpected")

    monkeypatch.setattr(rpc, "ping", boom)
    data = broker.rpc("ping", req_id=12)
    assert data["id"] == 12 and error(data)["code"] == -32603
    assert result(broker.rpc("policy_check", {"operation": "http_request", "target": "http://127.0.0.1/"}))["allowed"]


def test_body_over_limit_is_413_and_broker_keeps_serving(make_broker: Any) -> None:
    b = make_broker(max_body_size=1024)
    big = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping", "pad": "x" * 2000}).encode()
    status, _ = b.post_raw(big)
    assert status == 413
    # chunked body over the limit: 413 as well
    chunked = b"%x\r\n" % len(big) + big + b"\r\n0\r\n\r\n"
    out = raw_exchange(b.port, b"POST /rpc HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)
    assert status_of(out) == 413
    assert result(b.rpc("ping"))["pong"] is True


def test_default_body_limit_is_10_mib(broker: BrokerHandle) -> None:
    head = b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (10 * 1024 * 1024 + 1)
    assert status_of(raw_exchange(broker.port, head)) == 413
    pad = b" " * (10 * 1024 * 1024 - 100)
    status, data = broker.post_raw(b'{"jsonrpc":"2.0","id":2,"method":"ping"}' + pad)
    assert status == 200 and result(data)["pong"] is True


def test_chunked_request_body_and_keepalive(broker: BrokerHandle) -> None:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}).encode()
    one = b"POST /rpc HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"5\r\n" + body[:5] + b"\r\n" \
        + b"%x\r\n" % (len(body) - 5) + body[5:] + b"\r\n0\r\n\r\n"
    two = b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
    out = raw_exchange(broker.port, one + two)  # pipelined on one connection
    assert out.count(b"HTTP/1.1 200 OK") == 2
    assert out.count(b'"pong": true') == 2


# -- http_request ---------------------------------------------------------------------------------


def test_http_request_basic(broker: BrokerHandle) -> None:
    r = result(broker.rpc("http_request", {"url": broker.servers.http + "/hello"}))
    assert r["status"] == 200 and r["statusText"] == "OK" and r["body"] == "hello"
    assert r["headers"]["content-length"] == "5"
    assert all(k == k.lower() for k in r["headers"])


def test_http_request_https_upstream(broker: BrokerHandle) -> None:
    r = result(broker.rpc("http_request", {"url": broker.servers.https + "/hello"}))
    assert r["status"] == 200 and r["body"] == "hello"


def test_http_request_sends_method_headers_body_and_nothing_extra(broker: BrokerHandle) -> None:
    params = {"url": broker.servers.http + "/echo?q=1", "method": "put", "headers": {"X-Test": "yes"},
              "body": "payload", "context": {"parentTraceId": "t", "depth": 1}}
    seen = json.loads(result(broker.rpc("http_request", params))["body"])
    assert seen["method"] == "PUT" and seen["path"] == "/echo?q=1"
    names = {k.lower() for k, _ in seen["headers"]}
    assert ("X-Test", "yes") in [tuple(h) for h in seen["headers"]]
    assert "user-agent" not in names and "accept-encoding" not in names
    assert base64.b64decode(seen["body_b64"]) == b"payload"
    assert seen["chunked"] == "chunked"  # sent chunked: no content-length was given


def test_http_request_with_content_length_not_chunked(broker: BrokerHandle) -> None:
    params = {"url": broker.servers.http + "/echo", "method": "POST", "headers": {"Content-Length": "3"}, "body": "abc"}
    seen = json.loads(result(broker.rpc("http_request", params))["body"])
    assert seen["chunked"] is None
    assert ["Content-Length", "3"] in seen["headers"]


def test_non_string_body_is_stringified(broker: BrokerHandle) -> None:
    params = {"url": broker.servers.http + "/echo", "method": "POST", "body": {"a": [1, 2]}}
    seen = json.loads(result(broker.rpc("http_request", params))["body"])
    assert base64.b64decode(seen["body_b64"]) == b'{"a":[1,2]}'


def test_repeated_headers_joined(broker: BrokerHandle) -> None:
    r = result(broker.rpc("http_request", {"url": broker.servers.http + "/cookies"}))
    assert r["headers"]["set-cookie"] == "a=1, b=2"
    assert r["headers"]["x-multi"] == "x, y"


def test_upstream_errors_are_results(broker: BrokerHandle) -> None:
    for code in (404, 500, 503):
        r = result(broker.rpc("http_request", {"url": broker.servers.http + "/status/%d" % code}))
        assert r["status"] == code


def test_binary_body_lossy_without_extension(broker: BrokerHandle) -> None:
    r = result(broker.rpc("http_request", {"url": broker.servers.http + "/bytes"}))
    assert "bodyEncoding" not in r
    assert r["body"] == BINARY.decode("utf-8", "replace")
    assert "\ufffd" in r["body"]


def test_gzip_not_decoded(broker: BrokerHandle) -> None:
    import gzip

    r = result(broker.rpc("http_request", {"url": broker.servers.http + "/gzip", "bodyEncoding": "base64"}))
    assert r["headers"]["content-encoding"] == "gzip"
    assert gzip.decompress(base64.b64decode(r["body"])) == b"compressed" * 10


def test_url_required_1003(broker: BrokerHandle) -> None:
    assert error(broker.rpc("http_request", {}))["code"] == 1003
    assert error(broker.rpc("http_request", {"url": ""}))["code"] == 1003
    assert error(broker.rpc("http_request"))["code"] == 1003


@pytest.mark.parametrize("url", ["not a url", "ftp://127.0.0.1/x", "http://127.0.0.1:99999/", "http:///nohost"])
def test_unusable_url_is_1001(broker: BrokerHandle, url: str) -> None:
    assert error(broker.rpc("http_request", {"url": url}))["code"] == 1001


def test_denied_host_is_1001_with_daemon_message(broker: BrokerHandle) -> None:
    e = error(broker.rpc("http_request", {"url": "http://example.com/"}))
    assert e == {"code": 1001, "message": "Host 'example.com' is not allowed"}
    entry = broker.audit.entries()[-1]
    assert entry["allowed"] is False and entry["result"] == "denied" and entry["target"] == "http://example.com/"


def test_connection_refused_is_1004(broker: BrokerHandle) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    e = error(broker.rpc("http_request", {"url": "http://127.0.0.1:%d/" % port}))
    assert e["code"] == 1004 and e["message"].startswith("Network error: ")


def test_timeout_is_1004_request_timeout(broker: BrokerHandle) -> None:
    t0 = time.monotonic()
    e = error(broker.rpc("http_request", {"url": broker.servers.http + "/slow?s=3", "timeout": 300}))
    assert e == {"code": 1004, "message": "Request timeout"}
    assert time.monotonic() - t0 < 2.5


def test_redirect_followed_by_default(broker: BrokerHandle) -> None:
    to = broker.servers.http + "/hello"
    r = result(broker.rpc("http_request", {"url": broker.servers.http + "/redirect?to=" + to}))
    assert r["status"] == 200 and r["body"] == "hello"


def test_redirect_not_followed_on_request(broker: BrokerHandle) -> None:
    to = broker.servers.http + "/hello"
    r = result(broker.rpc("http_request", {"url": broker.servers.http + "/redirect?to=" + to, "followRedirects": False}))
    assert r["status"] == 302 and r["headers"]["location"] == to


def test_redirect_303_turns_post_into_get(broker: BrokerHandle) -> None:
    to = broker.servers.http + "/echo"
    r = result(broker.rpc("http_request", {"url": broker.servers.http + "/redirect?code=303&to=" + to,
                                           "method": "POST", "body": "x"}))
    assert json.loads(r["body"])["method"] == "GET"


def test_redirect_hops_are_policy_checked(make_broker: Any, servers: Any) -> None:
    """Extension ``redirect-policy``: a hop to a denied host is refused; ``--compat`` follows it."""
    # Allowed: 127.0.0.1 only. The redirect goes to "localhost" (the same loopback server, another name).
    to = "http://localhost:%d/hello" % servers.http_port
    url = servers.http + "/redirect?to=" + to
    ext = make_broker(allow=["127.0.0.1"])
    e = error(ext.rpc("http_request", {"url": url}))
    assert e["code"] == 1001 and "localhost" in e["message"]
    hops = [x for x in ext.audit.entries() if x["operation"] == "http_request"]
    assert [h["allowed"] for h in hops] == [True, False]
    compat = make_broker(allow=["127.0.0.1"], compat=True)
    r = result(compat.rpc("http_request", {"url": url}))
    assert r["status"] == 200 and r["body"] == "hello"


def test_too_many_redirects(broker: BrokerHandle) -> None:
    e = error(broker.rpc("http_request", {"url": broker.servers.http + "/loop"}))
    assert e == {"code": 1004, "message": "Network error: too many redirects"}


# -- extensions: base64 bodies ----------------------------------------------------------------------


def test_base64_bodies_both_directions(broker: BrokerHandle) -> None:
    payload = bytes(range(256))
    r = result(broker.rpc("http_request", {"url": broker.servers.http + "/echo", "method": "POST",
                                           "body": base64.b64encode(payload).decode(), "bodyEncoding": "base64"}))
    assert r["bodyEncoding"] == "base64"
    seen = json.loads(base64.b64decode(r["body"]))
    assert base64.b64decode(seen["body_b64"]) == payload
    r2 = result(broker.rpc("http_request", {"url": broker.servers.http + "/bytes", "bodyEncoding": "base64"}))
    assert base64.b64decode(r2["body"]) == BINARY


def test_bad_base64_and_unknown_encoding_are_invalid_request(broker: BrokerHandle) -> None:
    url = broker.servers.http + "/echo"
    assert error(broker.rpc("http_request", {"url": url, "body": "***", "bodyEncoding": "base64"}))["code"] == -32600
    assert error(broker.rpc("http_request", {"url": url, "bodyEncoding": "rot13"}))["code"] == -32600


def test_compat_ignores_body_encoding(compat_broker: BrokerHandle) -> None:
    r = result(compat_broker.rpc("http_request", {"url": compat_broker.servers.http + "/echo", "method": "POST",
                                                  "body": "AAEC", "bodyEncoding": "base64"}))
    assert "bodyEncoding" not in r
    assert base64.b64decode(json.loads(r["body"])["body_b64"]) == b"AAEC"  # sent as text, like the daemon


# -- policy_check -----------------------------------------------------------------------------------


def test_policy_check_results(make_broker: Any) -> None:
    b = make_broker(allow=["api.example.com:443", "*.github.com"])
    ok = result(b.rpc("policy_check", {"operation": "http_request", "target": "https://api.example.com/v1"}))
    assert ok == {"allowed": True, "policyId": "allow-0"}
    no = result(b.rpc("policy_check", {"operation": "http_request", "target": "http://api.example.com/v1"}))
    assert no["allowed"] is False and "api.example.com" in no["reason"]
    assert result(b.rpc("policy_check", {"operation": "connect", "target": "raw.github.com:22"}))["allowed"] is True
    assert result(b.rpc("policy_check", {"operation": "connect", "target": "github.com:443"}))["allowed"] is False
    # always a result, even for nonsense
    for params in ({}, {"target": 5}, {"operation": "exec", "target": "ls"}, {"operation": "http_request", "target": "::"}):
        r = result(b.rpc("policy_check", params))
        assert r["allowed"] is False and r["reason"]
    assert any(e["operation"] == "policy_check" for e in b.audit.entries())


# -- /api/proxy -------------------------------------------------------------------------------------


def test_api_proxy_alias(broker: BrokerHandle) -> None:
    status, data = broker.post_raw(json.dumps({"url": broker.servers.http + "/echo", "method": "POST",
                                               "headers": {"X-A": "1"}, "body": "hi"}).encode(), "/api/proxy")
    assert status == 200 and data["status"] == 200 and set(data) >= {"status", "statusText", "headers", "body"}
    assert base64.b64decode(json.loads(data["body"])["body_b64"]) == b"hi"
    status, data = broker.post_raw(json.dumps({"url": "http://example.com/"}).encode(), "/api/proxy")
    assert status == 403 and data["error"]["code"] == 1001
    status, data = broker.post_raw(b"{", "/api/proxy")
    assert status == 400 and data["error"]["code"] == -32700
    status, data = broker.post_raw(json.dumps({"method": "GET"}).encode(), "/api/proxy")
    assert status == 400 and data["error"]["code"] == 1003


def test_api_proxy_is_404_in_compat(compat_broker: BrokerHandle) -> None:
    status, _ = compat_broker.post_raw(json.dumps({"url": "http://127.0.0.1/"}).encode(), "/api/proxy")
    assert status == 404


# -- fuzz -------------------------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_requests = st.one_of(
    _json,
    st.fixed_dictionaries({"jsonrpc": st.sampled_from(["2.0", "1.0", 2]), "method": st.sampled_from(
        ["ping", "policy_check", "nope", "exec", 3]), "id": st.one_of(st.integers(), st.text(max_size=5), st.none())},
        optional={"params": _json}),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=_requests)
def test_fuzz_envelope(broker: BrokerHandle, payload: Any) -> None:
    status, data = broker.post_raw(json.dumps(payload).encode())
    assert status == 200
    assert data["jsonrpc"] == "2.0" and ("result" in data) != ("error" in data)
    if "error" in data:
        assert data["error"]["code"] in (-32700, -32600, -32601, -32603, 1001, 1003, 1004, 1008)
        assert data["error"]["code"] != -32603


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_fuzz_raw_bodies(broker: BrokerHandle, raw: bytes) -> None:
    status, data = broker.post_raw(raw)
    assert status == 200
    assert isinstance(data, dict) and data["jsonrpc"] == "2.0"
