"""http.client: every ``HTTPConnection`` reaches its destination through a CONNECT tunnel opened by the broker.

Patches: ``HTTPConnection.connect`` and the ``connect`` of every subclass, present and future
(``HTTPConnection.__init_subclass__``), ``HTTPConnection.putrequest`` and
``HTTPConnection.getresponse``.

Why ``connect()`` of every class: urllib3 (1.26 and 2.x, so requests, pip's vendored copy and
botocore) subclasses ``HTTPConnection`` and overrides ``connect`` without calling the base one,
but every implementation shares three seams that it reaches through ``self``: it opens the socket
with ``self._create_connection`` (http.client) or ``self._new_conn()`` (urllib3), calls
``self._tunnel()`` when ``self._tunnel_host`` is set, and then wraps TLS with ``_tunnel_host`` as
the server name. For the duration of one ``connect()`` call the wrapper shadows those three on the
instance: the socket goes to the broker (TCP, or its Unix socket), ``_tunnel_host`` is the real
destination, and ``_tunnel`` is ours, which reads the broker's refusal (``X-Proxy-Error`` and body)
instead of http.client's bare "Tunnel connection failed". Then everything is put back, so the Host
header, urllib3's proxy bookkeeping and ``repr`` see the connection the caller built. The library
still does its own TLS (its context, its CA, ``assert_hostname``, pinning) against the real host
name, and a tunnel carries any number of requests (keep-alive).

A proxy the application chose is replaced, never used: a ``set_tunnel`` target is reached through
the broker instead of the proxy, and a connection that sends absolute-form requests (a forwarding
proxy: urllib3's ``ProxyManager`` for ``http://``, ``HTTP_PROXY`` with urllib.request) is pointed
at the broker itself, whose forward proxy checks every request URL (its refusal, a ``403`` with
``X-Proxy-Error: blocked-by-policy``, is raised as the same error as a refused tunnel). ``NO_PROXY`` changes nothing:
no connection is direct. What the guard lets through directly (the broker, ``AGENSHIELD_ALLOW``)
is left alone.

Errors are the library's own types: for urllib3 connections ``ProxyError`` (a refusal, the broker
down) or ``ConnectTimeoutError``; for plain http.client (and so urllib.request's ``URLError``) the
``OSError`` subclasses below. Every message starts with ``AgenShield`` and names the broker and the
destination.

Under the ``rpc`` transport the same ``connect()`` gives the connection a virtual socket instead
(:mod:`.http_client_rpc`): no socket is opened at all, each request becomes one ``http_request``
call to the broker.
"""

from __future__ import annotations  # annotations stay strings: typing is not imported at run time

import functools
import socket
import sys
from urllib.parse import urlsplit  # http.client has imported it already

from .. import NetworkBlockedError
from .._boot import active_config
from . import guard_lets_through

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from types import ModuleType
    from typing import Any, Callable, Dict, Iterator, Optional, Tuple

    from .._config import Config

    Destination = Tuple[str, int]

TARGET = "http.client"
#: The releases this hook is for, as data (``selftest`` reads it, a unit test checks the README says
#: it): (distribution, oldest, newest tested or None for "and later", why a release before the
#: oldest is not routed at all, or None when it is merely untested).
VERSIONS = (("urllib3", "1.26", "2.x", None),)

#: Instance-dict keys of our own (a connection's ``__dict__`` is the only per-connection state we keep).
_BUSY = "_agenshield_routing"  # set while a routed connect() runs: nested super().connect() passes through
_ABSOLUTE = "_agenshield_absolute"  # (host, port) of the pending absolute-form request, if any
_URL = "_agenshield_url"  # and its URL, as the caller wrote it
_ROUTED = "_agenshield_routed"  # ("tunnel" | "forward", destination) of the live socket, if routed
#: What a routed connect() shadows or changes on the instance, restored afterwards.
_SAVED = (
    "_create_connection",
    "_new_conn",
    "_tunnel",
    "_tunnel_host",
    "_tunnel_port",
    "_tunnel_headers",
    "_tunnel_scheme",
    "tls_in_tls_required",
    "auto_open",
)
_MISSING = object()
_REASON_LIMIT = 2048  # bytes of a refusal body quoted in the message

_http: Optional[ModuleType] = None  # the http.client module the hook was installed on


# -- errors -----------------------------------------------------------------------------------


class BrokerRefusedError(NetworkBlockedError):
    """The broker refused to open a tunnel: its policy denies the destination (or cannot resolve it).

    A :class:`NetworkBlockedError`, so code that catches the guard's refusals catches these too.
    ``status`` and ``kind`` are the broker's status code and ``X-Proxy-Error`` value, ``reason``
    the text it gave.
    """

    def __init__(self, message: str, destination: str, broker: str, status: int, kind: str, reason: str) -> None:
        super().__init__(message, destination, broker)
        self.status = status
        self.kind = kind
        self.reason = reason


class BrokerTunnelError(ConnectionError):
    """The broker accepted the tunnel but could not reach the destination (its ``502``), or broke off."""

    def __init__(self, message: str, destination: str, broker: str, status: int = 0, kind: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.destination = destination
        self.broker = broker
        self.status = status
        self.kind = kind
        self.reason = reason


class BrokerUnavailableError(ConnectionRefusedError):
    """The broker itself could not be reached; nothing was sent anywhere else."""

    def __init__(self, message: str, destination: str, broker: str) -> None:
        import errno

        super().__init__(message)
        self.errno = errno.ECONNREFUSED
        self.destination = destination
        self.broker = broker


# -- install ----------------------------------------------------------------------------------


def install(module: ModuleType) -> None:
    """Wrap ``connect`` on ``HTTPConnection`` and all its subclasses, and ``putrequest`` on the base."""
    global _http
    base = module.HTTPConnection
    if getattr(base.__dict__.get("putrequest"), "__agenshield_original__", None) is not None:
        return  # installed already (a second registry, or the same module object hooked twice)
    _http = module
    base.putrequest = _wrap_putrequest(base.__dict__["putrequest"])
    base.getresponse = _wrap_getresponse(base.__dict__["getresponse"])
    for cls in (base, *_subclasses(base)):
        _wrap_class(cls)
    _install_subclass_hook(base)


def _subclasses(cls: type) -> Iterator[type]:
    """Every subclass defined so far, depth first (http.client's own HTTPSConnection among them)."""
    sub: type
    for sub in type.__subclasses__(cls):
        yield sub
        yield from _subclasses(sub)


def _wrap_class(cls: type) -> None:
    """Give ``cls`` a routing ``connect`` unless the one it resolves to is already ours."""
    resolved = getattr(cls, "connect", None)
    if not callable(resolved) or getattr(resolved, "__agenshield_original__", None) is not None:
        return
    cls.connect = _wrap_connect(resolved)  # type: ignore[attr-defined]


def _install_subclass_hook(base: Any) -> None:
    """Wrap the ``connect`` of every class defined later, as it is created (urllib3 imports after us)."""
    own = base.__dict__.get("__init_subclass__")

    def __init_subclass__(cls: Any, **kwargs: Any) -> None:
        if own is not None:
            own.__get__(None, cls)(**kwargs)
        else:
            super(base, cls).__init_subclass__(**kwargs)
        _wrap_class(cls)

    __init_subclass__.__agenshield_original__ = own  # type: ignore[attr-defined]
    base.__init_subclass__ = classmethod(__init_subclass__)  # type: ignore[arg-type]


def _wrap_putrequest(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def putrequest(self: Any, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        _note_request_target(self, url)
        return original(self, method, url, *args, **kwargs)

    putrequest.__agenshield_original__ = original  # type: ignore[attr-defined]
    return putrequest


def _wrap_getresponse(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def getresponse(self: Any, *args: Any, **kwargs: Any) -> Any:
        response = original(self, *args, **kwargs)
        routed = self.__dict__.get(_ROUTED)
        if routed is not None and routed[0] == "forward" and response.status in _FORWARD_SUSPECT:
            _raise_forward_refusal(self, response)
        return response

    getresponse.__agenshield_original__ = original  # type: ignore[attr-defined]
    return getresponse


#: Answers to a forwarded request that may be the broker's rather than the upstream's.
_FORWARD_SUSPECT = (403, 404, 405, 501)


def _raise_forward_refusal(conn: Any, response: Any) -> None:
    """The broker's forward proxy refused the request's URL: the same error as a refused tunnel.

    Recognised whatever its framing: by ``X-Proxy-Error``, or (the daemon sends none on forwards)
    by asking the broker's ``policy_check`` about the URL; an upstream's own 403 is passed through.
    A 404-like answer from a broker that is not a proxy at all (the daemon 0.7.2) is that error.
    """
    config = active_config()
    if config is None:
        return
    target = conn.__dict__.get(_ABSOLUTE) or (conn.host, conn.port)
    route = _Route(config, "forward", target)
    kind = response.getheader("X-Proxy-Error") or ""
    if response.status != 403:
        if kind or not _not_a_proxy(config, conn):
            return
        conn.close()
        from .._transport import not_a_proxy_message

        raise _library_error(conn, route, BrokerTunnelError(
            not_a_proxy_message(route.broker, response.status, route.destination),
            route.destination, route.broker, response.status))
    reason = response.getheader("X-Proxy-Error-Reason")  # the reference broker's rule reason
    if kind != "blocked-by-policy":
        if kind or config.broker_socket:
            return  # an upstream's own 403, passed through
        from .._broker_client import ask_broker_reason_sync

        reason = ask_broker_reason_sync(config.broker_host, config.broker_port, _url_of(conn))
        if reason is None:
            return  # the policy allows the URL: the upstream's own 403
        kind = "blocked-by-policy"
    try:
        body = response.read(_REASON_LIMIT)
    except Exception:
        body = b""
    if reason:
        body = b"%s: %s" % (body.strip(), reason.encode("ascii", "replace"))
    conn.close()
    raise _library_error(conn, route, _refusal(route, response.status, response.reason, kind, body))


def _url_of(conn: Any) -> str:
    """The absolute URL of the request a forwarded response answers."""
    url = conn.__dict__.get(_URL)
    if url:
        return str(url)
    host, port = conn.__dict__.get(_ABSOLUTE) or (conn.host, conn.port)
    return "http://%s/" % _authority(host, port)


def _not_a_proxy(config: "Config", conn: Any) -> bool:
    """:func:`agenshield_shim._transport.not_a_proxy`, within the connection's timeout."""
    from .._transport import not_a_proxy

    return not_a_proxy(config, conn.timeout if isinstance(conn.timeout, (int, float)) else None)


def _wrap_connect(original: Callable[[Any], Any]) -> Callable[[Any], Any]:
    @functools.wraps(original)
    def connect(self: Any) -> Any:
        state = self.__dict__
        if state.get(_BUSY):  # a subclass's connect calling super().connect(): already routed
            return original(self)
        route = _plan(self)
        if route is None:
            state.pop(_ROUTED, None)
            return original(self)
        if route.mode == "rpc":  # no socket at all: see http_client_rpc
            from . import http_client_rpc

            state.pop(_ROUTED, None)
            return http_client_rpc.connect(self, route.config, "https" if _is_tls(self) else "http", route.target,
                                           _urllib3_exceptions(type(self)), BrokerUnavailableError)
        saved = {name: state.get(name, _MISSING) for name in _SAVED}
        state[_BUSY] = True
        try:
            _divert(self, route)
            result = original(self)
            state[_ROUTED] = (route.mode, route.target)
            return result
        finally:
            for name, value in saved.items():
                if value is _MISSING:
                    state.pop(name, None)
                else:
                    state[name] = value
            state.pop(_BUSY, None)

    connect.__agenshield_original__ = original  # type: ignore[attr-defined]
    return connect


# -- the plan ---------------------------------------------------------------------------------


class _Route:
    """One routed ``connect()``: the broker, the destination, and how the socket is used."""

    __slots__ = ("config", "mode", "target")

    def __init__(self, config: "Config", mode: str, target: Destination) -> None:
        self.config = config
        self.mode = mode  # "tunnel": CONNECT target; "forward": absolute-form requests to the broker; "rpc"
        self.target = target

    @property
    def broker(self) -> str:
        return _broker_name(self.config)

    @property
    def destination(self) -> str:
        return _authority(*self.target)


def _plan(conn: Any) -> Optional[_Route]:
    """Where this connect() should go; None to leave it as the caller built it."""
    config = active_config()
    if config is None:
        return None
    tunnel_host = getattr(conn, "_tunnel_host", None)  # set_tunnel / a tunnelling proxy: the broker replaces it
    host, port = conn.host, conn.port
    # The broker itself, or what the guard lets through, is left alone; but not the broker used as a
    # forwarding proxy (absolute-form requests: HTTP_PROXY names the broker in a guarded interpreter),
    # which is routed like any application proxy, so that rpc and the refusals are the same.
    forwarding = conn.__dict__.get(_ABSOLUTE) is not None
    if not tunnel_host and not forwarding and guard_lets_through(host, port):
        return None
    transport = config.transport
    if transport == "auto":
        from .._transport import choose

        transport = choose(config, conn.timeout if isinstance(conn.timeout, (int, float)) else None)
    target = (tunnel_host, conn._tunnel_port) if tunnel_host else (host, port)
    if transport == "rpc":  # absolute-form targets are read per request
        return _Route(config, "rpc", target)
    if transport != "tunnel":
        return None
    absolute = None if tunnel_host else conn.__dict__.get(_ABSOLUTE)
    if absolute is not None:  # requests in absolute form: the caller talks to a forwarding proxy
        if _is_tls(conn):
            raise _library_error(conn, _Route(config, "forward", absolute), BrokerTunnelError(
                "AgenShield: an application proxy reached over TLS (%s) cannot be replaced by the broker "
                "at %s; remove the proxy setting, the broker is the proxy"
                % (_authority(host, port), _broker_name(config)),
                _authority(*absolute), _broker_name(config)))
        return _Route(config, "forward", absolute)
    return _Route(config, "tunnel", target)


def _broker_name(config: "Config") -> str:
    return "unix:" + config.broker_socket if config.broker_socket else config.broker


def _is_tls(conn: Any) -> bool:
    return getattr(conn, "default_port", None) == 443


def _note_request_target(conn: Any, url: Any) -> None:
    """Remember an absolute-form request target; refuse one a live tunnel would carry elsewhere.

    A connection usually connects lazily, after ``putrequest``, so ``connect()`` knows whether it
    serves a forwarding proxy. One that connected first (over TLS, to an application's HTTPS proxy)
    has a tunnel to that proxy: sending it a request for another host would let the proxy choose
    where it goes, so that is refused.
    """
    state = conn.__dict__
    scheme = url[:8].lower() if isinstance(url, str) else ""
    if not (scheme.startswith("http://") or scheme.startswith("https://")):
        state.pop(_ABSOLUTE, None)
        state.pop(_URL, None)
        return
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        return  # the library reports a malformed URL itself
    state[_ABSOLUTE] = (host, port)
    state[_URL] = url
    routed = state.get(_ROUTED)
    if routed is None or getattr(conn, "sock", None) is None:
        return
    mode, target = routed
    if mode == "tunnel" and not _same(target, (host, port)):
        config = active_config()
        broker = _broker_name(config) if config is not None else "?"
        raise BrokerRefusedError(
            "AgenShield: this connection is a tunnel to %s through the broker at %s; it cannot carry a "
            "request for %s (an application proxy is not used: the broker is the proxy)"
            % (_authority(*target), broker, _authority(host, port)),
            _authority(host, port), broker, 0, "application-proxy", "application proxy not replaced",
        )


def _authority(host: str, port: Any) -> str:
    """:func:`agenshield_shim.authority.authority`, loaded with the first routed connection rather
    than with every import of http.client."""
    from ..authority import authority

    return authority(host, port)


def _same(a: Destination, b: Destination) -> bool:
    return a[0].lower().strip("[]") == b[0].lower().strip("[]") and int(a[1]) == int(b[1])


# -- diverting one connect() ------------------------------------------------------------------


def _divert(conn: Any, route: _Route) -> None:
    """Shadow the socket opener and ``_tunnel`` on the instance; point the tunnel at the destination."""
    state = conn.__dict__
    state["_create_connection"] = functools.partial(_open_for_http_client, route)
    if _urllib3_exceptions(type(conn)) is not None:
        state["_new_conn"] = functools.partial(_open_for_urllib3, conn, route)
    state["_tunnel"] = functools.partial(_tunnel, conn, route)
    if route.mode == "tunnel":
        state["_tunnel_host"], state["_tunnel_port"] = route.target
        state["_tunnel_headers"] = {}  # an application proxy's headers (credentials) are not the broker's
        if "_tunnel_scheme" in state:
            state["_tunnel_scheme"] = "http"  # urllib3 2.x: the broker speaks plain HTTP, no TLS-in-TLS
    else:
        state["_tunnel_host"] = state["_tunnel_port"] = None
    if "tls_in_tls_required" in state or hasattr(type(conn), "tls_in_tls_required"):
        state["tls_in_tls_required"] = False  # urllib3 1.26's flag for an HTTPS proxy


def _open_for_http_client(route: _Route, address: Any = None, timeout: Any = None, source_address: Any = None, *args: Any, **kwargs: Any) -> socket.socket:
    """Stands in for ``socket.create_connection``: the broker, whatever address was asked for."""
    try:
        return _connect_broker(route.config, timeout, source_address, ())
    except socket.timeout as exc:
        raise type(exc)(_broker_timeout_message(route, timeout)) from exc
    except OSError as exc:
        raise _unavailable(route, exc) from exc


def _open_for_urllib3(conn: Any, route: _Route) -> socket.socket:
    """Stands in for urllib3's ``_new_conn``, raising its exception types."""
    exceptions = _urllib3_exceptions(type(conn))
    timeout = conn.timeout
    try:
        return _connect_broker(route.config, timeout, conn.source_address, conn.socket_options or ())
    except socket.timeout as exc:
        raise exceptions.ConnectTimeoutError(conn, _broker_timeout_message(route, timeout)) from exc  # type: ignore[union-attr]
    except OSError as exc:
        error = _unavailable(route, exc)
        raise exceptions.ProxyError(str(error), error) from exc  # type: ignore[union-attr]


def _unavailable(route: _Route, exc: OSError) -> BrokerUnavailableError:
    return BrokerUnavailableError(
        "AgenShield: cannot reach the broker at %s (%s); the request to %s was not sent "
        "(direct connections are blocked)" % (route.broker, exc, route.destination),
        route.destination, route.broker,
    )


def _broker_timeout_message(route: _Route, timeout: Any) -> str:
    return "AgenShield: the broker at %s did not accept a connection within %s s (request to %s)" % (
        route.broker, _seconds(timeout), route.destination)


def _seconds(timeout: Any) -> str:
    if isinstance(timeout, (int, float)):
        return "%g" % timeout
    default = socket.getdefaulttimeout()
    return "%g" % default if default is not None else "the default timeout"


class _UnixSocket(socket.socket):
    """A Unix stream socket that ignores TCP-level options (http.client sets ``TCP_NODELAY``)."""

    def setsockopt(self, level: int, *args: Any) -> None:
        if level == socket.IPPROTO_TCP:
            return
        super().setsockopt(level, *args)


def _connect_broker(config: "Config", timeout: Any, source_address: Any, options: Any) -> socket.socket:
    """A socket connected to the broker, with the caller's connect timeout and socket options."""
    if timeout is not None and not isinstance(timeout, (int, float)):
        timeout = socket.getdefaulttimeout()  # a library's "default" sentinel: what a new socket gets
    if config.broker_socket:
        from .._broker_client import connect_unix  # here: one module fewer for every import of http.client

        sock: socket.socket = connect_unix(config.broker_socket, timeout, _UnixSocket)
        return sock
    sock = socket.create_connection((config.broker_host, config.broker_port), timeout, source_address or None)
    for option in options:
        try:
            sock.setsockopt(*option)
        except OSError:
            pass
    return sock


# -- the tunnel -------------------------------------------------------------------------------


def _tunnel(conn: Any, route: _Route) -> None:
    """``CONNECT`` the destination on ``conn.sock``; on refusal, raise with the broker's reason."""
    assert _http is not None
    target = _authority(*route.target).encode("idna")
    request = b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target)
    status, reason, kind, body = 0, "", "", b""
    try:
        conn.sock.sendall(request)
        response = _http.HTTPResponse(conn.sock, method="CONNECT")
        try:
            response.begin()
            status, reason = response.status, response.reason
            if status == 200:
                return
            kind = response.getheader("X-Proxy-Error") or ""
            try:
                body = response.read(_REASON_LIMIT)
            except (OSError, _http.HTTPException):
                pass
        finally:
            response.close()
    except socket.timeout as exc:
        conn.close()
        raise _library_timeout(conn, route, exc) from exc
    except (OSError, _http.HTTPException) as exc:
        conn.close()
        if _not_a_proxy(route.config, conn):  # the daemon 0.7.2 drops a CONNECT without a word
            from .._transport import CLOSED, not_a_proxy_message

            error = BrokerTunnelError(not_a_proxy_message(route.broker, CLOSED, route.destination),
                                      route.destination, route.broker)
        else:
            error = BrokerTunnelError(
                "AgenShield: the broker at %s broke off while opening a tunnel to %s (%s)"
                % (route.broker, route.destination, exc or type(exc).__name__),
                route.destination, route.broker,
            )
        raise _library_error(conn, route, error) from exc
    conn.close()
    raise _library_error(conn, route, _refusal(route, status, reason, kind, body))


def _refusal(route: _Route, status: int, reason: str, kind: str, body: bytes) -> OSError:
    from .._transport import NOT_A_PROXY, forget, not_a_proxy_message  # the refusal path only

    if status in NOT_A_PROXY and not kind:  # CONNECT itself is not served: the daemon 0.7.2
        forget(route.config)
        return BrokerTunnelError(not_a_proxy_message(route.broker, status, route.destination),
                                 route.destination, route.broker, status)
    text = body.decode("utf-8", "replace").strip() or reason
    detail = "%d %s%s: %s" % (status, reason, " (%s)" % kind if kind else "", text)
    if status == 403 or kind == "blocked-by-policy":
        return BrokerRefusedError(
            "AgenShield: the broker at %s refused a connection to %s: %s" % (route.broker, route.destination, detail),
            route.destination, route.broker, status, kind, text,
        )
    return BrokerTunnelError(
        "AgenShield: the broker at %s could not connect to %s: %s" % (route.broker, route.destination, detail),
        route.destination, route.broker, status, kind, text,
    )


def _library_timeout(conn: Any, route: _Route, exc: BaseException) -> BaseException:
    message = "AgenShield: the broker at %s did not answer CONNECT %s within %s s" % (
        route.broker, route.destination, _seconds(conn.timeout))
    exceptions = _urllib3_exceptions(type(conn))
    if exceptions is not None:
        return exceptions.ConnectTimeoutError(conn, message)  # type: ignore[no-any-return]
    return type(exc)(message)


def _library_error(conn: Any, route: _Route, error: OSError) -> BaseException:
    """urllib3 connections raise urllib3's ``ProxyError`` (as it does for a proxy's refusal)."""
    exceptions = _urllib3_exceptions(type(conn))
    if exceptions is not None:
        return exceptions.ProxyError(str(error), error)  # type: ignore[no-any-return]
    return error


_exceptions_cache: Dict[type, Optional[ModuleType]] = {}


def _urllib3_exceptions(cls: type) -> Optional[ModuleType]:
    """The ``exceptions`` module of the urllib3 copy ``cls`` is built on (pip vendors its own), or None."""
    try:
        return _exceptions_cache[cls]
    except KeyError:
        pass
    found = None
    for klass in cls.__mro__:
        module = getattr(klass, "__module__", "") or ""
        if module == "urllib3.connection" or module.endswith(".urllib3.connection"):
            candidate = sys.modules.get(module[: -len("connection")] + "exceptions")
            if candidate is not None and hasattr(candidate, "ProxyError") and hasattr(candidate, "ConnectTimeoutError"):
                found = candidate
                break
    _exceptions_cache[cls] = found
    return found
