"""Fixtures for the broker tests: one event-loop thread, real loopback upstreams, real brokers.

Everything listens on 127.0.0.1 (or a Unix socket) and every client talks only to those. The
upstream app is aiohttp.web served over HTTP and over HTTPS with a ``trustme`` CA; brokers run
in-process on the same loop thread (fast to start) or as a real CLI subprocess in ``test_cli.py``.
"""

import asyncio
import base64
import gzip
import io
import json
import os
import socket
import ssl
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest
import trustme
from aiohttp import web

from agenshield_shim.broker.config import BrokerConfig
from agenshield_shim.broker.runner import BrokerThread, LoopThread

BINARY = bytes(range(256)) * 4

_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
               "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    """A hang (say, a broker that buffers a stream) fails its test after 60 s instead of stalling CI."""
    if not config.pluginmanager.hasplugin("timeout"):
        return
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.fspath).startswith(here) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(60))


@pytest.fixture(autouse=True)
def _no_env_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients get the broker as their proxy explicitly; no environment proxy may interfere."""
    for name in _PROXY_VARS:
        monkeypatch.delenv(name, raising=False)


class Upstream:
    """The loopback upstream: routes used by the tests, and a record of what it saw."""

    def __init__(self) -> None:
        self.gates: Dict[str, threading.Event] = {}
        self.disconnects: List[str] = []
        self.seen: List[Dict[str, Any]] = []
        self.upload_progress: Dict[str, int] = {}
        self.first_chunk_received = threading.Event()

    def gate(self, name: str) -> threading.Event:
        return self.gates.setdefault(name, threading.Event())

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        r = app.router
        r.add_route("*", "/echo", self.echo)
        r.add_get("/hello", self.hello)
        r.add_get("/bytes", self.binary)
        r.add_get("/loop", self.loop)
        r.add_get("/gzip", self.gz)
        r.add_get("/cookies", self.cookies)
        r.add_route("*", "/redirect", self.redirect)
        r.add_get("/status/{code}", self.status)
        r.add_get("/gated", self.gated)
        r.add_get("/infinite", self.infinite)
        r.add_get("/slow", self.slow)
        r.add_get("/big", self.big)
        r.add_get("/chunked", self.chunked)
        r.add_post("/upload", self.upload)
        r.add_get("/ws", self.ws)
        return app

    async def echo(self, req: web.Request) -> web.Response:
        body = await req.read()
        info = {
            "method": req.method, "path": req.path_qs,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in req.raw_headers],
            "body_b64": base64.b64encode(body).decode(), "chunked": req.headers.get("Transfer-Encoding"),
            "host": req.headers.get("Host"), "scheme": req.scheme,
        }
        self.seen.append(info)
        return web.json_response(info)

    async def hello(self, req: web.Request) -> web.Response:
        return web.Response(text="hello")

    async def binary(self, req: web.Request) -> web.Response:
        return web.Response(body=BINARY, content_type="application/octet-stream")

    async def loop(self, req: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "/loop"})

    async def status(self, req: web.Request) -> web.Response:
        return web.Response(status=int(req.match_info["code"]), text="status")

    async def gz(self, req: web.Request) -> web.Response:
        return web.Response(body=gzip.compress(b"compressed" * 10), headers={"Content-Encoding": "gzip"})

    async def cookies(self, req: web.Request) -> web.Response:
        resp = web.Response(text="c")
        resp.headers.add("Set-Cookie", "a=1")
        resp.headers.add("Set-Cookie", "b=2")
        resp.headers.add("X-Multi", "x")
        resp.headers.add("X-Multi", "y")
        return resp

    async def redirect(self, req: web.Request) -> web.Response:
        code = int(req.query.get("code", "302"))
        return web.Response(status=code, headers={"Location": req.query["to"]}, text="moved")

    async def gated(self, req: web.Request) -> web.StreamResponse:
        """Sends a first chunk, then waits for the test to have *received* it before the last one."""
        name = req.query.get("gate", "g")
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(req)
        await resp.write(b"first-chunk;")
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(None, self.gate(name).wait, 20)
        await resp.write(b"last-chunk" if ok else b"gate-timeout")
        await resp.write_eof()
        return resp

    async def infinite(self, req: web.Request) -> web.StreamResponse:
        name = req.query.get("name", "inf")
        resp = web.StreamResponse()
        resp.content_length = 10 ** 12
        await resp.prepare(req)
        chunk = b"x" * 65536
        try:
            for _ in range(10 ** 7):
                await resp.write(chunk)
        except (ConnectionError, asyncio.CancelledError):
            self.disconnects.append(name)
            raise
        return resp

    async def slow(self, req: web.Request) -> web.Response:
        await asyncio.sleep(float(req.query.get("s", "3")))
        return web.Response(text="slow")

    async def big(self, req: web.Request) -> web.StreamResponse:
        n = int(req.query.get("n", str(1 << 20)))
        resp = web.StreamResponse()
        resp.content_length = n
        await resp.prepare(req)
        block = bytes(range(256)) * 256
        sent = 0
        while sent < n:
            part = block[: min(len(block), n - sent)]
            await resp.write(part)
            sent += len(part)
        await resp.write_eof()
        return resp

    async def chunked(self, req: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Trailer": "X-T"})
        resp.enable_chunked_encoding()
        await resp.prepare(req)
        for i in range(5):
            await resp.write(b"part%d;" % i)
        await resp.write_eof()
        return resp

    async def upload(self, req: web.Request) -> web.Response:
        name = req.query.get("name", "up")
        total = 0
        async for chunk in req.content.iter_any():
            total += len(chunk)
            self.upload_progress[name] = total
            if total and not self.first_chunk_received.is_set():
                self.first_chunk_received.set()
        return web.json_response({"received": total, "te": req.headers.get("Transfer-Encoding")})

    async def ws(self, req: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(req)
        async for msg in ws:
            if msg.type == 1:  # TEXT
                await ws.send_str("echo:" + msg.data)
            elif msg.type == 2:
                await ws.send_bytes(msg.data)
        return ws


class Servers:
    def __init__(self, loop_thread: LoopThread, tmp: str) -> None:
        self.loop_thread = loop_thread
        self.upstream = Upstream()
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("localhost", "127.0.0.1", "::1")
        self.server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self.server_ctx)
        self.ca_path = os.path.join(tmp, "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_path)
        self.client_ctx = ssl.create_default_context()
        self.ca.configure_trust(self.client_ctx)
        self.runner: Optional[web.AppRunner] = None
        self.http_port = 0
        self.https_port = 0
        loop_thread.run(self._start())

    async def _start(self) -> None:
        self.runner = web.AppRunner(self.upstream.app(), handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        tls = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.server_ctx)
        await tls.start()
        self.https_port = tls._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    @property
    def http(self) -> str:
        return "http://127.0.0.1:%d" % self.http_port

    @property
    def https(self) -> str:
        return "https://localhost:%d" % self.https_port

    def close(self) -> None:
        if self.runner is not None:
            self.loop_thread.run(self.runner.cleanup())


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="session")
def servers(loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    s = Servers(loop_thread, str(tmp_path_factory.mktemp("tls")))
    yield s
    s.close()


class AuditSink(io.StringIO):
    """Collects audit lines written by an in-process broker."""

    def entries(self) -> List[Dict[str, Any]]:
        return [json.loads(line) for line in self.getvalue().splitlines() if line.strip()]


async def fake_resolver(host: str, port: int) -> List[Any]:
    """Loopback-only name resolution for tests: ``*.nxdomain.test`` fails like DNS, the rest is 127.0.0.1."""
    if host.endswith("nxdomain.test"):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    if host == "::1":
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0))]
    return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]


class BrokerHandle:
    def __init__(self, bt: BrokerThread, audit: AuditSink, servers: Servers) -> None:
        self.bt = bt
        self.broker = bt.broker
        self.audit = audit
        self.servers = servers

    @property
    def port(self) -> int:
        return self.bt.port

    @property
    def url(self) -> str:
        return self.bt.url

    @property
    def proxy(self) -> str:
        return self.bt.url

    def rpc(self, method: str, params: Optional[Dict[str, Any]] = None, req_id: Any = 1, path: str = "/rpc") -> Dict[str, Any]:
        payload: Dict[str, Any] = {"jsonrpc": "2.0", "id": req_id, "method": method}
        if params is not None:
            payload["params"] = params
        return self.post_raw(json.dumps(payload).encode(), path)[1]

    def post_raw(self, body: bytes, path: str = "/rpc") -> Any:
        import urllib.error
        import urllib.request

        req = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            data = exc.read()
            try:
                return exc.code, json.loads(data)
            except ValueError:
                return exc.code, data

    def stats(self) -> Dict[str, int]:
        return self.bt.loop_thread.run(_stats(self.broker))


async def _stats(broker: Any) -> Dict[str, int]:
    return broker.stats()


@pytest.fixture
def make_broker(loop_thread: LoopThread, servers: Servers) -> Iterator[Callable[..., BrokerHandle]]:
    started: List[BrokerThread] = []

    def factory(**kw: Any) -> BrokerHandle:
        kw.setdefault("port", 0)
        kw.setdefault("upstream_ca_file", servers.ca_path)
        for k in ("allow",):
            if k in kw:
                kw[k] = tuple(kw[k])
        audit = AuditSink()
        bt = BrokerThread(BrokerConfig(**kw), loop_thread=loop_thread, audit_stream=audit, resolver=fake_resolver)
        started.append(bt)
        return BrokerHandle(bt, audit, servers)

    yield factory
    for bt in started:
        bt.stop()


@pytest.fixture
def broker(make_broker: Callable[..., BrokerHandle]) -> BrokerHandle:
    """The default broker: extensions on, default policy (loopback only)."""
    return make_broker()


@pytest.fixture
def compat_broker(make_broker: Callable[..., BrokerHandle]) -> BrokerHandle:
    return make_broker(compat=True)


def raw_exchange(port: int, data: bytes, timeout: float = 10.0, host: str = "127.0.0.1", half_close: bool = True) -> bytes:
    """Send bytes on a fresh connection, half-close (unless told not to), read until the broker closes."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        if half_close:
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        return out


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])
