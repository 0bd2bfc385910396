"""websockets (15 and later): ``ws://`` and ``wss://`` through the broker's ``CONNECT`` tunnel.

Patches: in ``websockets.asyncio.client``, ``connect`` (subclassed) and ``connect_http_proxy``; in
``websockets.sync.client``, ``connect``, ``reconnect`` (17+, subclassed) and ``connect_http_proxy``;
in ``websockets.legacy.client`` (``websockets.connect`` before 14, deprecated since), ``Connect.__init__``.

Why the library's own proxy support: websockets 15+ connects through an HTTP proxy itself
(``proxy=True``, the default, reads the proxy environment): it sends ``CONNECT host:port`` and then
does its own TLS with the real host name inside the tunnel, so ``wss://`` is verified end to end
with the caller's context. The hook only makes the broker that proxy, whatever the caller passed
(``proxy=None``, another proxy, an environment changed in-process; the ``proxy_*`` arguments meant
for that proxy are dropped), and leaves alone what the guard lets through directly (the broker,
``AGENSHIELD_ALLOW``: no proxy), Unix sockets and a ``sock=`` the caller connected (the guard
judged that connect). The trio client (17+) has no hook: it honours the proxy environment, which
the boot points at the broker.

Errors are the library's own types, with ``AgenShield``, the broker and the destination in the
message:

- a refusal: :class:`BrokerRefusal`, an ``InvalidProxyStatus`` (so a ``ProxyError``, an
  ``InvalidHandshake``: reconnect loops do not retry it), with the broker's reason, asked with one
  ``policy_check`` (websockets does not read the body of a proxy's answer);
- a broker that does not tunnel: under rpc (``AGENSHIELD_TRANSPORT=rpc``, or ``auto`` against the
  daemon 0.7.2) :class:`TunnelOnlyError`, a ``ProxyError`` (and an
  :class:`agenshield_shim.TunnelOnlyError`), before anything is sent; under an
  explicit ``tunnel``, the same ``not_a_proxy_message`` the other hooks give;
- the broker down: the ``OSError`` websockets raises, of the same type and errno, with a message
  that says so (reconnect loops retry it, as they retry any network error).

The legacy client has no proxy support at all: :func:`install_legacy` opens the tunnel itself.
websockets 13 and 14's new clients (``websockets.asyncio``, ``websockets.sync``) have none either and
are not patched: the guard refuses their direct connections.
"""

import functools
from types import ModuleType

from .. import authority, errors

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Dict, Optional, Tuple

    from .._config import Config

TARGET = "websockets.asyncio.client"
TARGETS = ("websockets.asyncio.client", "websockets.sync.client")
#: The releases this hook is for, as data (``selftest`` reads it, a unit test checks the README says
#: it): (distribution, oldest, newest tested or None for "and later", why a release before the
#: oldest is not routed at all, or None when it is merely untested).
VERSIONS = (("websockets", "15", None, "proxy support came with websockets 15"),)

#: ``except agenshield_shim.hooks.websockets.TunnelOnlyError``: a class in every transport, the shared
#: :class:`agenshield_shim.TunnelOnlyError` until websockets is hooked, then its subclass that is
#: also a websockets ``ProxyError``.
TunnelOnlyError = errors.TunnelOnlyError  # type: type
#: Set at the first install: the ``InvalidProxyStatus`` subclass of the broker's refusals.
BrokerRefusal = None  # type: Optional[type]

_errors = None  # type: Optional[_Errors]


def install_asyncio(module: ModuleType) -> None:
    """Route ``websockets.asyncio.client`` (15+) through the broker (idempotent)."""
    config = _config_for(module)
    if config is None:
        return
    errors = _errors_for(config)
    module.connect = _routed_class(module.connect, config)  # type: ignore[attr-defined]
    original = module.connect_http_proxy  # type: ignore[attr-defined]

    @functools.wraps(original)
    async def connect_http_proxy(proxy: "Any", ws_uri: "Any", *args: "Any", **kwargs: "Any") -> "Any":
        if not _is_broker(proxy, config):
            return await original(proxy, ws_uri, *args, **kwargs)
        from .._transport import RPC, choose_async

        if await choose_async(config) == RPC:
            raise errors.tunnel_only_error(ws_uri)
        try:
            return await original(proxy, ws_uri, *args, **kwargs)
        except errors.exceptions.InvalidProxyStatus as exc:
            reason = None
            if exc.response.status_code == 403:
                from .._broker_client import ask_broker_reason

                reason = await ask_broker_reason(config.broker_host, config.broker_port, _destination(ws_uri))
            raise errors.refusal(exc, ws_uri, reason) from exc
        except errors.exceptions.InvalidProxyMessage as exc:
            import asyncio

            better = await asyncio.get_running_loop().run_in_executor(None, errors.not_a_proxy, exc, ws_uri)
            if better is None:
                raise
            raise better from exc
        except OSError as exc:
            better = errors.unreachable(exc)
            if better is exc:
                raise
            raise better from exc

    connect_http_proxy.__agenshield_original__ = original  # type: ignore[attr-defined]
    module.connect_http_proxy = connect_http_proxy  # type: ignore[attr-defined]


def install_sync(module: ModuleType) -> None:
    """Route ``websockets.sync.client`` (15+) through the broker (idempotent)."""
    config = _config_for(module)
    if config is None:
        return
    errors = _errors_for(config)
    for name in ("connect", "reconnect"):
        target = getattr(module, name, None)
        if isinstance(target, type):
            setattr(module, name, _routed_class(target, config))
        elif target is not None:
            setattr(module, name, _routed_function(target, config))
    original = module.connect_http_proxy  # type: ignore[attr-defined]

    @functools.wraps(original)
    def connect_http_proxy(proxy: "Any", ws_uri: "Any", *args: "Any", **kwargs: "Any") -> "Any":
        if not _is_broker(proxy, config):
            return original(proxy, ws_uri, *args, **kwargs)
        from .._transport import RPC, choose

        if choose(config) == RPC:
            raise errors.tunnel_only_error(ws_uri)
        try:
            return original(proxy, ws_uri, *args, **kwargs)
        except errors.exceptions.InvalidProxyStatus as exc:
            reason = None
            if exc.response.status_code == 403:
                from .._broker_client import ask_broker_reason_sync

                reason = ask_broker_reason_sync(config.broker_host, config.broker_port, _destination(ws_uri))
            raise errors.refusal(exc, ws_uri, reason) from exc
        except errors.exceptions.InvalidProxyMessage as exc:
            better = errors.not_a_proxy(exc, ws_uri)
            if better is None:
                raise
            raise better from exc
        except OSError as exc:
            better = errors.unreachable(exc)
            if better is exc:
                raise
            raise better from exc

    connect_http_proxy.__agenshield_original__ = original  # type: ignore[attr-defined]
    module.connect_http_proxy = connect_http_proxy  # type: ignore[attr-defined]


def install_legacy(module: ModuleType) -> None:
    """Route ``websockets.legacy.client`` (``websockets.connect`` before 14) through the broker (idempotent).

    The legacy client has no proxy support, so the hook opens the tunnel itself: the ``create_connection``
    it prepares (a ``functools.partial`` of ``loop.create_connection(factory, host, port, ...)``,
    which it also rebuilds for redirects) gets a function of the same signature that asks the broker
    for ``CONNECT host:port`` and hands the connected socket to ``loop.create_connection(sock=...)``,
    with the caller's TLS settings and the real host name.
    """
    connect = getattr(module, "Connect", None)
    if connect is None or getattr(connect.__init__, "__agenshield_original__", None) is not None:
        return
    from .._boot import active_config

    config = active_config()
    if config is None:
        return
    errors = _errors_for(config)
    original_init = connect.__init__

    @functools.wraps(original_init)
    def __init__(self: "Any", *args: "Any", **kwargs: "Any") -> None:  # noqa: N807
        original_init(self, *args, **kwargs)
        partial: "Any" = getattr(self, "_create_connection", None)
        func = getattr(partial, "func", None)
        if func is None or getattr(func, "__name__", "") != "create_connection":
            return  # a Unix socket: nothing to route
        routed = _legacy_create_connection(func, config, errors)
        self._create_connection = functools.partial(routed, *partial.args, **partial.keywords)

    __init__.__agenshield_original__ = original_init  # type: ignore[attr-defined]
    connect.__init__ = __init__


def _legacy_create_connection(create_connection: "Any", config: "Config", errors: "_Errors") -> "Any":
    async def routed(factory: "Any", host: "Any" = None, port: "Any" = None, **kwargs: "Any") -> "Any":
        from . import guard_lets_through

        if kwargs.get("sock") is not None or host is None or guard_lets_through(host, port):
            return await create_connection(factory, host, port, **kwargs)
        from .._transport import RPC, choose_async

        target = _Target(host, port, bool(kwargs.get("ssl")))
        if await choose_async(config) == RPC:
            raise errors.tunnel_only_error(target)
        sock = await _open_tunnel(config, errors, target)
        if kwargs.get("ssl"):
            kwargs.setdefault("server_hostname", host)
        for key in ("local_addr", "family", "proto", "flags", "happy_eyeballs_delay", "interleave", "all_errors"):
            kwargs.pop(key, None)
        try:
            return await create_connection(factory, sock=sock, **kwargs)
        except BaseException:
            sock.close()
            raise

    routed.__name__ = "create_connection"
    return routed


class _Target:
    """What the messages need of a destination (the shape of websockets' ``WebSocketURI``)."""

    def __init__(self, host: str, port: int, secure: bool) -> None:
        self.host = host
        self.port = port
        self.secure = secure
        self.resource_name = "/"


async def _open_tunnel(config: "Config", errors: "_Errors", target: "_Target") -> "Any":
    """A non-blocking socket through which the broker has connected to ``target`` (``CONNECT``)."""
    import asyncio
    import socket

    loop = asyncio.get_running_loop()
    destination = _destination(target)
    request = ("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (destination, destination)).encode("ascii")
    sock = None
    try:
        infos = await loop.getaddrinfo(config.broker_host, config.broker_port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        await loop.sock_connect(sock, address)
        await loop.sock_sendall(sock, request)
        answer = b""
        while b"\r\n\r\n" not in answer and len(answer) < 65536:
            chunk = await loop.sock_recv(sock, 1)  # byte by byte: nothing after the head is ours
            if not chunk:
                break
            answer += chunk
    except OSError as exc:
        if sock is not None:
            sock.close()
        better = errors.unreachable(exc)
        if better is exc:
            raise
        raise better from exc
    status_line = answer.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) >= 2 and parts[1] == "200":
        return sock
    sock.close()
    if not answer:
        from .._transport import CLOSED, not_a_proxy_message

        raise errors.tunnel_only(not_a_proxy_message(errors.broker, CLOSED, destination))
    status = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0
    headers = {}
    for line in answer.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    reason = None
    if status == 403:
        from .._broker_client import ask_broker_reason

        reason = await ask_broker_reason(config.broker_host, config.broker_port, destination)
    raise errors.legacy_refusal(status, parts[2] if len(parts) > 2 else "", headers.get("x-proxy-error", ""),
                                target, reason)


def _config_for(module: ModuleType) -> "Optional[Config]":
    """The shim's configuration, or None when there is nothing to patch (already done, websockets < 15)."""
    patched = getattr(module, "connect_http_proxy", None)
    if patched is None or getattr(patched, "__agenshield_original__", None) is not None:
        return None
    from .._boot import active_config

    return active_config()


def _route(args: "Tuple[Any, ...]", kwargs: "Dict[str, Any]", config: "Config") -> None:
    """Make the broker the proxy of this connection, unless the guard lets it through directly."""
    uri = args[0] if args else kwargs.get("uri")
    if not isinstance(uri, str) or kwargs.get("unix") or kwargs.get("sock") is not None:
        return
    from websockets.uri import parse_uri

    try:
        parsed = parse_uri(uri)
    except Exception:  # noqa: BLE001 - the library raises its own error for it, unrouted nothing
        return
    for key in [key for key in kwargs if key.startswith("proxy_")]:
        del kwargs[key]  # meant for the caller's proxy, which is not used
    from . import guard_lets_through

    if guard_lets_through(parsed.host, parsed.port):
        kwargs["proxy"] = None
    else:
        kwargs["proxy"] = authority.proxy_url(config.broker_host, config.broker_port)


def _routed_class(original: type, config: "Config") -> type:
    if getattr(original, "__agenshield_original__", None) is not None:
        return original

    def __init__(self: "Any", *args: "Any", **kwargs: "Any") -> None:  # noqa: N807
        _route(args, kwargs, config)
        original.__init__(self, *args, **kwargs)  # type: ignore[misc]

    routed = type(original.__name__, (original,), {
        "__init__": functools.wraps(original.__init__)(__init__),  # type: ignore[misc]
        "__module__": original.__module__,
        "__qualname__": original.__qualname__,
        "__doc__": original.__doc__,
        "__agenshield_original__": original,
    })
    return routed


def _routed_function(original: "Any", config: "Config") -> "Any":
    if getattr(original, "__agenshield_original__", None) is not None:
        return original

    @functools.wraps(original)
    def routed(*args: "Any", **kwargs: "Any") -> "Any":
        _route(args, kwargs, config)
        return original(*args, **kwargs)

    routed.__agenshield_original__ = original  # type: ignore[attr-defined]
    return routed


def _is_broker(proxy: "Any", config: "Config") -> bool:
    host = config.broker_host.strip("[]").lower()
    return getattr(proxy, "scheme", None) == "http" and proxy.host == host and proxy.port == config.broker_port


def _destination(ws_uri: "Any") -> str:
    return authority.authority(ws_uri.host, ws_uri.port)


def _errors_for(config: "Config") -> "_Errors":
    global _errors, TunnelOnlyError, BrokerRefusal
    if _errors is None:
        import websockets.exceptions

        _errors = _Errors(websockets.exceptions, config)
        TunnelOnlyError, BrokerRefusal = _errors.tunnel_only, _errors.refused
    return _errors


class _Errors:
    """Every failure of a routed websocket connection as the library's own exception type."""

    def __init__(self, exceptions: ModuleType, config: "Config") -> None:
        self.exceptions = exceptions
        self.config = config
        self.broker = config.broker
        # ProxyError and InvalidProxyStatus came with websockets 15; before, their common base
        self.proxy_error = getattr(exceptions, "ProxyError", exceptions.InvalidHandshake)  # type: ignore[attr-defined]
        self.tunnel_only = errors.library_class(
            (self.proxy_error,), __name__,
            "A websocket needs the broker's CONNECT tunnel, and this broker is used through rpc "
            "(AGENSHIELD_TRANSPORT=rpc, or auto against a broker that does not tunnel).")

        # InvalidProxyStatus(response) when there is one; before 15 the message is all there is
        status_error = getattr(exceptions, "InvalidProxyStatus", None)
        message_only = status_error is None
        if status_error is None:
            status_error = self.proxy_error

        def __init__(error: "Any", response: "Any", message: str) -> None:  # noqa: N807
            if message_only:
                status_error.__init__(error, message)
                error.response = response
            else:
                status_error.__init__(error, response)
            error.message = message
            error.args = (message,)

        self.refused = type("BrokerRefusal", (status_error,), {
            "__module__": __name__,
            "__doc__": "The broker refused the CONNECT (its policy, or the destination unreachable from it); "
                       "``response`` is its answer.",
            "__init__": __init__,
            "__str__": lambda self: self.message,
        })

    def tunnel_only_error(self, ws_uri: "Any") -> Exception:
        from .._wire import TUNNEL_ONLY_HINT

        return self.tunnel_only(  # type: ignore[no-any-return]
            "AgenShield: the rpc transport cannot carry a websocket (%s): it needs the broker's CONNECT tunnel, "
            "and the broker at %s is used through rpc; %s" % (_uri_text(ws_uri), self.broker, TUNNEL_ONLY_HINT))

    def refusal(self, exc: "Any", ws_uri: "Any", reason: "Optional[str]") -> Exception:
        response = exc.response
        status = response.status_code
        kind = response.headers.get("X-Proxy-Error", "")
        from .._transport import NOT_A_PROXY

        if status in NOT_A_PROXY and not kind:  # CONNECT itself is not served: the daemon 0.7.2
            from .._transport import forget, not_a_proxy_message

            forget(self.config)
            return self.tunnel_only(not_a_proxy_message(self.broker, status, _destination(ws_uri)))  # type: ignore[no-any-return]
        detail = "%d %s%s" % (status, response.reason_phrase, " (%s)" % kind if kind else "")
        if reason:
            detail += ": " + reason
        verb = "refused" if status == 403 else "could not open a tunnel to"
        message = "AgenShield: the broker at %s %s %s (%s)" % (self.broker, verb, _uri_text(ws_uri), detail)
        return self.refused(response, message)  # type: ignore[no-any-return]

    def legacy_refusal(self, status: int, phrase: str, kind: str, target: "Any", reason: "Optional[str]") -> Exception:
        """The legacy client's refusal: the same message; a websockets ``Response`` where the type wants one."""
        from .._transport import NOT_A_PROXY

        response = None
        try:
            from websockets.datastructures import Headers
            from websockets.http11 import Response

            response = Response(status, phrase, Headers([("X-Proxy-Error", kind)] if kind else []), b"")
        except (ImportError, TypeError):
            pass
        if status in NOT_A_PROXY and not kind:
            from .._transport import forget, not_a_proxy_message

            forget(self.config)
            return self.tunnel_only(not_a_proxy_message(self.broker, status, _destination(target)))  # type: ignore[no-any-return]
        detail = "%d %s%s" % (status, phrase, " (%s)" % kind if kind else "")
        if reason:
            detail += ": " + reason
        verb = "refused" if status == 403 else "could not open a tunnel to"
        message = "AgenShield: the broker at %s %s %s (%s)" % (self.broker, verb, _uri_text(target), detail)
        return self.refused(response, message)  # type: ignore[no-any-return]

    def not_a_proxy(self, exc: Exception, ws_uri: "Any") -> "Optional[Exception]":
        """The broker closed the connection on CONNECT: if it is not a proxy at all, say so."""
        from .._transport import CLOSED, RPC, forget, not_a_proxy_message, probe

        forget(self.config)
        choice = probe(self.config)
        if choice is None or choice.transport != RPC:
            return None
        return self.tunnel_only(not_a_proxy_message(self.broker, CLOSED, _destination(ws_uri)))  # type: ignore[no-any-return]

    def unreachable(self, exc: OSError) -> OSError:
        from .. import NetworkBlockedError

        if isinstance(exc, NetworkBlockedError):
            return exc
        try:
            return type(exc)(exc.errno, "AgenShield: the broker at %s cannot be reached (%s); is it running?"
                             % (self.broker, exc.strerror or exc))
        except Exception:  # noqa: BLE001 - a subclass with a constructor of its own: keep the original
            return exc


def _uri_text(ws_uri: "Any") -> str:
    scheme = "wss" if ws_uri.secure else "ws"
    return "%s://%s%s" % (scheme, _destination(ws_uri), ws_uri.resource_name)
