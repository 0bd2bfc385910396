"""httpx and httpx2: every ``HTTPTransport`` and ``AsyncHTTPTransport`` goes through the broker.

Patches: ``httpx.HTTPTransport.__init__`` and ``.handle_request``,
``httpx.AsyncHTTPTransport.__init__`` and ``.handle_async_request`` (a request that goes the
``rpc`` way is answered by :mod:`.httpx_rpc`'s ``RpcRoute``).

Only through the module object ``install`` is given (its classes, exceptions, ``Proxy``,
``Response``, ``ByteStream``), never by importing ``httpx`` or ``httpcore`` by name: so httpx2, the
maintained fork with its own module names (``httpx2``/``httpcore2``, 2.0 on), is one more line in
``_boot.HOOKS`` naming this same hook, and so would any other renamed copy be.

Why that seam: it is the one place every networking httpx client goes through on 0.23 to 0.28.
``Client`` and ``AsyncClient`` build their default transport and every proxy mount (``proxies=``
on 0.23-0.27, ``proxy=``/``mounts=`` on 0.26+, ``HTTP(S)_PROXY``/``ALL_PROXY`` with
``trust_env``) as instances of these classes, and a ``NO_PROXY`` match only sends the request to
the default transport, which is routed too; so is a transport the application builds itself.

Left alone: transports that do no networking (``MockTransport``, ``WSGITransport``,
``ASGITransport``, any other ``BaseTransport`` of the application's), and a transport built with
``uds=`` (a Unix socket is local). Anything that bypasses httpx's transports still meets the
guard, which refuses it.

How a routed transport reaches the broker depends on ``AGENSHIELD_TRANSPORT`` (under ``auto``, the
default, on what the broker serves: :mod:`agenshield_shim._transport`, asked at the first request):

- ``tunnel`` (and ``auto`` until the broker turns out not to tunnel): the constructor is given ``proxy=httpx.Proxy(broker)``, so httpcore
  does what it does for any HTTP proxy: ``CONNECT`` tunnels for ``https://`` (TLS verified end to
  end against the real host, HTTP/2 negotiated inside the tunnel when ``http2=True``) and
  absolute-form forwarding for plain ``http://``, with its own pooling and keep-alive.
- ``rpc``: ``handle_request``/``handle_async_request`` never reach httpcore. Each request becomes
  one ``http_request`` call (:mod:`agenshield_shim._rpc`) and the answer an ``httpx.Response``
  built the way httpcore's adapter builds one (raw headers, a byte stream, ``http_version`` and
  ``reason_phrase`` extensions), so everything above the transport is httpx's own: redirects
  followed hop by hop (each one a policy check), cookies, content decoding, ``raise_for_status``,
  ``history``, ``.request``/``.url``. What a single buffered call cannot keep: bodies arrive whole
  (``stream()``/SSE deliver them once complete), the response is HTTP/1.1 even with
  ``http2=True``, TLS is the broker's (its trust store, not the transport's ``verify``/``cert``),
  and the transport's ``retries``/``limits``/``local_address`` do not apply. The request's read
  timeout is the call's ``timeout`` (the broker's idle timeout upstream) and, with the core's
  grace second, also bounds the whole call locally, so a silent broker cannot hang the caller; a
  whole call is one read here, so an answer slower than that in total fails even while the
  upstream keeps sending (httpx's own read timeout is per read). ``timeout=None`` leaves the
  broker's default and no local bound.

Errors keep httpx's own types, with messages that say what happened (always naming AgenShield):

- the broker's policy refuses the destination (tunnel: ``CONNECT`` or a forwarded request answered
  403; rpc: error 1001): not an exception but a 403 answer (:func:`refusal_response`, which says
  why: SDKs retry exceptions, not a 403), naming the destination and the broker's reason;
- the broker could not reach the upstream (tunnel: 502; rpc: 1004): ``httpx.ProxyError`` naming
  the destination and the broker's reason;
- the broker cannot be reached (rpc: also answers something unusable): ``httpx.ConnectError``
  naming the broker (``ConnectTimeout`` when connecting to it timed out);
- rpc only: a timeout (the broker's or the local deadline) is ``httpx.ReadTimeout``; a body the
  broker cannot carry intact (a ``--compat`` broker: no base64) and a connection upgrade
  (websocket) are a ``TunnelOnlyError`` naming the tunnel transport: both an
  ``httpx.UnsupportedProtocol`` and an ``httpx.ProxyError`` (what each was before), and an
  :class:`agenshield_shim.TunnelOnlyError`.
"""

import functools
from types import ModuleType
from typing import Any, Callable, Dict, Optional, Tuple

from .. import authority
from .._broker_client import FORWARD_REFUSAL_BODIES, ask_broker_reason, ask_broker_reason_sync

TARGET = "httpx"
#: The releases this hook is for, as data (``selftest`` reads it, a unit test checks the README says
#: it): (distribution, oldest, newest tested or None for "and later", why a release before the
#: oldest is not routed at all, or None when it is merely untested).
VERSIONS = (("httpx", "0.23", "0.29", None), ("httpx2", "2.0", "2.17", None))

_ROUTED = "_agenshield_routed"


def install(module: ModuleType) -> None:
    """Route ``module.HTTPTransport`` and ``AsyncHTTPTransport`` through the broker (idempotent)."""
    if getattr(module.HTTPTransport.__init__, "__agenshield_original__", None) is not None:
        return
    from .._boot import active_config

    config = active_config()
    if config is None or config.transport not in ("auto", "tunnel", "rpc"):
        return
    sync_cls, async_cls = module.HTTPTransport, module.AsyncHTTPTransport
    errors = _Errors(module, config)
    auto: Optional[_Auto]
    if config.transport == "rpc":
        # dropping the application's proxy also spares building a proxy pool that would never be
        # used (a SOCKS one needs socksio); every request of a routed transport is one call
        auto = _Rpc(module, config)
        proxy_for: Callable[[], Any] = lambda: None  # noqa: E731
    else:
        auto = _Auto(module, config) if config.transport == "auto" else None
        proxy_url = authority.proxy_url(config.broker_host, config.broker_port)
        proxy_for = lambda: module.Proxy(proxy_url)  # noqa: E731
    for cls in (sync_cls, async_cls):
        cls.__init__ = _routed_init(cls.__init__, proxy_for)
    sync_cls.handle_request = _sync_handler(sync_cls.handle_request, errors, auto)
    async_cls.handle_async_request = _async_handler(async_cls.handle_async_request, errors, auto)


class _Auto:
    """``AGENSHIELD_TRANSPORT=auto``: transports are built for the tunnel (the broker as their
    proxy); a request goes the rpc way instead once the broker turned out not to tunnel."""

    def __init__(self, module: ModuleType, config: Any) -> None:
        self.module = module
        self.config = config
        self._route: Any = None

    def route(self) -> Any:
        if self._route is None:
            from . import httpx_rpc  # the rpc core loads only when the rpc transport is used

            self._route = httpx_rpc.RpcRoute(self.module, self.config, refusal_response)
        return self._route

    def rpc(self, request: Any) -> bool:
        from .._transport import RPC, choose

        return choose(self.config, _connect_timeout(request)) == RPC

    async def rpc_async(self, request: Any) -> bool:
        from .._transport import RPC, choose, choose_async, chosen

        choice = chosen(self.config)
        if choice is not None:
            return choice.transport == RPC
        try:
            import asyncio

            asyncio.get_running_loop()
        except RuntimeError:  # trio: the probe in a worker thread
            import anyio.to_thread

            return await anyio.to_thread.run_sync(choose, self.config, _connect_timeout(request)) == RPC
        return await choose_async(self.config, _connect_timeout(request)) == RPC


class _Rpc(_Auto):
    """``AGENSHIELD_TRANSPORT=rpc``: every request of a routed transport goes the rpc way."""

    def __init__(self, module: ModuleType, config: Any) -> None:
        super().__init__(module, config)
        self.route()  # the rpc core loads at install, as the transport is known

    def rpc(self, request: Any) -> bool:
        return True

    async def rpc_async(self, request: Any) -> bool:
        return True


def _connect_timeout(request: Any) -> Optional[float]:
    value = (request.extensions.get("timeout") or {}).get("connect")
    return float(value) if isinstance(value, (int, float)) else None


# -- construction -----------------------------------------------------------------------------


def _parameter_positions(function: Callable[..., Any]) -> Dict[str, int]:
    """Positions of ``__init__``'s parameters in ``*args`` (after ``self``): the order moved in 0.28."""
    code = function.__code__
    names = code.co_varnames[1 : code.co_argcount]
    return {name: index for index, name in enumerate(names)}


def _argument(name: str, positions: Dict[str, int], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    index = positions.get(name)
    if index is not None and index < len(args):
        return args[index]
    return kwargs.get(name)


def _routed_init(original: Callable[..., None], proxy_for: Callable[[], Any]) -> Callable[..., None]:
    """``__init__`` with ``proxy`` replaced by ``proxy_for()`` and the instance marked as routed,
    unless the transport is a Unix socket's."""
    positions = _parameter_positions(original)
    proxy_index = positions["proxy"]

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if _argument("uds", positions, args, kwargs) is not None:
            original(self, *args, **kwargs)
            return
        proxy = proxy_for()
        if proxy_index < len(args):
            args = args[:proxy_index] + (proxy,) + args[proxy_index + 1 :]
        else:
            kwargs["proxy"] = proxy
        original(self, *args, **kwargs)
        setattr(self, _ROUTED, True)

    __init__.__agenshield_original__ = original  # type: ignore[attr-defined]
    return __init__


# -- errors -----------------------------------------------------------------------------------


class _Errors:
    """Turns httpx's proxy errors, as they come out of a routed transport, into clear ones."""

    def __init__(self, module: ModuleType, config: Any) -> None:
        self.module = module
        self.config = config
        self.host = config.broker_host
        self.port = config.broker_port
        self.broker = config.broker
        import ssl

        self.tls_errors = (ssl.SSLError, ssl.CertificateError)

    def refused(self, request: Any, why: str, explained: Optional[str] = None) -> Exception:
        status = why[:3]
        if status in ("404", "405", "501") and "," not in why:  # CONNECT itself is not served
            from .._transport import forget, not_a_proxy_message

            forget(self.config)
            message = not_a_proxy_message(self.broker, int(status), _destination(request.url))
            return self.module.ProxyError(message, request=request)  # type: ignore[no-any-return]
        if explained:
            why = "%s: %s" % (why, explained)
        message = "AgenShield: the broker at %s refused %s (%s)" % (self.broker, _destination(request.url), why)
        return self.module.ProxyError(message, request=request)  # type: ignore[no-any-return]

    def refusal(self, request: Any, why: str, explained: Optional[str] = None) -> Any:
        """A policy refusal (the broker's 403) as :func:`refusal_response`; anything else the
        broker could not do (502: the upstream unreachable; not a proxy at all) raised."""
        exc = self.refused(request, why, explained)
        if not why.startswith("403"):
            raise exc
        return refusal_response(self.module, str(exc))

    def policy_target(self, request: Any, why: str) -> Optional[str]:
        """What to ask ``policy_check`` about a refusal: only a 403 can be the policy's."""
        if not why.startswith("403"):
            return None
        if request.url.scheme == "http":
            return str(request.url)
        return _destination(request.url).split("://", 1)[1]

    def explain_sync(self, request: Any, why: str) -> Optional[str]:
        target = self.policy_target(request, why)
        return None if target is None else ask_broker_reason_sync(self.host, self.port, target)

    async def explain_async(self, request: Any, why: str) -> Optional[str]:
        target = self.policy_target(request, why)
        if target is None:
            return None
        try:  # the asyncio backend (the common one); under trio the sync call in a worker thread
            import asyncio

            asyncio.get_running_loop()
        except RuntimeError:
            return await _in_thread(ask_broker_reason_sync, self.host, self.port, target)  # type: ignore[no-any-return]
        return await ask_broker_reason(self.host, self.port, target)

    def translate(self, exc: Exception, request: Any) -> Optional[Exception]:
        """The clearer exception to raise instead of ``exc``, or None to let it through.

        A refusal (``ProxyError``) is returned as is: the caller adds the broker's reason.
        """
        module = self.module
        if isinstance(exc, module.ProxyError):
            return exc  # type: ignore[no-any-return]
        if isinstance(exc, module.ConnectError) and not self._is_tls(exc):
            # Every connection of a routed transport goes to the broker; a failed TLS handshake
            # (with the real host, inside the tunnel) is the only other ConnectError.
            message = "AgenShield: the broker at %s is not reachable (%s); every request is routed through it" % (
                self.broker, exc,
            )
            return module.ConnectError(message, request=request)  # type: ignore[no-any-return]
        if isinstance(exc, (module.RemoteProtocolError, module.ReadError)) and request.url.scheme == "https" \
                and self.not_a_proxy(request):  # the daemon 0.7.2 drops a CONNECT without a word
            from .._transport import CLOSED, not_a_proxy_message

            message = not_a_proxy_message(self.broker, CLOSED, _destination(request.url))
            return module.ProxyError(message, request=request)  # type: ignore[no-any-return]
        return None

    def _is_tls(self, exc: BaseException) -> bool:
        seen = 0
        cause: Optional[BaseException] = exc
        while cause is not None and seen < 8:
            if isinstance(cause, self.tls_errors):
                return True
            cause = cause.__cause__ or cause.__context__
            seen += 1
        return "SSL" in str(exc) or "certificate" in str(exc).lower()

    def suspect(self, request: Any, response: Any) -> Optional[str]:
        """How to tell whether this answer to a plain-HTTP (forwarded) request is the broker's.

        None: it cannot be. ``"header"``: ``X-Proxy-Error`` says so (the reference broker). The daemon
        sends no header on forwards, in any framing: ``"policy"`` for a 403 (the broker's
        ``policy_check`` on the URL decides), ``"proxy"`` for a 404-like answer (a broker that is not
        a proxy at all), ``"body"`` for a 502 whose body may be the broker's ``Proxy error``.
        """
        status = response.status_code
        if request.url.scheme != "http" or status not in (403, 404, 405, 501, 502):
            return None
        headers = response.headers
        if "x-proxy-error" in headers:
            return "header" if status in (403, 502) else None
        if status == 403:
            return "policy"
        if status != 502:
            return "proxy"
        length = headers.get("content-length")
        if length is not None and not (length.strip().isdigit() and int(length) <= 64):
            return None
        return "body"

    def not_a_proxy(self, request: Any) -> bool:
        from .._transport import not_a_proxy

        return not_a_proxy(self.config, _connect_timeout(request))

    def not_a_proxy_error(self, request: Any, response: Any) -> Exception:
        from .._transport import not_a_proxy_message

        message = not_a_proxy_message(self.broker, response.status_code, _destination(request.url))
        return self.module.ProxyError(message, request=request)  # type: ignore[no-any-return]

    def refusal_reason(self, response: Any, body: bytes) -> str:
        kind = response.headers.get("x-proxy-error")
        text = body.decode("utf-8", "replace").strip()
        why = "%d %s" % (response.status_code, text) if text else str(response.status_code)  # HEAD: no body
        return "%s, %s" % (why, kind) if kind else why


def _sync_handler(original: Callable[..., Any], errors: _Errors, auto: Optional[_Auto]) -> Callable[..., Any]:
    @functools.wraps(original)
    def handle_request(self: Any, request: Any) -> Any:
        if not getattr(self, _ROUTED, False):
            return original(self, request)
        if auto is not None and auto.rpc(request):
            return auto.route().send(request)
        try:
            response = original(self, request)
        except Exception as exc:
            better = errors.translate(exc, request)
            if better is None:
                raise
            if better is exc:  # refused: httpcore says "<status> <reason>"
                return errors.refusal(request, str(exc), errors.explain_sync(request, str(exc)))
            raise better from exc
        suspect = errors.suspect(request, response)
        if suspect is None:
            return response
        if suspect == "proxy":
            if not errors.not_a_proxy(request):
                return response
            response.close()
            raise errors.not_a_proxy_error(request, response)
        if suspect == "policy":
            explained = errors.explain_sync(request, "403")
            if explained is None:
                return response  # the policy allows the URL: the upstream's own 403
            response.close()
            return errors.refusal(request, "403 Blocked by AgenShield URL policy", explained)
        body = _read_sync(response)
        if suspect == "body" and body.strip() not in FORWARD_REFUSAL_BODIES:
            return _replay(errors.module, response, body)
        why = errors.refusal_reason(response, body)
        return errors.refusal(request, why, errors.explain_sync(request, why))

    handle_request.__agenshield_original__ = original  # type: ignore[attr-defined]
    return handle_request


def _async_handler(original: Callable[..., Any], errors: _Errors, auto: Optional[_Auto]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def handle_async_request(self: Any, request: Any) -> Any:
        if not getattr(self, _ROUTED, False):
            return await original(self, request)
        if auto is not None and await auto.rpc_async(request):
            return await auto.route().send_async(request)
        try:
            response = await original(self, request)
        except Exception as exc:
            better = errors.translate(exc, request)
            if better is None:
                raise
            if better is exc:  # refused: httpcore says "<status> <reason>"
                explained = await errors.explain_async(request, str(exc))
                return errors.refusal(request, str(exc), explained)
            raise better from exc
        suspect = errors.suspect(request, response)
        if suspect is None:
            return response
        if suspect == "proxy":
            if not await _in_thread(errors.not_a_proxy, request):
                return response
            await response.aclose()
            raise errors.not_a_proxy_error(request, response)
        if suspect == "policy":
            explained = await errors.explain_async(request, "403")
            if explained is None:
                return response  # the policy allows the URL: the upstream's own 403
            await response.aclose()
            return errors.refusal(request, "403 Blocked by AgenShield URL policy", explained)
        body = await _read_async(response)
        if suspect == "body" and body.strip() not in FORWARD_REFUSAL_BODIES:
            return _replay(errors.module, response, body)
        why = errors.refusal_reason(response, body)
        return errors.refusal(request, why, await errors.explain_async(request, why))

    handle_async_request.__agenshield_original__ = original  # type: ignore[attr-defined]
    return handle_async_request


async def _in_thread(function: Callable[..., Any], *args: Any) -> Any:
    """A blocking call (the transport probe, once per process) off the event loop, asyncio or trio."""
    try:
        import asyncio

        loop = asyncio.get_running_loop()
    except RuntimeError:
        import anyio.to_thread

        return await anyio.to_thread.run_sync(function, *args)
    return await loop.run_in_executor(None, function, *args)


def _read_sync(response: Any) -> bytes:
    """The whole raw body of a transport-level response (a short one: see ``suspect``)."""
    try:
        return b"".join(part for part in response.stream)
    finally:
        response.stream.close()


async def _read_async(response: Any) -> bytes:
    chunks = []
    try:
        async for part in response.stream:
            chunks.append(part)
    finally:
        await response.stream.aclose()
    return b"".join(chunks)


#: ``error.code`` of a refusal's JSON-RPC body: in the range JSON-RPC leaves to servers.
REFUSAL_RPC_CODE = -32001


def refusal_response(module: ModuleType, message: str) -> Any:
    """The broker's policy refusal as the answer a refusing HTTP proxy gives: a ``403``.

    Not an exception, because every SDK built on httpx/httpx2 (openai, anthropic, huggingface_hub,
    mcp, google-genai) retries a transport exception as a connection error, with back-off (openai
    1.1-1.5 s, huggingface_hub 23 s), and then reports "Connection error"; a 403 is retried by none
    of them and raised at once as their own status error (``PermissionDeniedError``, ...), whose
    message carries this body. ``x-should-retry: false`` says the same to the Stainless SDKs.
    ``message`` (it names AgenShield, the destination and the broker's reason) is the reason
    phrase, so ``raise_for_status()`` shows it, and the JSON body's ``error.message``, which is
    where API SDKs look (OpenAI's and Anthropic's ``{"error": {"message", "type"}}``); the body is
    also a JSON-RPC error (``jsonrpc``, ``id``, an integer ``error.code``), which MCP's client raises
    as the server's error instead of a bare "Server returned an error response".
    ``X-AgenShield-Refused: 1`` marks the answer as the shim's.
    """
    import json

    body = json.dumps({
        "jsonrpc": "2.0", "id": None,
        "error": {"code": REFUSAL_RPC_CODE, "message": message, "type": "agenshield_refused", "data": "blocked-by-policy"},
    })
    return module.Response(
        status_code=403,
        headers=[(b"Content-Type", b"application/json"), (b"X-Should-Retry", b"false"), (b"X-AgenShield-Refused", b"1")],
        content=body.encode("ascii"),
        extensions={"http_version": b"HTTP/1.1", "reason_phrase": message.encode("ascii", "replace")},
    )


def _replay(module: ModuleType, response: Any, body: bytes) -> Any:
    """The upstream's own 403/502, read to tell it from a refusal: give it back, body and all."""
    return module.Response(
        status_code=response.status_code,
        headers=response.headers,
        content=body,
        extensions=response.extensions,
    )


def _destination(url: Any) -> str:
    """``scheme://host:port`` of an ``httpx.URL`` (explicit port, so the message shows the tunnel)."""
    return authority.destination(url.scheme, url.host, url.port)
