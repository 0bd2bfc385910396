"""aiohttp: every ``ClientSession`` request and websocket goes through the broker.

Patches: ``aiohttp.ClientSession._request`` (``tunnel``) or ``aiohttp.TCPConnector._create_connection``
(``rpc``, in :mod:`.aiohttp_rpc`), according to ``AGENSHIELD_TRANSPORT``.

Under ``auto`` (the default) the first routed request asks which of the two the broker takes
(:mod:`agenshield_shim._transport`); the rpc patch is installed the first time it is rpc.

**tunnel**: the broker is aiohttp's HTTP proxy. Why ``_request``: every public way
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
  ``ClientOSError``, which aiohttp would retry) and an :class:`agenshield_shim.TunnelOnlyError`,
  naming the tunnel transport.
"""

import asyncio
import functools
from types import ModuleType
from typing import Any, Callable, Optional

from .. import authority, errors
from .._broker_client import FORWARD_REFUSAL_BODIES, ask_broker_reason
from .._config import Config

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from .._transport import Choice

TARGET = "aiohttp"
#: The releases this hook is for, as data (``selftest`` reads it, a unit test checks the README says
#: it): (distribution, oldest, newest tested or None for "and later", why a release before the
#: oldest is not routed at all, or None when it is merely untested).
VERSIONS = (("aiohttp", "3.9", "3.14", None),)

#: Plain-text bodies of the broker's forward-proxy refusals (the daemon's, without X-Proxy-Error).
_PLAIN_SCHEMES = ("http", "ws")
#: The only statuses :meth:`_Router.forward_error` can take for the broker's: the others skip it.
_BROKER_STATUSES = frozenset((403, 404, 405, 501, 502))
#: ``_transport.RPC``, which is not imported here: ``_transport`` loads the rpc core.
_RPC = "rpc"

#: What only the tunnel transport can carry (``except agenshield_shim.hooks.aiohttp.TunnelOnlyError``):
#: a class in every transport, the shared :class:`agenshield_shim.TunnelOnlyError` until aiohttp is
#: hooked, then its subclass that is also an ``aiohttp.ClientConnectionError``.
TunnelOnlyError: type = errors.TunnelOnlyError


def install(module: ModuleType) -> None:
    """Route ``module``'s requests through the broker, by the configured transport (a second call is a no-op)."""
    from .._boot import active_config

    config = active_config()
    if config is None:
        return
    _tunnel_only(module)
    if config.transport == "rpc":
        _install_rpc(module, config, None)
    elif config.transport in ("tunnel", "auto"):
        _install_tunnel(module, config)


def _tunnel_only(module: ModuleType) -> type:
    """aiohttp's ``TunnelOnlyError``, made once (not a ``ClientOSError``: aiohttp would retry it)."""
    global TunnelOnlyError
    if not issubclass(TunnelOnlyError, module.ClientConnectionError):
        TunnelOnlyError = errors.library_class(
            (module.ClientConnectionError,), __name__,
            "What only AGENSHIELD_TRANSPORT=tunnel can carry: an upgrade (websocket), a pinned certificate, a "
            "body the broker would corrupt. Not a ClientOSError: retrying cannot help.")
    return TunnelOnlyError


def _install_rpc(module: ModuleType, config: Config, active: Optional[Callable[[], bool]]) -> None:
    from . import aiohttp_rpc  # the rpc core loads only when the rpc transport is used

    aiohttp_rpc.install(module, config, _tunnel_only(module), active)


def _install_tunnel(module: ModuleType, config: Config) -> None:
    """The tunnel; under ``auto`` each request first asks which transport the broker takes (once)."""
    session_class = module.ClientSession
    original = session_class._request
    if getattr(original, "__agenshield_original__", None) is not None:
        return
    router = _Router(module, config)
    auto = _Auto(module, config) if config.transport == "auto" else None
    tcp_connector = module.TCPConnector
    proxy = router.proxy
    translated = router.translated

    # Every keep-alive request runs this, so it is one coroutine that asks nothing: one isinstance,
    # under auto one dict lookup (the broker is asked once, on the slow path), and three kwargs.
    @functools.wraps(original)
    async def _request(self: Any, method: str, str_or_url: Any, **kwargs: Any) -> Any:
        if not isinstance(getattr(self, "_connector", None), tcp_connector):
            return await original(self, method, str_or_url, **kwargs)  # a local socket, not the network
        if auto is not None:
            choice = auto.learned()
            if (await auto.choose(self, kwargs) if choice is None else choice.transport) == _RPC:
                auto.install()
                return await original(self, method, str_or_url, **kwargs)  # the rpc connector carries it
        # The app's proxy (argument, session default, environment) is replaced; credentials and
        # headers meant for that proxy are not sent to the broker.
        kwargs["proxy"] = proxy
        kwargs.pop("proxy_auth", None)
        kwargs["proxy_headers"] = None
        try:
            response = await original(self, method, str_or_url, **kwargs)
        except translated as exc:
            error = await router.error_for(exc, str_or_url)
            if error is None:
                raise
            raise error from exc
        if response.status in _BROKER_STATUSES:
            return await router.check_forwarded(response)
        return response  # any other status is never the broker's (forward_error says None for it)

    _request.__agenshield_original__ = original  # type: ignore[attr-defined]
    session_class._request = _request


def _nothing_learned() -> "Optional[Choice]":
    return None


class _Auto:
    """``AGENSHIELD_TRANSPORT=auto``: the rpc connector is installed the first time the broker
    turns out not to tunnel, and acts only while that is what was learned."""

    def __init__(self, module: ModuleType, config: Config) -> None:
        self.module = module
        self.config = config
        self.installed = False
        #: The transport learned for the broker, asking nothing (``_transport.learned``'s, from the
        #: first request on: ``_transport`` loads the rpc core, which aiohttp's import must not).
        self.learned: "Callable[[], Optional[Choice]]" = _nothing_learned

    async def choose(self, session: Any, kwargs: Any) -> str:
        """Nothing learned yet: ask the broker (in the loop's executor, once per broker and process)."""
        from .. import _transport

        self.learned = _transport.learned(self.config)
        return await _transport.choose_async(self.config, _connect_timeout(session, kwargs))

    def install(self) -> None:
        """The rpc connector, the first time the rpc transport is the one in use."""
        if not self.installed:
            self.installed = True
            _install_rpc(self.module, self.config, self.active)

    def active(self) -> bool:
        from .._transport import RPC, current

        return current(self.config) == RPC


def _connect_timeout(session: Any, kwargs: Any) -> Optional[float]:
    """The request's connect timeout (bounds the transport probe), if it has one."""
    timeout = kwargs.get("timeout") or getattr(session, "timeout", None)
    if isinstance(timeout, (int, float)):
        return float(timeout)
    for name in ("sock_connect", "connect", "total"):
        value = getattr(timeout, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return None


class _Router:
    """What the wrapper needs: aiohttp's types, the broker's URL, and the error translation."""

    def __init__(self, module: ModuleType, config: Config) -> None:
        self.errors = module
        self.config = config
        self.host = config.broker_host
        self.port = config.broker_port
        self.proxy = authority.proxy_url(self.host, self.port)
        self.broker = config.broker
        #: What aiohttp raises that :meth:`error_for` may say more precisely.
        self.translated = (module.ClientHttpProxyError, module.ClientProxyConnectionError,
                           module.ServerDisconnectedError, module.ClientResponseError)

    async def error_for(self, exc: Any, url: Any) -> Optional[Exception]:
        """What to raise instead of one of :attr:`translated` that aiohttp raised (None: that one)."""
        errors = self.errors
        if isinstance(exc, errors.ClientHttpProxyError):
            return await self.refused(exc.request_info, exc.history, exc.status, exc.message, exc.headers)
        if isinstance(exc, errors.ClientProxyConnectionError):
            return self.unreachable(exc)
        if isinstance(exc, errors.ServerDisconnectedError):
            # the daemon 0.7.2 drops a CONNECT without a word: say that it does not tunnel
            if str(url).split(":", 1)[0].lower() in _PLAIN_SCHEMES or not await self.not_a_proxy():
                return None
            from .._transport import CLOSED, not_a_proxy_message

            return errors.ClientConnectionError(  # type: ignore[no-any-return]
                not_a_proxy_message(self.broker, CLOSED, str(url)))
        # ClientResponseError: raise_for_status=True raised on a forwarded request the broker refused
        return await self.forward_error(exc.request_info, exc.history, exc.status, exc.headers, None)

    async def check_forwarded(self, response: Any) -> Any:
        """A plain-HTTP request is forwarded: the broker's refusal arrives as a response, in any framing."""
        error = await self.forward_error(response.request_info, response.history, response.status,
                                         response.headers, response)
        if error is None:
            return response
        response.release()
        raise error

    async def forward_error(self, request_info: Any, history: Any, status: Optional[int], headers: Any,
                            response: Any) -> Optional[Exception]:
        """The error a forwarded answer stands for, or None when it is the upstream's own.

        ``X-Proxy-Error`` says so when the broker sends it (the reference broker); the daemon sends
        none on forwards, so a 403 is the broker's when its ``policy_check`` denies the URL, a 502
        when its body is the broker's (``Proxy error``), and a 404-like answer when the broker is
        not a proxy at all (the daemon 0.7.2). ``response`` is None when aiohttp raised already.
        """
        url = request_info.url
        if url is None or url.scheme not in _PLAIN_SCHEMES or headers is None:
            return None
        kind = headers.get("X-Proxy-Error")
        if status in (404, 405, 501):
            if kind or not await self.not_a_proxy():
                return None
            from .._transport import not_a_proxy_message

            return self.errors.ClientHttpProxyError(  # type: ignore[no-any-return]
                request_info, history, status=status, headers=headers,
                message=not_a_proxy_message(self.broker, status, _destination(url)))
        if status == 403 and not kind:
            explained = await ask_broker_reason(self.host, self.port, str(url))
            if explained is None:
                return None  # the policy allows the URL: the upstream's own 403
            return await self.refused(request_info, history, status, "", headers, explained)
        if status not in (403, 502):
            return None
        body = b""
        if response is not None and (kind or _short(headers)):
            body = await response.read()
        if not kind and body.strip() not in FORWARD_REFUSAL_BODIES:
            return None  # an upstream's own 502
        reason = body.decode("utf-8", "replace").strip() or (getattr(response, "reason", None) or "")
        return await self.refused(request_info, history, status, reason, headers)

    async def not_a_proxy(self) -> bool:
        from .._transport import not_a_proxy

        return await asyncio.get_running_loop().run_in_executor(None, not_a_proxy, self.config)

    async def refused(self, request_info: Any, history: Any, status: Optional[int], reason: Any, headers: Any,
                      explained: Optional[str] = None) -> Exception:
        """aiohttp's own ``ClientHttpProxyError``, with a message people can act on."""
        kind = headers.get("X-Proxy-Error") if headers is not None else None
        url = request_info.url
        if status in (404, 405, 501) and not kind:  # CONNECT itself is not served
            from .._transport import forget, not_a_proxy_message

            forget(self.config)
            return self.errors.ClientHttpProxyError(  # type: ignore[no-any-return]
                request_info, history, status=status, headers=headers,
                message=not_a_proxy_message(self.broker, status or 0, _destination(url)))
        why = "%s %s" % (status, reason or "")
        if kind:
            why = "%s, %s" % (why.strip(), kind)
        if status == 403 and kind in (None, "blocked-by-policy"):
            if explained is None:
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


def _short(headers: Any) -> bool:
    """Could this answer's body be one of the broker's short refusal texts (any framing)?"""
    length = headers.get("Content-Length")
    return length is None or (length.strip().isdigit() and int(length) <= 64)


def _destination(url: Any) -> str:
    """``scheme://host:port`` of a URL (explicit port, so the message shows what was tunnelled)."""
    try:
        return authority.destination(url.scheme, url.raw_host or url.host or "", url.port)
    except AttributeError:
        return str(url)
