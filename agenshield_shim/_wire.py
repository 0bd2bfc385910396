"""HTTP/1.1 on a virtual connection: read the request a library wrote, write back the response it will parse.

Why this module exists: with ``AGENSHIELD_TRANSPORT=rpc``, http.client (and so urllib, urllib3,
requests, botocore, pip) and aiohttp keep doing what they always do: they serialize a request onto a
connection and parse the response that comes back. The hooks give them a *virtual* connection
instead of a socket: this module assembles the bytes the library wrote into one complete request
(``Content-Length``, chunked or bodiless framing, exactly as a server would), and turns the broker's
answer into the bytes of an ordinary HTTP/1.1 response, which the library's own parser reads. So the
response object, its headers (two ``Set-Cookie`` lines stay two), ``raise_for_status``, cookies,
redirects followed by the library, decoding and the library's exception types are all the
library's own, with no response class rebuilt by hand.

Like :mod:`agenshield_shim._rpc`, it knows no HTTP library and imports none.
"""

import re
from typing import Any, Iterable, List, Optional, Tuple

from . import errors
from ._rpc import RpcProtocolError, RpcResponse

#: Largest request head accepted from the library (http.client itself allows 100 header lines).
MAX_HEAD = 256 * 1024
TUNNEL_ONLY_HINT = "set AGENSHIELD_TRANSPORT=tunnel (or auto, the default) with a broker that tunnels for this"
#: The interim answer a virtual connection gives itself when a request's head asks for it
#: (``RequestAssembler.take_continue``): the broker only ever sees whole requests.
CONTINUE_RESPONSE = b"HTTP/1.1 100 Continue\r\n\r\n"

#: Hop-by-hop and framing headers: they describe the virtual connection, not the request. The
#: broker frames the buffered body itself (``_rpc.build_params`` adds ``Content-Length``).
_REQUEST_DROP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate", "te",
    "trailer", "transfer-encoding", "upgrade", "content-length", "host", "expect",
})
_RESPONSE_DROP = frozenset({
    "connection", "keep-alive", "proxy-connection", "transfer-encoding", "content-length", "trailer", "upgrade",
})
_BAD_VALUE = re.compile(r"[\r\n\x00]")


class WireError(ValueError):
    """The library wrote something that is not one HTTP/1.1 request (or not one the rpc transport can carry)."""


class TunnelOnlyError(WireError, errors.TunnelOnlyError):
    """A request only a tunnel can carry: an upgrade (websocket), ``CONNECT``."""


class WireRequest:
    """One complete request as the library wrote it; ``body`` is de-chunked."""

    __slots__ = ("method", "target", "version", "headers", "body")

    def __init__(self, method: str, target: str, version: str, headers: List[Tuple[str, str]], body: bytes) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.body = body

    def url(self, scheme: str, authority: str) -> str:
        """The absolute URL: the target itself when the library wrote absolute form (a proxy request)."""
        lowered = self.target[:8].lower()
        if lowered.startswith("http://") or lowered.startswith("https://"):
            return self.target
        if not self.target.startswith("/"):
            raise WireError("request target %r is neither origin form nor absolute form" % self.target[:200])
        return "%s://%s%s" % (scheme, authority, self.target)

    def forwarded_headers(self) -> List[Tuple[str, str]]:
        """The end-to-end headers, for the broker (framing and hop-by-hop ones left out)."""
        return end_to_end_headers(self.headers)

    def check_carriable(self) -> None:
        """Refuse what a single request/response exchange cannot carry (see :func:`check_carriable`)."""
        check_carriable(self.method, self.headers)

    def __repr__(self) -> str:
        return "WireRequest(%s %s, %d headers, %d bytes)" % (self.method, self.target[:100], len(self.headers), len(self.body))


def check_carriable(method: str, headers: Iterable[Tuple[str, str]]) -> None:
    """Refuse, with :class:`TunnelOnlyError`, what a single request/response exchange cannot carry:
    ``CONNECT`` and connection upgrades (websockets). Give it the headers as the library sent them:
    ``Upgrade`` is a hop-by-hop header, gone after :func:`end_to_end_headers`."""
    if method == "CONNECT":
        raise TunnelOnlyError("AgenShield: the rpc transport cannot carry a CONNECT request; %s" % TUNNEL_ONLY_HINT)
    upgrade = next((v for k, v in headers if k.lower() == "upgrade"), None)
    if upgrade is not None:
        raise TunnelOnlyError(
            "AgenShield: the rpc transport cannot carry a connection upgrade (Upgrade: %s, e.g. a websocket); %s"
            % (upgrade[:100], TUNNEL_ONLY_HINT))


def end_to_end_headers(headers: Iterable[Tuple[str, str]]) -> List[Tuple[str, str]]:
    """Request headers for the broker: without framing, ``Host`` (the URL says it) and hop-by-hop
    headers, including those a ``Connection`` header names."""
    pairs = list(headers)
    named = {token.strip().lower() for k, v in pairs if k.lower() == "connection" for token in v.split(",")}
    return [(k, v) for k, v in pairs if k.lower() not in _REQUEST_DROP and k.lower() not in named]


class RequestAssembler:
    """Collects what a library writes to a virtual connection, one complete request at a time.

    Heads and framing are read with the package's one codec (:mod:`agenshield_shim.http1`), the
    broker's rules: ``Content-Length``, ``chunked`` (trailers read and dropped) or no body, and
    anything ambiguous refused. So completion is known from the bytes alone, as a server knows it,
    and a library that sends its body in many writes (urllib3's chunks, a file object, aiohttp's
    stream writer) is assembled the same way.
    """

    def __init__(self) -> None:
        from . import http1

        self._codec = http1
        self._limits = http1.Limits(max_head=MAX_HEAD)
        self._buffer = bytearray()
        self._head: Optional[Tuple[str, str, str, List[Tuple[str, str]]]] = None
        self._body = bytearray()
        self._need: Optional[int] = None  # bytes of body still expected (Content-Length framing)
        self._chunks: Any = None  # the ChunkedDecoder of a chunked body
        self._continue = False  # the pending request's head asked for "100 Continue" before its body
        self._done: List[WireRequest] = []

    @property
    def idle(self) -> bool:
        """Nothing of an unfinished request is buffered."""
        return self._head is None and not self._buffer

    def feed(self, data: bytes) -> None:
        """Add written bytes; raises :class:`WireError` on bytes that are not HTTP/1.1 requests."""
        self._buffer += data
        try:
            while self._step():
                pass
        except self._codec.HttpError as exc:
            raise WireError("not an HTTP/1.1 request the rpc transport can carry: %s" % exc.message) from None

    def pop(self) -> Optional[WireRequest]:
        """The oldest complete request, if any."""
        return self._done.pop(0) if self._done else None

    def take_continue(self) -> bool:
        """True, once, when the unfinished request's head asked ``Expect: 100-continue``.

        Its sender waits for a ``100 Continue`` before it writes the body; with no server on the
        other side of a virtual connection, whoever owns it has to answer.
        """
        pending, self._continue = self._continue, False
        return pending

    # -- parsing ---------------------------------------------------------------------------------

    def _step(self) -> bool:
        if self._head is None:
            return self._parse_head()
        if self._chunks is not None:
            self._body += self._chunks.feed(self._buffer)
            self._buffer.clear()
            if not self._chunks.done:
                return False
            self._buffer += self._chunks.unused
            self._finish()
            return True
        assert self._need is not None
        take = min(self._need, len(self._buffer))
        if take:
            self._body += self._buffer[:take]
            del self._buffer[:take]
            self._need -= take
        if self._need == 0:
            self._finish()
            return True
        return False

    def _parse_head(self) -> bool:
        codec = self._codec
        while self._buffer[:2] == b"\r\n":  # RFC 9112 2.2: ignore empty lines before a request
            del self._buffer[:2]
        end = codec.head_end(self._buffer)
        if end < 0:
            if len(self._buffer) > MAX_HEAD:
                raise WireError("request head larger than %d bytes" % MAX_HEAD)
            return False
        head = codec.parse_request_head(self._buffer[:end], self._limits)
        del self._buffer[:end]
        self._head = (head.method, head.target, "HTTP/%d.%d" % head.version, head.headers)
        kind, n = codec.request_framing(head, self._limits)
        if kind == "chunked":
            self._chunks = codec.ChunkedDecoder(limits=self._limits)
        else:
            self._need = n
        self._continue = bool(self._chunks is not None or self._need) and any(
            v.strip(" \t").lower() == "100-continue" for v in head.get_all("expect"))
        return True

    def _finish(self) -> None:
        assert self._head is not None
        method, target, version, headers = self._head
        self._done.append(WireRequest(method, target, version, headers, bytes(self._body)))
        self._head, self._need, self._chunks, self._continue = None, None, None, False
        self._body = bytearray()


def body_allowed(method: str, status: int) -> bool:
    """Whether a response to ``method`` with ``status`` has a body (RFC 9110 6.4.1)."""
    return not (method == "HEAD" or 100 <= status < 200 or status in (204, 304))


def _bad(response: RpcResponse, why: str) -> RpcProtocolError:
    return RpcProtocolError("AgenShield: the broker's answer for %s cannot be a real response: %s"
                            % (response.url, why), None, None, "", response.url)


def response_headers(response: RpcResponse, method: str) -> List[Tuple[str, str]]:
    """The headers of ``response`` as an HTTP/1.1 server would send them on an open connection.

    The body is framed by ``Content-Length`` (it is whole); for a ``HEAD`` the upstream's own
    ``Content-Length`` is kept, since it describes the body a ``GET`` would get. Hop-by-hop headers
    are the broker's business and left out, so the virtual connection stays open. A header that could
    not have come from a real upstream (a CR/LF in a value, a name that is not a token) would smuggle
    lines into the parser: it is a protocol error, never passed on.
    """
    from .http1 import is_token

    out: List[Tuple[str, str]] = []
    for name, value in response.headers:
        if not is_token(name):
            raise _bad(response, "header name %r" % name[:100])
        if _BAD_VALUE.search(value):
            raise _bad(response, "a CR, LF or NUL in the value of header %r" % name)
        low = name.lower()
        if low in _RESPONSE_DROP and not (low == "content-length" and method == "HEAD"):
            continue
        out.append((name, value))
    if body_allowed(method, response.status):
        out.append(("content-length", str(len(response.body))))
    return out


def reason_phrase(response: RpcResponse) -> str:
    """The status line's reason, on one line."""
    return _BAD_VALUE.sub(" ", response.reason or "").strip()


def response_head(response: RpcResponse, method: str) -> bytes:
    """The status line and headers (see :func:`response_headers`), ready for the library's parser."""
    if not 100 <= response.status <= 999:
        raise _bad(response, "status %r" % response.status)
    lines = ["HTTP/1.1 %d %s" % (response.status, reason_phrase(response))]
    lines.extend("%s: %s" % pair for pair in response_headers(response, method))
    text = "\r\n".join(lines) + "\r\n\r\n"
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:  # a header value beyond Latin-1: as the upstream's UTF-8 bytes
        return text.encode("utf-8")


def response_bytes(response: RpcResponse, method: str) -> Tuple[bytes, bytes]:
    """``(head, body)`` of the response to write back; no body where HTTP allows none."""
    body = response.body if body_allowed(method, response.status) else b""
    return response_head(response, method), body
