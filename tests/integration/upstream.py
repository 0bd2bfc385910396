"""A loopback upstream for the routing tests: HTTP and HTTPS (a ``trustme`` CA) on 127.0.0.1.

It runs in the test runner's process, on a thread with its own event loop (aiohttp.web), so the
interpreters under test reach it only through the broker. Start it with ``Upstream.start()``; the
fixture ``upstream`` in ``conftest.py`` does that once per session.

Attributes: ``http_url``, ``https_url`` (``http://127.0.0.1:PORT``, ``https://localhost:PORT``: the
certificate is valid for ``localhost``, ``127.0.0.1`` and ``::1``), ``http_port``, ``https_port``,
``ca_file`` (the CA's PEM), ``wrong_ca_file`` (another CA: verification against it must fail),
``index_wheel`` (the wheel file served by the package index below).

Endpoints (every one takes a ``tag`` query parameter or ``X-Tag`` header, which ``/connections``
counts by):

- ``/echo`` any method: JSON ``method, path, query`` (``[[k, v], ...]``), ``headers``
  (``[[k, v], ...]`` in order), ``body_sha256``, ``body_length``, ``body`` (text, when under
  64 KiB), ``chunked`` (request sent with ``Transfer-Encoding: chunked``), ``form`` (urlencoded or
  multipart fields: ``{name: value text, or {"filename", "sha256", "length"}}``), ``cookies``.
- ``/bytes/{n}``: n deterministic binary bytes (``payload(n)``), header ``X-Sha256``.
- ``/upload``: streams the request body; JSON ``sha256, length, chunked``.
- ``/redirect/{n}``: ``302`` to ``/redirect/{n-1}``, ..., then ``/echo`` (query kept).
- ``/redirect-to?url=U``: ``302`` to ``U``, anywhere (each hop must be checked by the broker).
- ``/cookies/set``: two ``Set-Cookie`` headers (``a=1``, ``b=2``; or one per query parameter);
  ``/cookies/echo``: JSON of the cookies received.
- ``/gzip``: gzip-encoded JSON (``{"gzipped": true, ...}``).
- ``/status/{code}``: that status (no body for 1xx/204/304).
- ``/sse?n=5&interval=0.3``: server-sent events, each ``data: {"i": i, "sent": time.time()}``.
- ``/slow/{seconds}``: headers at once, body after the delay; ``?head=1`` delays the headers.
- ``/ws``: websocket echo (text and binary).
- ``/connections?tag=T``: ``{"count": distinct TCP connections seen for the tag, "requests": n}``.
- ``/whoami``: ``{"peer": [ip, port], "pid": pid of the process owning the client socket or None}``
  (Linux: from /proc; shows that a request arrived from the broker, not from the client).
- ``/`` and ``/s3/`` (GET): an S3 ``ListAllMyBucketsResult`` (botocore ``list_buckets``); ``PUT``/``GET``
  ``/s3/{bucket}/{key}``: stores and returns an object.
- ``/simple/``, ``/simple/{project}/``, ``/packages/{file}``: a PEP 503 index serving one wheel,
  ``agenshield-probe`` 0.1 (see ``make_wheel``).
"""

import asyncio
import base64
import gzip
import hashlib
import json
import os
import random
import ssl
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Set, Tuple

from aiohttp import WSMsgType, web

_payloads: Dict[int, bytes] = {}


def payload(n: int) -> bytes:
    """n deterministic pseudo-random bytes (every byte value appears), the same in every process."""
    if n not in _payloads:
        _payloads[n] = random.Random(n).getrandbits(8 * n).to_bytes(n, "little") if n else b""
    return _payloads[n]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(directory: Path, name: str = "agenshield_probe", version: str = "0.1") -> Path:
    """A real, minimal, pure-Python wheel (one module), written without any build backend."""
    dist = "%s-%s" % (name, version)
    files = {
        "%s.py" % name: b"VALUE = 42\n",
        "%s.dist-info/METADATA" % dist: (
            "Metadata-Version: 2.1\nName: %s\nVersion: %s\nSummary: routing test package\n"
            % (name.replace("_", "-"), version)
        ).encode(),
        "%s.dist-info/WHEEL" % dist: b"Wheel-Version: 1.0\nGenerator: agenshield-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append("%s,sha256=%s,%d" % (path, digest, len(data)))
    record.append("%s.dist-info/RECORD,," % dist)
    files["%s.dist-info/RECORD" % dist] = ("\n".join(record) + "\n").encode()
    target = directory / ("%s-py3-none-any.whl" % dist)
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return target


def _owner_pid(peer: Tuple[str, int], local_port: int) -> Optional[int]:
    """The pid whose socket is ``peer`` connected to our ``local_port`` (Linux /proc), or None."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.rsplit(":", 1)[1], 16) == peer[1] and int(remote.rsplit(":", 1)[1], 16) == local_port:
                inode = fields[9]
                break
        if inode:
            break
    if not inode or inode == "0":
        return None
    wanted = "socket:[%s]" % inode
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            for fd in os.listdir("/proc/%s/fd" % pid):
                try:
                    if os.readlink("/proc/%s/fd/%s" % (pid, fd)) == wanted:
                        return int(pid)
                except OSError:
                    continue
        except OSError:
            continue
    return None


class Upstream:
    """The servers and their state; see the module docstring."""

    def __init__(self, workdir: Path) -> None:
        import trustme

        self.workdir = workdir
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("localhost", "127.0.0.1", "::1")
        self.ca_file = str(workdir / "upstream-ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)
        self.wrong_ca_file = str(workdir / "wrong-ca.pem")
        trustme.CA().cert_pem.write_to_path(self.wrong_ca_file)
        self.server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self.server_ssl)
        # No TLS 1.3 session tickets after the handshake: websockets' sync client reads the TLS socket
        # in a thread while it writes its upgrade request in another, and on CPython 3.9 and 3.10 a
        # ticket arriving in between lost the 101 answer now and then (5-10% of wss connections
        # through a tunnel, also through the broker before this session; none with TLS 1.2 or without
        # tickets; none on 3.11+). README, "websockets".
        self.server_ssl.num_tickets = 0
        packages = workdir / "packages"
        packages.mkdir(exist_ok=True)
        self.index_wheel = make_wheel(packages)
        self._connections: Dict[str, Set[Tuple[Any, ...]]] = {}
        self._requests: Dict[str, int] = {}
        self._objects: Dict[str, bytes] = {}
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="upstream", daemon=True)
        self._runner: Optional[web.AppRunner] = None
        self.http_port = self.https_port = 0

    # -- lifecycle --------------------------------------------------------------------------

    @classmethod
    def start(cls, workdir: Optional[Path] = None) -> "Upstream":
        server = cls(workdir or Path(tempfile.mkdtemp(prefix="upstream-")))
        server._thread.start()
        asyncio.run_coroutine_threadsafe(server._start(), server.loop).result(30)
        return server

    async def _start(self) -> None:
        app = web.Application(client_max_size=1024 ** 3, middlewares=[self._track])
        app.router.add_route("*", "/echo", self.echo)
        app.router.add_get("/bytes/{n}", self.bytes_)
        app.router.add_route("*", "/upload", self.upload)
        app.router.add_route("*", "/redirect/{n}", self.redirect)
        app.router.add_get("/redirect-to", self.redirect_to)
        app.router.add_get("/cookies/set", self.cookies_set)
        app.router.add_get("/cookies/echo", self.cookies_echo)
        app.router.add_get("/gzip", self.gzip_)
        app.router.add_route("*", "/status/{code}", self.status)
        app.router.add_get("/sse", self.sse)
        app.router.add_get("/slow/{seconds}", self.slow)
        app.router.add_get("/ws", self.ws)
        app.router.add_get("/connections", self.connections)
        app.router.add_get("/whoami", self.whoami)
        app.router.add_get("/", self.s3_list)
        app.router.add_get("/s3/", self.s3_list)
        app.router.add_get("/s3", self.s3_list)
        app.router.add_route("*", "/s3/{bucket}/{key:.*}", self.s3_object)
        app.router.add_get("/simple/", self.simple_root)
        app.router.add_get("/simple/{project}/", self.simple_project)
        app.router.add_get("/packages/{file}", self.package)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        plain = web.TCPSite(self._runner, "127.0.0.1", 0)
        await plain.start()
        tls = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.server_ssl)
        await tls.start()
        self.http_port = plain._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.https_port = tls._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    @property
    def http_url(self) -> str:
        return "http://127.0.0.1:%d" % self.http_port

    @property
    def https_url(self) -> str:
        return "https://localhost:%d" % self.https_port

    def connection_count(self, tag: str) -> int:
        """Distinct TCP connections that carried a request tagged ``tag`` (also ``/connections``)."""
        return len(self._connections.get(tag, ()))

    def request_count(self, tag: str) -> int:
        return self._requests.get(tag, 0)

    # -- bookkeeping ------------------------------------------------------------------------

    @web.middleware
    async def _track(self, request: web.Request, handler: Any) -> web.StreamResponse:
        tag = request.query.get("tag") or request.headers.get("X-Tag") or ""
        if request.path != "/connections":
            transport = request.transport
            key = (id(transport), transport.get_extra_info("peername") if transport else None)
            self._connections.setdefault(tag, set()).add(key)
            self._requests[tag] = self._requests.get(tag, 0) + 1
        return await handler(request)  # type: ignore[no-any-return]

    # -- handlers ---------------------------------------------------------------------------

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        info: Dict[str, Any] = {
            "method": request.method,
            "path": request.path,
            "query": [[k, v] for k, v in request.query.items()],
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_sha256": sha256(body),
            "body_length": len(body),
            "body": body.decode("utf-8", "replace") if len(body) < 65536 else None,
            "chunked": "chunked" in request.headers.get("Transfer-Encoding", "").lower(),
            "cookies": dict(request.cookies),
            "form": await self._form(request, body),
        }
        return web.json_response(info)

    async def _form(self, request: web.Request, body: bytes) -> Optional[Dict[str, Any]]:
        ctype = request.headers.get("Content-Type", "")
        if ctype.startswith("application/x-www-form-urlencoded"):
            from urllib.parse import parse_qsl

            return dict(parse_qsl(body.decode("latin-1"), keep_blank_values=True))
        if ctype.startswith("multipart/form-data"):
            from email.parser import BytesParser
            from email.policy import HTTP

            message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + ctype.encode("latin-1") + b"\r\n\r\n" + body)
            fields: Dict[str, Any] = {}
            for part in message.iter_parts():
                name = part.get_param("name", header="content-disposition") or ""
                data = part.get_payload(decode=True) or b""
                filename = part.get_filename()
                if filename:
                    fields[name] = {"filename": filename, "sha256": sha256(data), "length": len(data)}
                else:
                    fields[name] = data.decode("utf-8", "replace")
            return fields
        return None

    async def bytes_(self, request: web.Request) -> web.Response:
        data = payload(int(request.match_info["n"]))
        return web.Response(body=data, content_type="application/octet-stream", headers={"X-Sha256": sha256(data)})

    async def upload(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        length = 0
        async for chunk in request.content.iter_chunked(1 << 16):
            digest.update(chunk)
            length += len(chunk)
        chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
        return web.json_response({"sha256": digest.hexdigest(), "length": length, "chunked": chunked})

    async def redirect(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        target = "/redirect/%d" % (n - 1) if n > 1 else "/echo"
        if request.query_string:
            target += "?" + request.query_string
        raise web.HTTPFound(target)

    async def redirect_to(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["url"])  # anywhere: to test that each hop is checked

    async def cookies_set(self, request: web.Request) -> web.Response:
        response = web.json_response({"set": True})
        pairs = list(request.query.items()) or [("a", "1"), ("b", "2")]
        for name, value in pairs:
            if name != "tag":
                response.set_cookie(name, value, path="/")
        return response

    async def cookies_echo(self, request: web.Request) -> web.Response:
        return web.json_response({"cookies": dict(request.cookies)})

    async def gzip_(self, request: web.Request) -> web.Response:
        data = json.dumps({"gzipped": True, "filler": "x" * 2000}).encode()
        return web.Response(
            body=gzip.compress(data), headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    async def status(self, request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        if code in (204, 304) or code < 200:
            return web.Response(status=code)
        return web.Response(status=code, text="status %d\n" % code)

    async def sse(self, request: web.Request) -> web.StreamResponse:
        n = int(request.query.get("n", "5"))
        interval = float(request.query.get("interval", "0.3"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        for i in range(n):
            if i:
                await asyncio.sleep(interval)
            await response.write(("data: %s\n\n" % json.dumps({"i": i, "sent": time.time()})).encode())
        await response.write_eof()
        return response

    async def slow(self, request: web.Request) -> web.StreamResponse:
        seconds = float(request.match_info["seconds"])
        if request.query.get("head"):
            await asyncio.sleep(seconds)
            return web.Response(text="late\n")
        response = web.StreamResponse(headers={"Content-Type": "text/plain", "Content-Length": "5"})
        await response.prepare(request)
        await asyncio.sleep(seconds)
        await response.write(b"late\n")
        await response.write_eof()
        return response

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            if msg.type == WSMsgType.TEXT:
                await sock.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await sock.send_bytes(msg.data)
            else:
                break
        return sock

    async def connections(self, request: web.Request) -> web.Response:
        tag = request.query.get("tag", "")
        return web.json_response({"count": self.connection_count(tag), "requests": self.request_count(tag)})

    async def whoami(self, request: web.Request) -> web.Response:
        transport = request.transport
        peer = transport.get_extra_info("peername") if transport else None
        local = transport.get_extra_info("sockname") if transport else None
        pid = None
        if peer and local:
            pid = await asyncio.get_running_loop().run_in_executor(None, _owner_pid, (peer[0], peer[1]), local[1])
        return web.json_response({"peer": list(peer[:2]) if peer else None, "pid": pid})

    async def s3_list(self, request: web.Request) -> web.Response:
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<ListAllMyBucketsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            "<Owner><ID>agenshield</ID><DisplayName>agenshield</DisplayName></Owner>"
            "<Buckets><Bucket><Name>routed-bucket</Name><CreationDate>2024-01-01T00:00:00.000Z</CreationDate></Bucket>"
            "</Buckets></ListAllMyBucketsResult>"
        )
        return web.Response(text=xml, content_type="application/xml")

    async def s3_object(self, request: web.Request) -> web.Response:
        key = request.match_info["bucket"] + "/" + request.match_info["key"]
        if request.method == "PUT":
            data = await request.read()
            self._objects[key] = data
            return web.Response(status=200, headers={"ETag": '"%s"' % hashlib.md5(data).hexdigest()})
        if request.method in ("GET", "HEAD") and key in self._objects:
            data = self._objects[key]
            return web.Response(body=data, content_type="application/octet-stream",
                                headers={"ETag": '"%s"' % hashlib.md5(data).hexdigest()})
        return web.Response(status=404, text="<Error><Code>NoSuchKey</Code></Error>", content_type="application/xml")

    async def simple_root(self, request: web.Request) -> web.Response:
        return web.Response(text='<html><body><a href="agenshield-probe/">agenshield-probe</a></body></html>',
                            content_type="text/html")

    async def simple_project(self, request: web.Request) -> web.Response:
        project = request.match_info["project"].lower().replace("_", "-")
        if project != "agenshield-probe":
            raise web.HTTPNotFound()
        name = self.index_wheel.name
        digest = sha256(self.index_wheel.read_bytes())
        html = '<html><body><a href="/packages/%s#sha256=%s">%s</a></body></html>' % (name, digest, name)
        return web.Response(text=html, content_type="text/html")

    async def package(self, request: web.Request) -> web.Response:
        if request.match_info["file"] != self.index_wheel.name:
            raise web.HTTPNotFound()
        return web.Response(body=self.index_wheel.read_bytes(), content_type="application/octet-stream")
