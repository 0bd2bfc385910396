"""httpx under the rpc transport: a routed transport's request as one ``http_request`` call.

Imported by :mod:`.httpx` only when the rpc transport is used (``AGENSHIELD_TRANSPORT=rpc``, or
``auto`` once the broker turned out not to tunnel), so the tunnel transport never loads the rpc
core. Which transports are routed, and the handlers that hand their requests to
:class:`RpcRoute`, are :mod:`.httpx`'s: this module imports nothing of it (the policy refusal's
answer comes in as an argument). What this keeps and what it cannot is in :mod:`.httpx`'s docstring.
"""

import functools
from types import ModuleType
from typing import Any, Callable, List, Optional, Tuple

from .. import _rpc, _wire
from .._config import Config
from ..errors import library_class

#: ``refusal(module, message)``: the answer a policy refusal becomes (``httpx.refusal_response``).
Refusal = Callable[[ModuleType, str], Any]


class RpcRoute:
    """One httpx request as one ``http_request`` call, and the answer as httpx's own ``Response``.

    Sans-IO apart from the call itself, so the sync and async handlers share everything else.
    """

    def __init__(self, module: ModuleType, config: Config, refusal: Refusal) -> None:
        self.module = module
        self.config = config
        self.refusal = refusal
        # an upgrade is a protocol this transport does not carry, and a body the broker would
        # corrupt is the proxy failing it: the one class is both, so either except clause catches it
        self.tunnel_only: type = library_class(
            (module.UnsupportedProtocol, module.ProxyError), __name__.rpartition("_")[0])

    # -- the request ------------------------------------------------------------------------

    def call_args(self, request: Any) -> Tuple[str, str, List[Tuple[str, str]], Optional[float]]:
        """``(method, url, headers, timeout_s)`` for the call; refuses what one call cannot carry."""
        module = self.module
        url = request.url
        if url.scheme not in ("http", "https"):
            raise module.UnsupportedProtocol(
                "Request URL has an unsupported protocol '%s://'." % url.scheme, request=request)
        if not url.host:
            raise module.UnsupportedProtocol("Request URL is missing a host: %s" % url, request=request)
        # Without userinfo (httpx already turned it into an Authorization header) and fragment.
        target = "%s://%s%s" % (url.scheme, url.netloc.decode("ascii"), url.raw_path.decode("ascii"))
        sent = [(_text(k), _text(v)) for k, v in request.headers.raw]
        try:
            _wire.check_carriable(request.method, sent)
        except _wire.TunnelOnlyError as exc:
            raise self.tunnel_only(str(exc), request=request) from None
        headers = _wire.end_to_end_headers(sent)
        timeouts = request.extensions.get("timeout") or {}
        read = timeouts.get("read")
        return request.method, target, headers, None if read is None else float(read)

    # -- the answer ---------------------------------------------------------------------------

    def response(self, request: Any, answer: _rpc.RpcResponse) -> Any:
        """The ``httpx.Response`` a transport returns: headers as sent, the body still encoded."""
        headers = [(_raw(name), _raw(value)) for name, value in _wire.response_headers(answer, request.method)]
        body = answer.body if _wire.body_allowed(request.method, answer.status) else b""
        return self.module.Response(
            status_code=answer.status,
            headers=headers,
            stream=self.module.ByteStream(body),
            extensions={
                "http_version": b"HTTP/1.1",
                "reason_phrase": _wire.reason_phrase(answer).encode("ascii", "replace"),
            },
        )

    def error(self, request: Any, exc: _rpc.RpcError) -> Exception:
        """httpx's own exception for a failed call, with the core's message (it names the broker)."""
        module = self.module
        message = str(exc)
        if isinstance(exc, _rpc.RpcTimeout):
            cls = module.ReadTimeout
        elif isinstance(exc, _rpc.RpcBrokerUnavailable):
            cls = module.ConnectTimeout if isinstance(exc, _rpc.RpcBrokerConnectTimeout) else module.ConnectError
        elif isinstance(exc, _rpc.RpcTunnelOnly):  # a body only the tunnel carries intact
            cls = self.tunnel_only
        elif isinstance(exc, (_rpc.RpcDenied, _rpc.RpcNetworkError)):
            # Refused, upstream unreachable (the tunnel's CONNECT 502), or a body it cannot carry:
            # in each case the broker, httpx's proxy, could not give this request a way through.
            cls = module.ProxyError
        else:  # RpcProtocolError: a broker that is not one; like the tunnel's unreachable broker
            cls = module.ConnectError
        return cls(message, request=request)  # type: ignore[no-any-return]

    # -- the call -----------------------------------------------------------------------------

    def send(self, request: Any) -> Any:
        """``handle_request`` of a routed ``HTTPTransport``: the body read whole, one call."""
        method, url, headers, timeout_s = self.call_args(request)
        body = request.read()
        try:
            answer = _rpc.http_request(self.config, method, url, headers, body or None, timeout_s)
            return self.response(request, answer)
        except _rpc.RpcDenied as exc:  # the policy's refusal: an answer, as in the tunnel
            return self.refusal(self.module, str(exc))
        except _rpc.RpcError as exc:
            raise self.error(request, exc) from exc

    async def send_async(self, request: Any) -> Any:
        """``handle_async_request`` of a routed ``AsyncHTTPTransport``."""
        method, url, headers, timeout_s = self.call_args(request)
        body = await request.aread()
        try:
            answer = await _call_async(self.config, method, url, headers, body or None, timeout_s)
            return self.response(request, answer)
        except _rpc.RpcDenied as exc:  # the policy's refusal: an answer, as in the tunnel
            return self.refusal(self.module, str(exc))
        except _rpc.RpcError as exc:
            raise self.error(request, exc) from exc


async def _call_async(config: Config, method: str, url: str, headers: List[Tuple[str, str]],
                      body: Optional[bytes], timeout_s: Optional[float]) -> _rpc.RpcResponse:
    """:func:`_rpc.http_request_async` on asyncio; under trio (httpx runs on both, through anyio)
    the sync call in a worker thread, since the core speaks asyncio only."""
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        import anyio.to_thread

        call = functools.partial(_rpc.http_request, config, method, url, headers, body, timeout_s)
        return await anyio.to_thread.run_sync(call)
    return await _rpc.http_request_async(config, method, url, headers, body, timeout_s)


def _text(raw: bytes) -> str:
    """A request header name or value for the JSON call: UTF-8 when it is, else Latin-1 (as sent)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _raw(text: str) -> bytes:
    """A response header back to bytes: the broker read the upstream's as Latin-1."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")
