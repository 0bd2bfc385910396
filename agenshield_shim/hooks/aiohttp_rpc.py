"""aiohttp under the rpc transport: aiohttp's own protocol on a virtual transport, one call per request.

Imported by :mod:`.aiohttp` only when ``AGENSHIELD_TRANSPORT=rpc``, so the tunnel transport never
loads the rpc core. The why of the seam (``TCPConnector._create_connection``) and the error types
are in :mod:`.aiohttp`'s docstring.
"""

import asyncio
import collections
import errno
import functools
from types import ModuleType
from typing import Any, Callable, Deque, Optional, Tuple

from .._config import Config
from .._rpc import (
    BROKER_CONNECT_TIMEOUT_S,
    RpcDenied,
    RpcError,
    RpcNetworkError,
    RpcProtocolError,
    RpcTimeout,
    broker_name,
    capabilities_async,
    http_request_async,
)
from .._wire import (
    CONTINUE_RESPONSE,
    TUNNEL_ONLY_HINT,
    RequestAssembler,
    WireError,
    WireRequest,
    response_bytes,
)
from ..authority import origin_authority
from ..errors import TunnelOnlyError
from . import guard_lets_through

# -- rpc: one JSON-RPC call per request, aiohttp's own protocol on a virtual transport ----------

#: How much of an answer reaches aiohttp's parser per ``data_received`` (aiohttp's own read size),
#: so its flow control (``pause_reading`` on a full buffer) works as on a socket.
_FEED_SIZE = 1 << 16


def install(module: ModuleType, config: Config, tunnel_only: type,
            active: Optional[Callable[[], bool]] = None) -> None:
    """Patch ``TCPConnector._create_connection`` (a second call is a no-op).

    ``tunnel_only`` is the ``TunnelOnlyError`` class to raise (:mod:`.aiohttp` publishes it);
    ``active`` (``AGENSHIELD_TRANSPORT=auto``) says whether the rpc transport is the one in use.
    """
    connector_class = module.TCPConnector
    original = connector_class._create_connection
    if getattr(original, "__agenshield_original__", None) is not None:
        return
    errors = _RpcErrors(module, config, tunnel_only)

    @functools.wraps(original)
    async def _create_connection(self: Any, req: Any, traces: Any, timeout: Any) -> Any:
        if active is not None and not active():
            return await original(self, req, traces, timeout)
        # An application proxy is never contacted: with one, the request goes to the broker too.
        if not req.proxy and guard_lets_through(req.url.raw_host, req.port):
            return await original(self, req, traces, timeout)
        return await _connect_virtual(self, req, timeout, config, errors)

    _create_connection.__agenshield_original__ = original  # type: ignore[attr-defined]
    connector_class._create_connection = _create_connection


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
        port = req.port if req.port is not None else (443 if self.scheme == "https" else 80)
        self.authority = origin_authority(self.scheme, req.url.raw_host or "", port)
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

    def __init__(self, module: ModuleType, config: Config, tunnel_only: type) -> None:
        self.module = module
        self.broker = broker_name(config)
        self.tunnel_only = tunnel_only
        # aiohttp 3.10+ tells a read timeout from a connect timeout; 3.9 has only the parent class
        self.read_timeout: type = getattr(module, "SocketTimeoutError", module.ServerTimeoutError)

    def translate(self, exc: Exception, request: Optional[WireRequest], url: Optional[str], key: Any) -> BaseException:
        module = self.module
        if isinstance(exc, TunnelOnlyError):  # _wire's (an upgrade) and the core's (a body: RpcBodyError)
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
        if self._assembler.take_continue():
            # expect100=True: aiohttp sent the head alone and waits for "100 Continue" before the
            # body; the broker gets the request whole, so nobody else would answer
            self._inbox.append(memoryview(CONTINUE_RESPONSE))
            self._schedule_feed()
        request = self._assembler.pop()
        if request is None:
            return
        while request is not None:
            self._requests.append(request)
            request = self._assembler.pop()
        if self._task is None:
            self._task = self._loop.create_task(self._serve())

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(bytes(d) for d in list_of_data))

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
