"""http.client under the rpc transport: a virtual socket that turns each request into one ``http_request`` call.

Why a socket: http.client, and everything built on it (urllib.request, urllib3 1.26 and 2.x, so
requests, botocore and pip), keep doing exactly what they do on a real connection. Under
``AGENSHIELD_TRANSPORT=rpc`` the routing ``connect()`` of :mod:`.http_client` hands them a
:class:`VirtualSocket` instead of a socket: the bytes the library writes are assembled into one
request (:mod:`agenshield_shim._wire`), sent to the broker as one JSON-RPC call, and the answer is
written back as an ordinary HTTP/1.1 response for the library's own parser. So responses, headers,
cookies, redirects (followed by the library, each hop checked by the broker's policy), decoding,
``raise_for_status`` and streaming APIs are the library's own; bodies are buffered.

When the call happens is chosen for the caller's exceptions and timeouts:

- plain http.client (urllib.request): as soon as the request is complete, inside ``request()``,
  which is where urllib.request turns an ``OSError`` into ``URLError``;
- urllib3: when the response is read, after urllib3 has set the *read* timeout, raising urllib3's
  ``ProxyError`` (a refusal, the broker down or misbehaving) and ``ReadTimeoutError``, as it raises
  them for a proxy, so requests maps them to its ``ProxyError`` and ``ReadTimeout``.

``connect()`` asks the broker for its capabilities (cached after the first answer) within the
caller's connect timeout, so a broker that is down or silent fails there, fast, as in the tunnel
transport. A TLS connection is never wrapped locally: the broker makes the upstream TLS connection
and verifies it against its own trust store, so the application's CA settings do not apply (see
the README); urllib3's certificate pinning (``assert_fingerprint``), which would be silently lost,
is refused instead.
"""

from __future__ import annotations

import io
import socket
import threading

from .. import _rpc, _wire
from ..authority import authority, origin_authority
from ..errors import TunnelOnlyError

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from types import ModuleType
    from typing import Any, Callable, Dict, List, Optional, Tuple

    from .._config import Config

    #: How the caller reports the broker down: (message, destination, broker) -> the error to raise.
    Unavailable = Callable[[str, str, str], OSError]

_pairs_lock = threading.Lock()
_pairs: "Dict[bool, Tuple[socket.socket, socket.socket]]" = {}


def _pair_fileno(readable: bool) -> int:
    """A descriptor for ``select``/``poll``: never readable, or always readable.

    A virtual socket has no descriptor of its own, so it reports one end of a socket pair (one
    pair of each kind per process, never closed). Never readable: urllib3 polls a pooled
    connection to see whether it was dropped, and a virtual one never is. Always readable (the
    other end wrote one byte that nobody reads): the virtual socket owes a ``100 Continue``, which
    botocore waits up to a second to see before it sends the body.
    """
    with _pairs_lock:
        pair = _pairs.get(readable)
        if pair is None:
            pair = _pairs[readable] = socket.socketpair()
            if readable:
                pair[1].send(b"!")
        return pair[0].fileno()


def _seconds(timeout: Any) -> Optional[float]:
    """A library's timeout as seconds or None (its "use the default" sentinels included)."""
    if timeout is None or isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        return None if timeout is None else float(timeout)
    return socket.getdefaulttimeout()


class _Plan:
    """Where one virtual connection's requests go and how its failures are reported."""

    __slots__ = ("config", "scheme", "authority", "destination", "broker", "exceptions", "eager", "unavailable")

    def __init__(self, config: Config, scheme: str, target: Tuple[str, int], exceptions: Optional[ModuleType],
                 unavailable: Unavailable) -> None:
        host, port = target
        self.config = config
        self.scheme = scheme
        self.authority = origin_authority(scheme, host, port)
        self.destination = authority(host, port)
        self.broker = _rpc.broker_name(config)
        self.exceptions = exceptions
        self.eager = exceptions is None
        self.unavailable = unavailable

    def error(self, exc: BaseException, url: str, connecting: bool = False, conn: Any = None) -> BaseException:
        """``exc`` (an :class:`~agenshield_shim._rpc.RpcError`) as the caller's library raises such a failure."""
        message = str(exc)
        ex = self.exceptions
        timeout = isinstance(exc, _rpc.RpcTimeout) or connecting and isinstance(exc, _rpc.RpcBrokerConnectTimeout)
        if ex is not None:
            if timeout and connecting:
                return ex.ConnectTimeoutError(conn, message)  # type: ignore[no-any-return]
            if timeout:
                return ex.ReadTimeoutError(None, url, message)  # type: ignore[no-any-return]
            if isinstance(exc, _rpc.RpcBrokerUnavailable):
                exc = self.unavailable(message, self.destination, self.broker)
            return ex.ProxyError(message, exc)  # type: ignore[no-any-return]
        if timeout and not isinstance(exc, socket.timeout):  # Python < 3.10: socket.timeout is not TimeoutError
            return socket.timeout(message)
        if isinstance(exc, _rpc.RpcBrokerUnavailable):
            return self.unavailable(message, self.destination, self.broker)
        return exc


def connect(conn: Any, config: Config, scheme: str, target: Tuple[str, int], exceptions: Optional[ModuleType],
            unavailable: Unavailable) -> None:
    """The rpc transport's ``connect()``: check the broker answers, give ``conn`` a virtual socket.

    From the caller (:mod:`.http_client`, which imports this module only under rpc): ``scheme``
    (``https`` for a TLS connection), the ``(host, port)`` it is for, the ``exceptions`` module of
    the urllib3 copy ``conn`` is built on (None for plain http.client) and the error class for a
    broker that is down, so this module imports nothing of its tunnel twin.
    """
    plan = _Plan(config, scheme, target, exceptions, unavailable)
    url = "%s://%s/" % (plan.scheme, plan.authority)
    if plan.scheme == "https" and getattr(conn, "assert_fingerprint", None):
        # urllib3's certificate pinning: the broker makes the TLS connection, so the pin cannot be
        # checked here, and dropping it silently would weaken what the application asked for
        raise plan.error(_rpc.RpcTunnelOnly(
            "AgenShield: certificate pinning (assert_fingerprint) for %s cannot be honoured by the rpc transport, "
            "where the broker at %s makes the TLS connection; %s" % (plan.destination, plan.broker, _wire.TUNNEL_ONLY_HINT),
            None, None, plan.broker, url), url)
    timeout = _seconds(conn.timeout)
    deadline = _rpc.BROKER_CONNECT_TIMEOUT_S if timeout is None else min(timeout, _rpc.BROKER_CONNECT_TIMEOUT_S)
    try:
        _rpc.capabilities(config, deadline, url)
    except _rpc.RpcError as exc:
        raise plan.error(exc, url, connecting=True, conn=conn) from exc
    conn.sock = VirtualSocket(plan, timeout)
    if plan.scheme == "https" and hasattr(conn, "is_verified"):
        conn.is_verified = True  # urllib3: the broker verified the upstream's certificate (no InsecureRequestWarning)


class VirtualSocket:
    """Stands in for ``conn.sock``: takes the request the library writes, hands back the broker's answer.

    Only what http.client and urllib3 use of a socket is here; anything else raises
    ``AttributeError``, which is better than a plausible lie.
    """

    def __init__(self, plan: _Plan, timeout: Optional[float]) -> None:
        self._plan = plan
        self._timeout = timeout
        self._assembler = _wire.RequestAssembler()
        self._waiting: List[_wire.WireRequest] = []  # complete, not yet sent (urllib3: sent on read)
        self._answers: List[Tuple[bytes, bytes]] = []  # sent, answer not yet read
        self._continue = False  # the request written so far asked for "100 Continue" before its body
        self._closed = False

    # -- what the library writes --------------------------------------------------------------

    def sendall(self, data: Any, flags: int = 0) -> None:
        if self._closed:
            raise OSError(9, "AgenShield: the virtual connection is closed")
        raw = memoryview(data).tobytes()  # TypeError for an iterable: http.client then sends its items
        try:
            self._assembler.feed(raw)
        except _wire.WireError as exc:
            self._assembler = _wire.RequestAssembler()
            raise self._plan.error(_rpc.RpcError(
                "AgenShield: the rpc transport cannot carry this request to %s: %s" % (self._plan.destination, exc),
                None, None, self._plan.broker), self._plan.destination) from exc
        if self._assembler.take_continue():
            self._continue = True
        while True:
            request = self._assembler.pop()
            if request is None:
                break
            self._continue = False  # the body came without waiting: no interim answer is due
            if self._plan.eager:
                self._answers.append(self._exchange(request))
            else:
                self._waiting.append(request)

    def send(self, data: Any, flags: int = 0) -> int:
        self.sendall(data)
        return len(memoryview(data))

    # -- what the library reads ---------------------------------------------------------------

    def makefile(self, mode: str = "rb", buffering: Any = None, **kwargs: Any) -> io.BufferedReader:
        """The next response, as http.client's ``HTTPResponse`` reads it (one call per response)."""
        if self._continue:
            self._continue = False
            return io.BufferedReader(io.BytesIO(_wire.CONTINUE_RESPONSE))
        if self._answers:
            head, body = self._answers.pop(0)
        elif self._waiting:
            head, body = self._exchange(self._waiting.pop(0))
        else:
            raise self._plan.error(_rpc.RpcError(
                "AgenShield: a response to %s was read before a complete request was written; the rpc transport "
                "sends whole requests only" % self._plan.destination, None, None, self._plan.broker),
                self._plan.destination)
        return io.BufferedReader(io.BytesIO(head + body))

    def _exchange(self, request: _wire.WireRequest) -> Tuple[bytes, bytes]:
        plan = self._plan
        url = plan.destination
        try:
            url = request.url(plan.scheme, plan.authority)
            request.check_carriable()
            response = _rpc.http_request(plan.config, request.method, url, request.forwarded_headers(),
                                         request.body or None, self._timeout)
            return _wire.response_bytes(response, request.method)
        except _wire.WireError as exc:
            kind = _rpc.RpcTunnelOnly if isinstance(exc, TunnelOnlyError) else _rpc.RpcError
            error: _rpc.RpcError = kind(str(exc) if str(exc).startswith("AgenShield") else
                                        "AgenShield: the rpc transport cannot carry this request to %s: %s"
                                        % (url, exc), None, None, plan.broker, url)
            raise plan.error(error, url) from exc
        except _rpc.RpcError as exc:
            raise plan.error(exc, url) from exc

    # -- the rest of a socket's surface that the libraries touch -------------------------------

    def settimeout(self, timeout: Any) -> None:
        self._timeout = _seconds(timeout)

    def gettimeout(self) -> Optional[float]:
        return self._timeout

    def setsockopt(self, *args: Any) -> None:
        pass

    def fileno(self) -> int:
        if self._closed:
            return -1
        return _pair_fileno(self._continue)

    def shutdown(self, how: int) -> None:
        pass

    def close(self) -> None:
        self._closed = True
        self._waiting.clear()
        self._answers.clear()

    def __repr__(self) -> str:
        return "<agenshield_shim VirtualSocket %s via the broker at %s (rpc)%s>" % (
            self._plan.destination, self._plan.broker, " closed" if self._closed else "")
