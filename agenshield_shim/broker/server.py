"""The broker process: listeners, the per-connection request loop, routing, graceful shutdown.

Design choice: the whole front door runs on asyncio streams with the small HTTP/1.1 layer in
``http1.py``; aiohttp is used only as the upstream client of ``/rpc``. aiohttp.web would serve
``/health`` and ``/rpc`` nicely, but a forward proxy must see absolute-form requests and
``CONNECT`` must take over the raw socket, and aiohttp's server offers no supported seam for
either. Running two HTTP servers on one port is not possible, so one parser serves every route
and applies one set of limits (head size 431, head time 408, body size 413) uniformly.

Python API (also documented in ``agenshield_shim.broker``)::

    broker = Broker(BrokerConfig(port=0))
    await broker.start()          # PolicyError / OSError if it cannot
    broker.port, broker.url       # e.g. 41233, "http://127.0.0.1:41233"
    await broker.stop()
"""

import asyncio
import contextlib
import errno
import ipaddress
import json
import os
import socket
import stat
import sys
from typing import Any, Dict, List, Optional, Set, TextIO, Tuple

from ..authority import authority, proxy_url
from .access import caller_allowed
from .audit import AuditLog
from .config import BrokerConfig
from .context import Conn, Services
from . import legacy
from .forward import handle_forward
from .http1 import (
    READ_SIZE, HttpError, abort, ProtocolError, RequestHead, Stream, check_host, parse_request_head,
    read_body, render_response, request_framing,
)
from .policy import build_policy
from .rpc import RpcService
from .tunnel import handle_connect
from .upstream import Resolver, make_client_ssl_context

JSON = [("Content-Type", "application/json")]
_OUT_OF_RESOURCES = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


def _fd_limit() -> int:
    """The soft file-descriptor limit, 0 if unknown."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return soft if soft != resource.RLIM_INFINITY and soft > 0 else 1 << 16
    except (ImportError, ValueError, OSError):
        return 0


def listen_warnings(hosts: List[str]) -> List[str]:
    """One warning per listen address that is not loopback (``0.0.0.0``, ``::``, a LAN address)."""
    out = []
    for host in hosts:
        try:
            loopback = ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            out.append("listening on %s, which is not a loopback address: the port is reachable from other"
                       " machines (their requests are refused with 403); use --host 127.0.0.1 unless that is"
                       " what you want" % host)
    return out


def _say(message: str) -> None:
    try:
        sys.stderr.write("agenshield broker: %s\n" % message)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


#: First bytes that make a Unix-socket connection newline-delimited JSON-RPC rather than HTTP.
JSON_START = frozenset(b"{[ \t\r\n")
#: Listen backlog (callers past ``max_connections`` wait here). With 100 (asyncio's default), a burst
#: of a few hundred connects (500 tunnels at once) would overflow it and wait out a 1 s SYN retry.
BACKLOG = 1024


class Broker:
    """One running broker. Not reusable: ``start()`` once, ``stop()`` once."""

    def __init__(
        self, config: BrokerConfig, audit_stream: Optional[TextIO] = None, resolver: Optional[Resolver] = None,
    ) -> None:
        self.config = config
        self._resolver = resolver
        self._audit_stream = audit_stream
        self.services: Optional[Services] = None
        self.rpc: Optional[RpcService] = None
        self._servers: List[socket.socket] = []
        self._accept_tasks: List["asyncio.Future[None]"] = []
        self._slots: Optional[asyncio.Semaphore] = None
        self._said_fd = False
        self._said_errors: Set[str] = set()
        self._tcp_addresses: List[Tuple[str, int]] = []
        self._conn_tasks: Dict["asyncio.Task[Any]", Conn] = {}
        self._closing = False
        self._stopped: Optional[asyncio.Event] = None

    # -- public ------------------------------------------------------------------------------

    @property
    def address(self) -> Tuple[str, int]:
        """The first TCP (host, port) bound; raises if listening only on a Unix socket."""
        if not self._tcp_addresses:
            raise RuntimeError("broker is not listening on TCP")
        return self._tcp_addresses[0]

    @property
    def addresses(self) -> List[Tuple[str, int]]:
        return list(self._tcp_addresses)

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def url(self) -> str:
        host, port = self.address
        return proxy_url(host, port)

    @property
    def unix_path(self) -> Optional[str]:
        return self.config.unix

    @property
    def max_connections(self) -> int:
        """The cap on client connections served at once (``BrokerConfig.max_connections``)."""
        if self.config.max_connections is not None:
            return max(1, self.config.max_connections)
        limit = _fd_limit()
        return max(8, limit // 4) if limit else 1024

    def stats(self) -> Dict[str, int]:
        """Live counts (connections, upstreams, tunnels) and totals, for tests and diagnostics."""
        s = self.services
        out = {
            "connections": len(self._conn_tasks),
            "upstreams": len(s.upstreams) if s else 0,
            "pipes": len(s.pipes) if s else 0,
            "max_connections": self.max_connections,
        }
        if s:
            out.update(s.counters)
        return out

    async def start(self) -> None:
        cfg = self.config
        policy = build_policy(cfg.policy_file, cfg.allow)
        audit = AuditLog(cfg.audit_file, self._audit_stream)  # AuditError: a clear message, not "cannot listen"
        self.services = Services(cfg, policy, audit, make_client_ssl_context(cfg.upstream_ca_file), resolver=self._resolver)
        self.rpc = RpcService(self.services)
        self._stopped = asyncio.Event()
        self._slots = asyncio.Semaphore(self.max_connections)
        await self.rpc.start()
        try:
            if cfg.tcp:
                await self._listen_tcp()
            if cfg.unix:
                await self._listen_unix(cfg.unix)
            if not self._servers:
                raise ValueError("nothing to listen on: give a TCP port or a Unix socket path")
            if cfg.ready_file:
                self._write_ready_file(cfg.ready_file)
        except BaseException:
            await self._close_listeners()
            await self.rpc.close()
            audit.close()
            raise

    def listening_lines(self) -> List[str]:
        """The ``agenshield broker listening on ...`` lines the CLI prints (one per listener)."""
        lines = ["agenshield broker listening on " + proxy_url(h, p) for h, p in self._tcp_addresses]
        if self.config.unix:
            lines.append("agenshield broker listening on unix:%s" % self.config.unix)
        return lines

    async def serve_forever(self) -> None:
        assert self._stopped is not None
        await self._stopped.wait()

    async def stop(self) -> None:
        """Stop listening, close tunnels and idle connections, give in-flight requests a grace period."""
        if self._closing:
            if self._stopped is not None:
                await self._stopped.wait()
            return
        self._closing = True
        await self._close_listeners()
        services = self.services
        if services is not None:
            for cw, uw in list(services.pipes):
                abort(cw)
                abort(uw)
        busy = []
        for task, conn in list(self._conn_tasks.items()):
            if conn.busy:
                busy.append(task)
            else:
                task.cancel()
        if busy:
            _done, pending = await asyncio.wait(busy, timeout=self.config.shutdown_grace)
            for task in pending:
                task.cancel()
        if self._conn_tasks:
            await asyncio.wait(list(self._conn_tasks), timeout=2.0)
        if self.rpc is not None:
            await self.rpc.close()
        if services is not None:
            services.audit.close()
        if self.config.ready_file:
            with contextlib.suppress(OSError):
                os.unlink(self.config.ready_file)
        if self._stopped is not None:
            self._stopped.set()

    async def __aenter__(self) -> "Broker":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    # -- listeners ---------------------------------------------------------------------------

    async def _listen_tcp(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        seen: Set[Tuple[int, Any]] = set()
        port = cfg.port
        for family, socktype, proto, _c, addr in infos:
            if (family, addr[0]) in seen:
                continue
            seen.add((family, addr[0]))
            sock = socket.socket(family, socktype, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((addr[0], port) + tuple(addr[2:]))
                sock.listen(BACKLOG)
            except OSError:
                sock.close()
                raise
            bound = sock.getsockname()
            port = bound[1]
            self._listen_on(sock, "http")
            self._tcp_addresses.append((bound[0], bound[1]))

    async def _listen_unix(self, path: str) -> None:
        if os.path.exists(path) or os.path.islink(path):
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError("%s exists and is not a socket" % path)
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale socket left by a broker that died
            else:
                raise OSError("%s: another broker is listening there" % path)
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # no window where the socket is reachable with looser permissions
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, self.config.unix_mode)
        sock.listen(BACKLOG)
        self._listen_on(sock, "socket")

    def _write_ready_file(self, path: str) -> None:
        lines = [authority(h, p) for h, p in self._tcp_addresses[:1]]
        if self.config.unix:
            lines.append("unix:%s" % self.config.unix)
        tmp = "%s.%d.tmp" % (path, os.getpid())
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        os.replace(tmp, path)

    def _listen_on(self, sock: socket.socket, channel: str) -> None:
        sock.setblocking(False)
        self._servers.append(sock)
        self._accept_tasks.append(asyncio.ensure_future(self._accept_loop(sock, channel)))

    async def _accept_loop(self, sock: socket.socket, channel: str) -> None:
        """Accept while fewer than ``max_connections`` are served; at the cap, stop accepting, so
        new callers wait in the kernel's backlog (back-pressure) instead of each accept failing
        with ``EMFILE``. If descriptors run out anyway (upstreams, other users of the process),
        say so once on stderr and retry a moment later: no traceback per failed accept."""
        loop = asyncio.get_running_loop()
        slots = self._slots
        assert slots is not None
        while not self._closing:
            await slots.acquire()
            try:
                client, _addr = await loop.sock_accept(sock)
            except asyncio.CancelledError:
                slots.release()
                raise
            except OSError as exc:
                slots.release()
                if self._closing or sock.fileno() < 0:
                    return
                if exc.errno in _OUT_OF_RESOURCES:
                    self._count("accept_out_of_descriptors")
                    if not self._said_fd:
                        self._said_fd = True
                        _say("cannot accept a connection: %s; waiting (lower --max-connections or raise the"
                             " file-descriptor limit, now %s)" % (exc.strerror or exc, _fd_limit()))
                    await asyncio.sleep(0.1)
                continue
            asyncio.ensure_future(self._serve_socket(client, channel))

    async def _serve_socket(self, client: socket.socket, channel: str) -> None:
        slots = self._slots
        assert slots is not None
        loop = asyncio.get_running_loop()
        try:
            reader = asyncio.StreamReader(limit=READ_SIZE, loop=loop)
            protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, client)
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        except OSError:
            client.close()
            slots.release()
            return
        try:
            await self._on_client(reader, writer, channel)
        except Exception as exc:  # a bug: counted and said once per kind, never a traceback per connection
            self._count("internal_errors")
            kind = type(exc).__name__
            if kind not in self._said_errors:
                self._said_errors.add(kind)
                _say("internal error serving a connection: %s: %s" % (kind, exc))
            abort(writer)
        finally:
            slots.release()

    def warnings(self) -> List[str]:
        """What the operator should know about how the broker listens (the CLI prints these)."""
        return listen_warnings([host for host, _port in self._tcp_addresses])

    async def _close_listeners(self) -> None:
        for task in self._accept_tasks:
            task.cancel()
        if self._accept_tasks:
            await asyncio.gather(*self._accept_tasks, return_exceptions=True)
        self._accept_tasks = []
        for sock in self._servers:
            sock.close()
        self._servers = []
        if self.config.unix and self.services is not None:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(self.config.unix).st_mode):
                    os.unlink(self.config.unix)

    # -- connections -------------------------------------------------------------------------

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, channel: str) -> None:
        services = self.services
        assert services is not None
        task = asyncio.current_task()
        sock = writer.get_extra_info("socket")
        peername = writer.get_extra_info("peername")
        family = sock.family if sock is not None else -1
        peer = "%s:%s" % (peername[0], peername[1]) if isinstance(peername, tuple) and len(peername) >= 2 else "unix"
        conn = Conn(Stream(reader, writer), channel, peer)
        if self._closing:
            writer.close()
            return
        if task is not None:
            self._conn_tasks[task] = conn
        try:
            if not caller_allowed(family, peername):
                services.count("callers_refused")
                writer.write(render_response(403, b"Forbidden: only local callers are served\n",
                                             [("Content-Type", "text/plain")], close=True))
                await writer.drain()
                return
            await self._serve(conn)
        except (ConnectionError, ProtocolError, asyncio.IncompleteReadError, OSError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            conn.release(services)
            if self._closing:
                abort(writer)
            else:
                writer.close()
            if task is not None:
                self._conn_tasks.pop(task, None)

    async def _serve(self, conn: Conn) -> None:
        cfg = self.config
        stream = conn.stream
        if conn.channel == "socket" and (cfg.rpc_only or await stream.first_byte(cfg.head_timeout) in JSON_START):
            return await self._serve_lines(conn)  # 0.7.2's socket speaks nothing else
        keepalive = legacy.keepalive_timeout(cfg.keepalive_timeout) if cfg.rpc_only else cfg.keepalive_timeout
        first = True
        while not self._closing:
            conn.busy = False
            try:
                if not await conn.wait_request(cfg.head_timeout if first else keepalive):
                    return
                raw = await stream.read_head(cfg.max_head_size, cfg.head_timeout, cfg.head_timeout)
                if raw is None:
                    return
                conn.busy = True
                head = parse_request_head(raw)
                keep = await self._dispatch(conn, head)
            except HttpError as exc:
                self._count("bad_requests_%d" % exc.status)
                stream.writer.write(legacy.node_error(exc.status) if cfg.rpc_only else render_response(
                    exc.status, (exc.message + "\n").encode(), [("Content-Type", "text/plain")], close=True))
                await stream.writer.drain()
                return
            if not keep:
                return
            first = False

    async def _serve_lines(self, conn: Conn) -> None:
        """The Unix socket's other framing, the daemon's: one JSON-RPC call per line, one line back."""
        assert self.rpc is not None
        cfg = self.config
        stream = conn.stream
        while not self._closing:
            conn.busy = False
            try:
                line = await stream.read_line(cfg.max_body_size, cfg.keepalive_timeout, cfg.body_timeout)
            except HttpError as exc:
                self._count("bad_requests_%d" % exc.status)
                return
            if line is None:
                return
            if not line.strip():
                continue
            conn.busy = True
            if cfg.rpc_only:
                stream.writer.write(legacy.dumps(await legacy.handle_rpc(self.rpc, conn, line)) + b"\n")
            else:
                stream.writer.write(json.dumps(await self.rpc.handle_rpc(conn, line)).encode("ascii") + b"\n")
            await stream.writer.drain()

    def _count(self, name: str) -> None:
        if self.services is not None:
            self.services.count(name)

    async def _dispatch(self, conn: Conn, head: RequestHead) -> bool:
        services = self.services
        assert services is not None and self.rpc is not None
        if services.config.rpc_only:
            return await legacy.serve(services, self.rpc, conn, head)
        check_host(head)  # every route, CONNECT included (every client we route sends Host there)
        if head.method == "CONNECT":
            return await handle_connect(services, conn, head)
        target = head.target
        low = target[:8].lower()
        if low.startswith("http://") or low.startswith("https://") or low.startswith("ws://") or low.startswith("wss://"):
            return await handle_forward(services, conn, head)
        if not target.startswith("/") and target != "*":
            raise HttpError(400, "request target must be a path or an absolute URL")
        return await self._local(conn, head)

    async def _local(self, conn: Conn, head: RequestHead) -> bool:
        """The broker's own routes: ``/health``, ``/rpc``, ``/api/proxy`` (extension mode)."""
        assert self.rpc is not None
        cfg = self.config
        w = conn.stream.writer
        path = head.target.split("?", 1)[0]
        keep = head.version == (1, 1) and (head.get("connection") or "").lower() != "close"
        framing = request_framing(head)
        is_api = path == "/api/proxy" and not cfg.compat
        if head.method == "POST" and (path == "/rpc" or is_api):
            if framing[0] == "length" and framing[1] > cfg.max_body_size:
                raise HttpError(413, "request body larger than %d bytes" % cfg.max_body_size)
            if (head.get("expect") or "").lower() == "100-continue":
                w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = await read_body(conn.stream, framing, cfg.max_body_size, cfg.body_timeout)
            if path == "/rpc":
                envelope = await self.rpc.handle_rpc(conn, body)
                payload = json.dumps(envelope).encode("ascii")
                w.write(render_response(200, payload, JSON, close=not keep, chunked=True))
            else:
                status, obj = await self.rpc.handle_api_proxy(conn, body)
                w.write(render_response(status, json.dumps(obj).encode("ascii"), JSON, close=not keep))
            await w.drain()
            return keep
        # Any other route: drain a small body so the connection stays in step, or give up on it.
        if framing[0] != "none":
            await read_body(conn.stream, framing, cfg.max_body_size, cfg.body_timeout)
        if path == "/health" and head.method in ("GET", "HEAD"):
            payload = json.dumps(self.rpc.health()).encode("ascii")
            w.write(render_response(200, payload, JSON, close=not keep, head_only=head.method == "HEAD"))
        elif path in ("/health", "/rpc") or is_api:
            w.write(render_response(405, b'{"error":"Method not allowed"}', JSON, close=not keep))
        else:
            w.write(render_response(404, b'{"error":"Not found"}', JSON, close=not keep))
        await w.drain()
        return keep
