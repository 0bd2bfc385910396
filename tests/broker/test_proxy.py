"""Forward proxy and ``CONNECT`` tunnels, driven by real clients: curl, urllib, requests, httpx, aiohttp."""

import asyncio
import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from typing import Any, List, Tuple

import aiohttp
import httpx
import pytest
import requests

from .conftest import BINARY, BrokerHandle, raw_exchange, status_of

CURL = "/usr/bin/curl"


def curl(*args: str) -> Tuple[int, str, str]:
    p = subprocess.run([CURL, "-sS", "--max-time", "20", *args], capture_output=True, text=True, timeout=30)
    return p.returncode, p.stdout, p.stderr


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# -- real clients, HTTP (forward) and HTTPS (CONNECT) ---------------------------------------------------


def test_curl_forward_and_tunnel(broker: BrokerHandle) -> None:
    s = broker.servers
    rc, out, err = curl("-x", broker.proxy, s.http + "/hello")
    assert rc == 0 and out == "hello", err
    rc, out, err = curl("-x", broker.proxy, "--cacert", s.ca_path, s.https + "/hello")
    assert rc == 0 and out == "hello", err
    rc, out, err = curl("-p", "-x", broker.proxy, s.http + "/hello")  # plain HTTP through a tunnel
    assert rc == 0 and out == "hello", err
    ops = [e["operation"] for e in broker.audit.entries()]
    assert ops == ["forward", "connect", "connect"]


def test_curl_post_upload_and_binary(broker: BrokerHandle, tmp_path: Any) -> None:
    f = tmp_path / "up.bin"
    f.write_bytes(BINARY * 1000)
    rc, out, err = curl("-x", broker.proxy, "--data-binary", "@%s" % f, broker.servers.http + "/upload")
    assert rc == 0, err
    assert json.loads(out)["received"] == len(BINARY) * 1000
    out_file = tmp_path / "down.bin"
    rc, _, err = curl("-x", broker.proxy, "-o", str(out_file), broker.servers.http + "/bytes")
    assert rc == 0 and out_file.read_bytes() == BINARY


def test_curl_denied_and_errors(broker: BrokerHandle, compat_broker: BrokerHandle) -> None:
    rc, out, _ = curl("-i", "-x", broker.proxy, "http://example.com/")
    assert "403" in out.splitlines()[0] and "Blocked by AgenShield URL policy" in out
    assert "x-proxy-error: blocked-by-policy" in out.lower()
    rc, out, _ = curl("-i", "-x", compat_broker.proxy, "http://example.com/")
    assert "403" in out.splitlines()[0] and "x-proxy-error" not in out.lower()
    rc, out, err = curl("-v", "-x", broker.proxy, "https://example.com/")
    assert rc != 0 and "403" in err


def test_urllib(broker: BrokerHandle, servers: Any) -> None:
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({"http": broker.proxy, "https": broker.proxy}),
        urllib.request.HTTPSHandler(context=servers.client_ctx),
    )
    with opener.open(servers.http + "/hello", timeout=10) as r:
        assert r.read() == b"hello"
    with opener.open(servers.https + "/bytes", timeout=10) as r:
        assert r.read() == BINARY
    req = urllib.request.Request(servers.http + "/echo", data=b"abc", method="POST")
    with opener.open(req, timeout=10) as r:
        seen = json.loads(r.read())
        assert seen["method"] == "POST" and seen["host"] == "127.0.0.1:%d" % servers.http_port
    with pytest.raises(urllib.error.HTTPError) as info:
        opener.open("http://example.com/", timeout=10)
    assert info.value.code == 403


def test_requests_keepalive_and_methods(broker: BrokerHandle, servers: Any) -> None:
    with requests.Session() as sess:
        sess.proxies = {"http": broker.proxy, "https": broker.proxy}
        sess.verify = servers.ca_path
        for _ in range(5):
            assert sess.get(servers.http + "/hello", timeout=10).text == "hello"
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            r = sess.request(method, servers.http + "/echo", data=b"d" if method != "GET" else None, timeout=10)
            assert r.json()["method"] == method
        assert sess.head(servers.http + "/hello", timeout=10).headers["Content-Length"] == "5"
        r = sess.get(servers.https + "/cookies", timeout=10)
        assert r.cookies.get("a") == "1" and r.cookies.get("b") == "2"
        r = sess.get(servers.http + "/chunked", timeout=10)
        assert r.text == "part0;part1;part2;part3;part4;"
        # 3xx passed through by the forward proxy; requests follows it itself (a checked hop each)
        r = sess.get(servers.http + "/redirect?to=/hello", timeout=10)
        assert r.text == "hello" and r.history[0].status_code == 302
        r = sess.get(servers.http + "/redirect?to=/hello", timeout=10, allow_redirects=False)
        assert r.status_code == 302 and r.headers["Location"] == "/hello"
    st = broker.stats()
    assert st["forwards"] >= 15
    # keep-alive: far fewer client connections than requests were needed
    assert st["tunnels"] == 1


def test_requests_errors(broker: BrokerHandle) -> None:
    proxies = {"http": broker.proxy, "https": broker.proxy}
    r = requests.get("http://example.com/", proxies=proxies, timeout=10)
    assert r.status_code == 403 and r.text == "Blocked by AgenShield URL policy"
    assert r.headers["X-Proxy-Error"] == "blocked-by-policy"
    with pytest.raises(requests.exceptions.ProxyError):
        requests.get("https://example.com/", proxies=proxies, timeout=10)


def test_httpx(broker: BrokerHandle, servers: Any) -> None:
    with httpx.Client(proxy=broker.proxy, verify=servers.client_ctx, timeout=10) as client:
        assert client.get(servers.http + "/hello").text == "hello"
        assert client.get(servers.https + "/hello").text == "hello"
        assert client.post(servers.https + "/echo", content=b"xyz").json()["method"] == "POST"
        with client.stream("GET", servers.https + "/big?n=3000000") as r:
            total = sum(len(c) for c in r.iter_bytes())
        assert total == 3000000


def test_aiohttp_client(broker: BrokerHandle, servers: Any, loop_thread: Any) -> None:
    async def go() -> List[Any]:
        async with aiohttp.ClientSession() as s:
            out = []
            async with s.get(servers.http + "/hello", proxy=broker.proxy) as r:
                out.append(await r.text())
            async with s.get(servers.https + "/bytes", proxy=broker.proxy, ssl=servers.client_ctx) as r:
                out.append(await r.read())
            async with s.ws_connect(servers.https.replace("https", "wss") + "/ws", proxy=broker.proxy,
                                    ssl=servers.client_ctx) as ws:
                await ws.send_str("hi")
                out.append((await ws.receive()).data)
            async with s.ws_connect(servers.http.replace("http", "ws") + "/ws", proxy=broker.proxy) as ws:
                await ws.send_str("plain")
                out.append((await ws.receive()).data)
            return out

    assert loop_thread.run(go()) == ["hello", BINARY, "echo:hi", "echo:plain"]


# -- streaming ------------------------------------------------------------------------------------------


def _stream_first_chunk_before_last(proxy_url: str, url: str, gate: threading.Event, verify: Any = None) -> None:
    """The upstream sends its last chunk only after we received the first: a buffering broker deadlocks."""
    with httpx.Client(proxy=proxy_url, verify=verify or True, timeout=15) as client:
        with client.stream("GET", url) as r:
            it = r.iter_raw()
            first = next(it)
            assert first.startswith(b"first-chunk;")
            assert not gate.is_set()
            gate.set()
            rest = b"".join(it)
    assert (first + rest).endswith(b"last-chunk")


def test_forward_streams_response(broker: BrokerHandle, servers: Any) -> None:
    gate = servers.upstream.gate("fwd")
    _stream_first_chunk_before_last(broker.proxy, servers.http + "/gated?gate=fwd", gate)


def test_tunnel_streams_response(broker: BrokerHandle, servers: Any) -> None:
    gate = servers.upstream.gate("tun")
    _stream_first_chunk_before_last(broker.proxy, servers.https + "/gated?gate=tun", gate, servers.client_ctx)


def test_forward_streams_request_body(broker: BrokerHandle, servers: Any) -> None:
    """The upstream sees the first part of an upload before the client has sent the rest."""
    servers.upstream.first_chunk_received.clear()

    def body() -> Any:
        yield b"a" * 1000
        assert servers.upstream.first_chunk_received.wait(10), "broker held the request body back"
        yield b"b" * 1000

    r = requests.post(servers.http + "/upload?name=s", data=body(), proxies={"http": broker.proxy}, timeout=15)
    assert r.json() == {"received": 2000, "te": "chunked"}


# -- CONNECT answers ------------------------------------------------------------------------------------


def connect(port: int, target: str, extra: bytes = b"") -> bytes:
    head = b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target.encode(), target.encode())
    return raw_exchange(port, head + extra, half_close=not extra)


def test_connect_established_and_pipelined_bytes(broker: BrokerHandle, servers: Any) -> None:
    req = b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    out = connect(broker.port, "127.0.0.1:%d" % servers.http_port, req)  # request sent right behind CONNECT
    assert out.startswith(b"HTTP/1.1 200 Connection Established\r\n\r\nHTTP/1.1 200 OK")
    assert out.endswith(b"hello")


def test_connect_denied(broker: BrokerHandle) -> None:
    out = connect(broker.port, "example.com:443")
    assert out.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"X-Proxy-Error: blocked-by-policy\r\n" in out


def test_connect_refused_502(broker: BrokerHandle) -> None:
    out = connect(broker.port, "127.0.0.1:%d" % free_port())
    assert out.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and b"X-Proxy-Error: connection-refused\r\n" in out


def test_connect_dns_failure_403(make_broker: Any) -> None:
    b = make_broker(allow=["*.nxdomain.test"])
    out = connect(b.port, "api.nxdomain.test:443")
    assert status_of(out) == 403 and b"X-Proxy-Error: dns-resolution-failed\r\n" in out
    # the forward proxy reports the same failure as 502 Proxy error (+ header as an extension)
    out = raw_exchange(b.port, b"GET http://api.nxdomain.test/ HTTP/1.1\r\nHost: api.nxdomain.test\r\n\r\n")
    assert status_of(out) == 502 and out.endswith(b"Proxy error")
    assert b"X-Proxy-Error: dns-resolution-failed\r\n" in out


def test_connect_timeout_502(make_broker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A listener whose backlog is full never completes the handshake: connection-timeout."""
    b = make_broker(connect_timeout=0.5)
    from agenshield_shim.broker import upstream

    real = upstream.asyncio.open_connection

    async def never(*a: Any, **k: Any) -> Any:
        await asyncio.sleep(30)
        return await real(*a, **k)

    monkeypatch.setattr(upstream.asyncio, "open_connection", never)
    t0 = time.monotonic()
    out = connect(b.port, "127.0.0.1:%d" % b.servers.http_port)
    assert status_of(out) == 502 and b"X-Proxy-Error: connection-timeout\r\n" in out
    assert time.monotonic() - t0 < 5


def test_connect_default_port_443(make_broker: Any) -> None:
    b = make_broker(allow=["onlyhost.test:443"])
    out = connect(b.port, "onlyhost.test")  # resolves (fake resolver) to 127.0.0.1:443: refused, but allowed
    assert status_of(out) == 502
    assert b.audit.entries()[-1]["target"] == "onlyhost.test:443"


def test_connect_port_policy_extension(make_broker: Any, servers: Any) -> None:
    """``connect-port-policy``: the port counts; in ``--compat`` only the host is checked (as the daemon)."""
    allow = ["127.0.0.1:%d" % servers.https_port]
    ext = make_broker(allow=allow)
    out = connect(ext.port, "127.0.0.1:%d" % servers.http_port)
    assert status_of(out) == 403 and b"blocked-by-policy" in out
    compat = make_broker(allow=allow, compat=True)
    req = b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    out = connect(compat.port, "127.0.0.1:%d" % servers.http_port, req)
    assert out.startswith(b"HTTP/1.1 200 Connection Established") and out.endswith(b"hello")


def test_bad_connect_target_400(broker: BrokerHandle) -> None:
    for target in ("", "host:99999", "[::1", "a:b:c", "host:port"):
        out = raw_exchange(broker.port, b"CONNECT %s HTTP/1.1\r\nHost: x\r\n\r\n" % target.encode())
        assert status_of(out) == 400, target


# -- forward proxy answers --------------------------------------------------------------------------------


def test_forward_refusals_compat_vs_extension(make_broker: Any) -> None:
    port = free_port()
    for compat in (False, True):
        b = make_broker(compat=compat)
        out = raw_exchange(b.port, b"GET http://127.0.0.1:%d/ HTTP/1.1\r\nHost: x\r\n\r\n" % port)
        assert status_of(out) == 502 and out.endswith(b"Proxy error")
        assert (b"X-Proxy-Error: connection-refused" in out) is (not compat)
        out = raw_exchange(b.port, b"DELETE http://example.com/x HTTP/1.1\r\nHost: example.com\r\n\r\n")
        assert status_of(out) == 403 and out.endswith(b"Blocked by AgenShield URL policy")
        assert (b"X-Proxy-Error: blocked-by-policy" in out) is (not compat)
        assert (b"X-Proxy-Error-Reason: Host 'example.com' is not allowed\r\n" in out) is (not compat), out


def test_forward_rewrites_host_and_drops_hop_headers(broker: BrokerHandle, servers: Any) -> None:
    req = (b"GET http://127.0.0.1:%d/echo HTTP/1.1\r\nHost: evil.example\r\nProxy-Connection: keep-alive\r\n"
           b"Proxy-Authorization: Basic eDp5\r\nX-Keep: 1\r\nConnection: close, X-Drop\r\nX-Drop: 1\r\n\r\n") % servers.http_port
    out = raw_exchange(broker.port, req)
    seen = json.loads(out.split(b"\r\n\r\n", 1)[1])
    names = {k.lower(): v for k, v in seen["headers"]}
    assert names["host"] == "127.0.0.1:%d" % servers.http_port
    assert "proxy-connection" not in names and "proxy-authorization" not in names and "x-drop" not in names
    assert names["x-keep"] == "1"


def test_forward_https_absolute_form(broker: BrokerHandle, servers: Any) -> None:
    out = raw_exchange(broker.port, b"GET %s/hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                       % servers.https.encode())
    assert status_of(out) == 200 and out.endswith(b"hello")


def test_forward_policy_method_and_path(make_broker: Any, servers: Any, tmp_path: Any) -> None:
    pol = tmp_path / "p.toml"
    pol.write_text(
        '[[rules]]\nid = "ro"\naction = "allow"\nhosts = ["127.0.0.1"]\nmethods = ["GET"]\npaths = ["/hello", "/echo"]\n'
        '[[rules]]\nid = "no-echo-q"\naction = "deny"\nhosts = ["127.0.0.1"]\npaths = ["/echo"]\nmethods = ["GET"]\n'
    )
    b = make_broker(policy_file=str(pol))
    proxies = {"http": b.proxy}
    url = servers.http
    assert requests.get(url + "/hello", proxies=proxies, timeout=10).status_code == 200
    assert requests.post(url + "/hello", proxies=proxies, timeout=10).status_code == 403
    assert requests.get(url + "/echo", proxies=proxies, timeout=10).status_code == 403  # deny wins
    assert requests.get(url + "/x/../echo", proxies=proxies, timeout=10).status_code == 403
    assert requests.get(url + "/bytes", proxies=proxies, timeout=10).status_code == 403
    # a method/path rule never opens a tunnel
    assert status_of(connect(b.port, "127.0.0.1:%d" % servers.https_port)) == 403
