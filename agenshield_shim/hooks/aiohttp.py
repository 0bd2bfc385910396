"""aiohttp: every ``ClientSession`` request and websocket goes through the broker.

Patches: ``aiohttp.ClientSession._request`` (``tunnel``) or ``aiohttp.TCPConnector._create_connection``
(``rpc``), according to ``AGENSHIELD_TRANSPORT``.

**tunnel** (the default): the broker is aiohttp's HTTP proxy. Why ``_request``: every public way
aiohttp has to make a request funnels into it on every release from 3.9 to 3.14 (``request``,
``get``/``post``/..., ``ws_connect`` via ``request``, and the module-level ``aiohttp.request``), and
its ``proxy=`` argument is the one aiohttp itself honours before it looks at the session's default
proxy (3.10+) or at ``HTTP(S)_PROXY``/``NO_PROXY`` (``trust_env``). Setting it there keeps aiohttp's
own logic intact: the pool is keyed by the proxy, plain ``http://`` and ``ws://`` go in absolute form
(the broker forwards them, upgrades included), ``https://`` and ``wss://`` through a ``CONNECT``
tunnel with TLS verified end to end against the real host, redirects re-use the same proxy hop after
hop. A connector-level seam would have to fake the request's proxy after its pool key and request
line were decided.

**rpc**: each request becomes one JSON-RPC ``http_request`` call (:mod:`agenshield_shim._rpc`), and
the application still gets aiohttp's own ``ClientResponse``. Why ``_create_connection``: it is where
aiohttp turns a request into a connected ``ResponseHandler`` protocol (same signature on 3.9-3.14),
after the pool said no idle connection fits and before aiohttp writes a byte. The patch returns
aiohttp's own protocol (``connector._factory()``) connected to :class:`_RpcTransport`, a *virtual*
asyncio transport: what aiohttp writes is assembled into whole requests (:mod:`agenshield_shim._wire`),
each one is sent as one call, and the answer is fed back as the bytes of an ordinary HTTP/1.1
response into ``protocol.data_received``. So parsing, ``HEAD``/204/304, cookies, redirects (followed
by aiohttp, so the broker's policy sees every hop), ``raise_for_status``, decompression, streaming
reads, keep-alive and pooling are all aiohttp's. ``https://`` is written in origin form without TLS
(no TLS happens locally; the broker makes the TLS connection with its own trust store, so the
request's ``ssl=`` context is not used); a request aiohttp meant for an application proxy arrives in
absolute form and goes to the broker instead: no proxy is ever contacted. What one buffered call
cannot keep: bodies arrive whole (SSE and ``r.content`` deliver once the broker has the whole body),
so ``sock_read`` bounds the whole exchange; websockets and other upgrades, and certificate
fingerprint pinning, need the tunnel transport. With a broker that carries text bodies only (no
``body-base64``: ``--compat``, the daemon) requests ask for ``Accept-Encoding: identity`` (the
core's rule, for every library), since a compressed answer could not come back intact.

Sessions on a connector that is not a ``TCPConnector`` (``UnixConnector``, ``NamedPipeConnector``)
talk to a local socket, not to the network, and are left alone; under ``rpc`` so is a destination
the guard lets through directly (the broker itself, ``AGENSHIELD_ALLOW``) when no proxy is asked for.
Anything that bypasses the session or connector is not routed but still meets the guard, which
refuses it.

Errors keep aiohttp's own types, with messages that start with ``AgenShield`` and say what happened:

- the broker refuses the destination (tunnel: ``CONNECT`` answered 403/502, or a forwarded plain-HTTP
  request answered with the broker's refusal; rpc: error 1001, or 1004 when the broker could not
  reach the upstream): ``aiohttp.ClientHttpProxyError`` (403, 502) naming the destination and the
  broker's reason;
- the broker cannot be reached: ``aiohttp.ClientProxyConnectionError`` naming the broker. Under rpc a
  broker that is down (or answers its ``ping`` with something unusable) fails when the connection is
  made: one ``ping`` per process asks for its capabilities. An unusable answer to a request (such as
  the broker's 413 for a body over its limit) is ``ClientHttpProxyError`` 502;
- rpc only: a timeout (the broker's, or the call's local deadline) is aiohttp's
  ``SocketTimeoutError`` (``ServerTimeoutError`` before 3.10); aiohttp's own ``sock_read``/``total``
  timers keep running too, and closing the connection cancels the call. What only a tunnel can carry
  (an upgrade such as ``ws_connect``, a fingerprint-pinned ``ssl=``, a body a ``--compat`` broker
  would corrupt) is :class:`TunnelOnlyError`, an ``aiohttp.ClientConnectionError`` (not a
  ``ClientOSError``, which aiohttp would retry) naming the tunnel transport.
"""

import asyncio
import collections
import errno
import functools
import re
from types import ModuleType
from typing import Any, Deque, Optional, Tuple

from .._broker_client import FORWARD_REFUSAL_BODIES, ask_broker_reason, broker_url
from .._config import Config
from .._rpc import (
    BROKER_CONNECT_TIMEOUT_S,
    RpcBodyError,
    RpcDenied,
    RpcError,
    RpcNetworkError,
    RpcProtocolError,
    RpcTimeout,
    broker_name,
    capabilities_async,
    http_request_async,
)
from .._wire import MAX_HEAD, TUNNEL_ONLY_HINT, RequestAssembler, WireError, WireRequest, response_bytes
from .._wire import TunnelOnlyError as _WireTunnelOnly

TARGET = "aiohttp"

#: Plain-text bodies of the broker's forward-proxy refusals (the daemon's, without X-Proxy-Error).
_PLAIN_SCHEMES = ("http", "ws")

#: Set by :func:`install` under ``rpc``: the ``aiohttp.ClientConnectionError`` subclass raised for
#: what only the tunnel transport can carry (``except agenshield_shim.hooks.aiohttp.TunnelOnlyError``).
TunnelOnlyError: Optional[type] = None


def install(module: ModuleType) -> None:
    """Route ``module``'s requests through the broker, by the configured transport (a second call is a no-op)."""
    from .._boot import active_config

    config = active_config()
    if config is None:
        return
    if config.transport == "rpc":
        _install_rpc(module, config)
    elif config.transport == "tunnel":
        _install_tunnel(module, config)


def _install_tunnel(module: ModuleType, config: Config) -> None:
    session_class = module.ClientSession
    original = session_class._request
    if getattr(original, "__agenshield_original__", None) is not None:
        return
    router = _Router(module, config.broker_host, config.broker_port, config.broker)

    @functools.wraps(original)
    async def _request(self: Any, method: str, str_or_url: Any, **kwargs: Any) -> Any:
        if not router.routes(self):
            return await original(self, method, str_or_url, **kwargs)
        return await router.request(original, self, method, str_or_url, kwargs)

    _request.__agenshield_original__ = original  # type: ignore[attr-defined]
    session_class._request = _request


class _Router:
    """What the wrapper needs: aiohttp's types, the broker's URL, and the error translation."""

    def __init__(self, module: ModuleType, host: str, port: int, broker: str) -> None:
        self.errors = module
        self.host = host
        self.port = port
        self.proxy = broker_url(host, port)
        self.broker = broker
        self.tcp_connector = module.TCPConnector

    def routes(self, session: Any) -> bool:
        """Only sessions that open TCP connections go through the broker."""
        return isinstance(getattr(session, "_connector", None), self.tcp_connector)

    async def request(self, original: Any, session: Any, method: str, url: Any, kwargs: Any) -> Any:
        # The app's proxy (argument, session default, environment) is replaced; credentials and
        # headers meant for that proxy are not sent to the broker.
        kwargs["proxy"] = self.proxy
        kwargs.pop("proxy_auth", None)
        kwargs["proxy_headers"] = None
        errors = self.errors
        try:
            response = await original(session, method, url, **kwargs)
        except errors.ClientHttpProxyError as exc:
            raise await self.refused(exc.request_info, exc.history, exc.status, exc.message, exc.headers) from exc
        except errors.ClientProxyConnectionError as exc:
            raise self.unreachable(exc) from exc
        except errors.ClientResponseError as exc:
            # raise_for_status=True raised on a forwarded request the broker refused
            if not _is_forward_refusal(exc.request_info.url, exc.status, exc.headers):
                raise
            raise await self.refused(exc.request_info, exc.history, exc.status, exc.message, exc.headers) from exc
        return await self.check_forwarded(response)

    async def check_forwarded(self, response: Any) -> Any:
        """A plain-HTTP request is forwarded: the broker's refusal arrives as a response."""
        if not _is_forward_refusal(response.url, response.status, response.headers):
            return response
        body = await response.read()
        if "X-Proxy-Error" not in response.headers and body.strip() not in FORWARD_REFUSAL_BODIES:
            return response  # an upstream's own 403/502
        response.release()
        reason = body.decode("utf-8", "replace").strip() or (response.reason or "")
        raise await self.refused(response.request_info, response.history, response.status, reason, response.headers)

    async def refused(self, request_info: Any, history: Any, status: Optional[int], reason: Any, headers: Any) -> Exception:
        """aiohttp's own ``ClientHttpProxyError``, with a message people can act on."""
        kind = headers.get("X-Proxy-Error") if headers is not None else None
        url = request_info.url
        why = "%s %s" % (status, reason or "")
        if kind:
            why = "%s, %s" % (why.strip(), kind)
        if status == 403 and kind in (None, "blocked-by-policy"):
            plain = getattr(url, "scheme", None) in _PLAIN_SCHEMES
            target = str(url) if plain else _destination(url).split("://", 1)[-1]
            explained = await ask_broker_reason(self.host, self.port, target)
            if explained:
                why = "%s: %s" % (why.strip(), explained)
        message = "AgenShield: the broker at %s refused %s (%s)" % (self.broker, _destination(url), why.strip())
        return self.errors.ClientHttpProxyError(  # type: ignore[no-any-return]
            request_info, history, status=status, message=message, headers=headers,
        )

    def unreachable(self, exc: Any) -> Exception:
        """The broker is down: say so, instead of aiohttp's generic 'Cannot connect to host'."""
        os_error = exc.os_error
        text = "AgenShield: the broker at %s is not reachable (%s); every request is routed through it" % (
            self.broker, os_error.strerror or os_error,
        )
        return self.errors.ClientProxyConnectionError(  # type: ignore[no-any-return]
            exc._conn_key, OSError(os_error.errno, text),
        )


def _is_forward_refusal(url: Any, status: Optional[int], headers: Any) -> bool:
    """Could this answer to a plain-HTTP request be the broker's refusal (rather than the upstream's)?"""
    if url is None or url.scheme not in _PLAIN_SCHEMES or status not in (403, 502):
        return False
    if headers is None:
        return False
    if "X-Proxy-Error" in headers:
        return True
    length = headers.get("Content-Length")
    return length is not None and length.strip() in ("11", "32", "12", "33")


def _destination(url: Any) -> str:
    """``scheme://host:port`` of a URL (explicit port, so the message shows what was tunnelled)."""
    try:
        host = url.raw_host or url.host or ""
        shown = "[%s]" % host if ":" in host else host
        return "%s://%s:%s" % (url.scheme, shown, url.port)
    except AttributeError:
        return str(url)


# -- rpc: one JSON-RPC call per request, aiohttp's own protocol on a virtual transport ----------

#: How much of an answer reaches aiohttp's parser per ``data_received`` (aiohttp's own read size),
#: so its flow control (``pause_reading`` on a full buffer) works as on a socket.
_FEED_SIZE = 1 << 16
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_EXPECT_CONTINUE = re.compile(rb"\r\nexpect[ \t]*:[ \t]*100-continue[ \t]*\r\n", re.IGNORECASE)


def _install_rpc(module: ModuleType, config: Config) -> None:
    connector_class = module.TCPConnector
    original = connector_class._create_connection
    if getattr(original, "__agenshield_original__", None) is not None:
        return
    global TunnelOnlyError
    errors = _RpcErrors(module, config)
    TunnelOnlyError = errors.tunnel_only

    @functools.wraps(original)
    async def _create_connection(self: Any, req: Any, traces: Any, timeout: Any) -> Any:
        # An application proxy is never contacted: with one, the request goes to the broker too.
        if not req.proxy and _direct(req.url.raw_host, req.port):
            return await original(self, req, traces, timeout)
        return await _connect_virtual(self, req, timeout, config, errors)

    _create_connection.__agenshield_original__ = original  # type: ignore[attr-defined]
    connector_class._create_connection = _create_connection


def _direct(host: Any, port: Any) -> bool:
    """Would the guard let this destination through directly? (The broker always is.)"""
    from .._guard import REASON, active_policy, decide_destination

    policy = active_policy()
    if policy is None or policy[REASON] is not None:
        return False
    try:
        return bool(decide_destination(host, port, policy))
    except Exception:  # an address the guard cannot read is not direct
        return False


async def _connect_virtual(connector: Any, req: Any, timeout: Any, config: Config, errors: "_RpcErrors") -> Any:
    """aiohttp's own protocol, connected to a virtual transport that speaks to the broker.

    The broker's capabilities are asked here (once per process, then cached), so a broker that is
    down fails at connect time as a ``ClientProxyConnectionError`` that aiohttp does not retry.
    """
    if isinstance(getattr(req, "ssl", None), errors.module.Fingerprint):
        raise errors.tunnel_only(
            "AgenShield: the rpc transport cannot check the certificate fingerprint given for %s (the broker "
            "makes the TLS connection); %s" % (req.url, TUNNEL_ONLY_HINT))
    try:
        await capabilities_async(config, _ping_deadline(timeout), str(req.url))
    except RpcError as exc:
        raise errors.broker_unreachable(exc, req.connection_key) from exc
    protocol = connector._factory()
    transport = _RpcTransport(asyncio.get_running_loop(), protocol, _Endpoint(config, errors, req, timeout))
    protocol.connection_made(transport)
    return protocol


def _ping_deadline(timeout: Any) -> float:
    """The capabilities ``ping`` is a connect: bounded by ``sock_connect`` (aiohttp bounds ``connect`` itself)."""
    sock_connect = getattr(timeout, "sock_connect", None)
    if sock_connect and sock_connect > 0:
        return float(min(BROKER_CONNECT_TIMEOUT_S, sock_connect))
    return BROKER_CONNECT_TIMEOUT_S


class _Endpoint:
    """What every request on one virtual connection shares: its origin, pool key and timeouts."""

    __slots__ = ("config", "errors", "scheme", "authority", "connection_key", "total")

    def __init__(self, config: Config, errors: "_RpcErrors", req: Any, timeout: Any) -> None:
        self.config = config
        self.errors = errors
        # wss:// and ws:// are upgrades (refused per request); https:// is not encrypted locally
        self.scheme = "https" if req.is_ssl() else "http"
        host = req.url.raw_host or ""
        shown = "[%s]" % host if ":" in host else host
        port = req.port
        default = 443 if self.scheme == "https" else 80
        self.authority = shown if port in (None, default) else "%s:%d" % (shown, port)
        self.connection_key = req.connection_key
        self.total = getattr(timeout, "total", None)

    def timeout_for(self, protocol: Any) -> Optional[float]:
        """The call's timeout: the request's ``sock_read`` (set on the protocol per request), else the
        ``total`` of the request that opened the connection (aiohttp's own timer enforces each request's).

        The broker buffers the answer, so nothing reaches aiohttp's read timer before the whole
        answer is there: ``sock_read`` bounds the whole exchange, on both sides.
        """
        read = getattr(protocol, "_read_timeout", None)
        if read:
            return float(read)
        return float(self.total) if self.total else None


class _RpcErrors:
    """Every failure of an rpc request as aiohttp's own exception type, with the shim's message."""

    def __init__(self, module: ModuleType, config: Config) -> None:
        self.module = module
        self.broker = broker_name(config)
        self.tunnel_only: type = type("TunnelOnlyError", (module.ClientConnectionError,), {
            "__module__": __name__,
            "__doc__": "What only AGENSHIELD_TRANSPORT=tunnel can carry: an upgrade (websocket), a pinned "
                       "certificate, a body the broker would corrupt. Not a ClientOSError: retrying cannot help.",
        })
        # aiohttp 3.10+ tells a read timeout from a connect timeout; 3.9 has only the parent class
        self.read_timeout: type = getattr(module, "SocketTimeoutError", module.ServerTimeoutError)

    def translate(self, exc: Exception, request: Optional[WireRequest], url: Optional[str], key: Any) -> BaseException:
        module = self.module
        if isinstance(exc, (_WireTunnelOnly, RpcBodyError)):
            return self.tunnel_only(str(exc))  # type: ignore[no-any-return]
        if isinstance(exc, WireError):
            return module.ClientConnectionError(  # type: ignore[no-any-return]
                "AgenShield: the rpc transport cannot carry what aiohttp wrote: %s" % exc)
        if isinstance(exc, RpcDenied):
            return self.proxy_error(exc, 403, request, url)
        if isinstance(exc, RpcTimeout):
            return self.read_timeout(str(exc))  # type: ignore[no-any-return]
        if isinstance(exc, (RpcNetworkError, RpcProtocolError)):
            # the broker could not reach the upstream, or answered this request with something
            # unusable (its 413 for a body over its limit): the proxy failed, a bad gateway
            return self.proxy_error(exc, 502, request, url)
        if isinstance(exc, RpcError):  # RpcBrokerUnavailable: it went away since the connection was made
            return self.broker_unreachable(exc, key)
        return module.ClientConnectionError(  # type: ignore[no-any-return]
            "AgenShield: the rpc transport failed on %s: %r" % (url or "a request", exc))

    def proxy_error(self, exc: Exception, status: int, request: Optional[WireRequest], url: Optional[str]) -> BaseException:
        """``ClientHttpProxyError``, as the tunnel transport raises for a refused ``CONNECT``."""
        from multidict import CIMultiDict, CIMultiDictProxy
        from yarl import URL

        target = URL(url, encoded=True) if url else URL()
        headers = CIMultiDictProxy(CIMultiDict(request.headers if request is not None else ()))
        info = self.module.RequestInfo(target, request.method if request is not None else "", headers, target)
        return self.module.ClientHttpProxyError(  # type: ignore[no-any-return]
            info, (), status=status, message=str(exc), headers=None)

    def broker_unreachable(self, exc: Exception, key: Any) -> BaseException:
        """``ClientProxyConnectionError``, as the tunnel transport raises for a broker that is down."""
        code = errno.ETIMEDOUT if isinstance(exc, TimeoutError) else errno.ECONNREFUSED
        return self.module.ClientProxyConnectionError(key, OSError(code, str(exc)))  # type: ignore[no-any-return]


class _RpcTransport(asyncio.Transport):
    """A virtual connection: requests written to it go to the broker as ``http_request`` calls.

    aiohttp writes ordinary HTTP/1.1 request bytes; a :class:`RequestAssembler` knows from them alone
    when a request is complete (as a server would). Each complete request runs as one call in a task;
    its answer goes back to the protocol as an HTTP/1.1 response (``Content-Length`` framed, so the
    connection stays open for the next request), in ``_FEED_SIZE`` slices that honour
    ``pause_reading``. A failure is handed over with ``protocol.set_exception``: the connection is then
    closed by aiohttp itself (closing it here would replace the error by ``ServerDisconnectedError``).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: Any, endpoint: _Endpoint) -> None:
        config = endpoint.config
        peer: Any = config.broker_socket or (config.broker_host, config.broker_port)
        super().__init__({"peername": peer, "sockname": None, "socket": None, "sslcontext": None, "ssl_object": None})
        self._loop = loop
        self._protocol = protocol
        self._endpoint = endpoint
        self._assembler = RequestAssembler()
        self._requests: Deque[WireRequest] = collections.deque()
        self._inbox: Deque[memoryview] = collections.deque()
        self._head_probe = bytearray()  # the current request's bytes until its head is complete
        self._head_seen = False
        self._task: Optional["asyncio.Task[None]"] = None
        self._closing = False
        self._broken = False  # a failure was handed to the protocol: nothing more is read or answered
        self._eof_written = False
        self._reading_paused = False
        self._feed_scheduled = False
        self._write_limits = (0, 0)

    # -- writing: aiohttp's requests -----------------------------------------------------------

    def write(self, data: Any) -> None:
        if self._closing or self._broken or not data:
            return
        if self._eof_written:
            raise RuntimeError("Cannot call write() after write_eof()")
        chunk = bytes(data)
        try:
            self._assembler.feed(chunk)
        except WireError as exc:
            self._fail(exc, None, None)
            return
        request = self._assembler.pop()
        if request is None:
            self._answer_expect_continue(chunk)
            return
        while request is not None:
            self._requests.append(request)
            request = self._assembler.pop()
        self._head_probe.clear()
        self._head_seen = False
        if self._task is None:
            self._task = self._loop.create_task(self._serve())

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(bytes(d) for d in list_of_data))

    def _answer_expect_continue(self, chunk: bytes) -> None:
        """``expect100=True``: aiohttp sends the head alone and waits for ``100 Continue`` before the body.

        No one else will answer it (the broker gets the request whole), so the transport does, once
        the head of a request that asks for it is complete.
        """
        if self._head_seen:
            return
        self._head_probe += chunk[:MAX_HEAD + 4]  # the head is all it looks for
        end = self._head_probe.find(b"\r\n\r\n")
        if end < 0:
            return
        self._head_seen = True
        head = bytes(self._head_probe[:end + 2])
        self._head_probe.clear()
        if _EXPECT_CONTINUE.search(head):
            self._inbox.append(memoryview(_CONTINUE))
            self._schedule_feed()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Half-close: requests already complete are still answered; a partial one never will be."""
        self._eof_written = True
        if not self._assembler.idle:
            self._fail(WireError("the request was cut short (write_eof() in the middle of it)"), None, None)

    def get_write_buffer_size(self) -> int:
        return 0  # every write is taken at once (the call sends the request whole)

    def get_write_buffer_limits(self) -> Tuple[int, int]:
        return self._write_limits[1], self._write_limits[0]

    def set_write_buffer_limits(self, high: Optional[int] = None, low: Optional[int] = None) -> None:
        self._write_limits = (high or 0, low or 0)

    # -- the calls ---------------------------------------------------------------------------

    async def _serve(self) -> None:
        """One call at a time, in order (aiohttp does not pipeline, but nothing here relies on it)."""
        try:
            while self._requests and not self._closing:
                await self._exchange(self._requests.popleft())
        finally:
            self._task = None

    async def _exchange(self, request: WireRequest) -> None:
        endpoint = self._endpoint
        config = endpoint.config
        url: Optional[str] = None
        try:
            request.check_carriable()
            url = request.url(endpoint.scheme, endpoint.authority)
            headers = request.forwarded_headers()  # without base64, the core asks for no compression
            answer = await http_request_async(config, request.method, url, headers, request.body or None,
                                              endpoint.timeout_for(self._protocol))
            head, body = response_bytes(answer, request.method)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure must reach aiohttp, or its caller waits forever
            self._fail(exc, request, url)
            return
        if self._closing:
            return
        self._inbox.append(memoryview(head))
        if body:
            self._inbox.append(memoryview(body))
        self._feed()

    def _fail(self, exc: Exception, request: Optional[WireRequest], url: Optional[str]) -> None:
        if self._closing or self._broken:
            return
        self._broken = True
        error = self._endpoint.errors.translate(exc, request, url, self._endpoint.connection_key)
        error.__cause__ = exc
        self._requests.clear()
        self._inbox.clear()
        self._protocol.set_exception(error)

    # -- reading: the answers, to aiohttp's parser ---------------------------------------------

    def _feed(self) -> None:
        self._feed_scheduled = False
        while self._inbox and not self._reading_paused and not self._closing:
            view = self._inbox[0]
            if len(view) > _FEED_SIZE:
                self._inbox[0] = view[_FEED_SIZE:]
                view = view[:_FEED_SIZE]
            else:
                self._inbox.popleft()
            self._protocol.data_received(bytes(view))

    def _schedule_feed(self) -> None:
        if not self._feed_scheduled:
            self._feed_scheduled = True
            self._loop.call_soon(self._feed)

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            if self._inbox:
                self._schedule_feed()  # not from inside the reader that resumed us

    def is_reading(self) -> bool:
        return not self._reading_paused and not self._closing

    # -- closing ---------------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Cancel the call in flight (the broker sees its connection close) and tell the protocol."""
        if self._closing:
            return
        self._closing = True
        self._requests.clear()
        self._inbox.clear()
        if self._task is not None:
            self._task.cancel()
        self._loop.call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()  # nothing is buffered for writing: closing is already immediate

    def set_protocol(self, protocol: Any) -> None:
        self._protocol = protocol

    def get_protocol(self) -> Any:
        return self._protocol

    def __repr__(self) -> str:
        return "<AgenShield rpc transport %s://%s via %s%s>" % (
            self._endpoint.scheme, self._endpoint.authority, self._endpoint.errors.broker,
            " closing" if self._closing else "")
