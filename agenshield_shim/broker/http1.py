"""The broker's HTTP/1.x on asyncio streams: reading heads and bodies, raw copying, its own answers.

The rules (head grammar, framing, chunk lines, trailers, limits, the error type) are the package's
one codec, :mod:`agenshield_shim.http1`, which the shim's rpc transport reads with too; this module
does the IO around it and maps the codec's refusals of an upstream's bytes to :class:`ProtocolError`.

Why our own instead of aiohttp's server: the broker's front door must (a) hand a raw byte pipe to
``CONNECT`` tunnels and to ``101`` upgrades, (b) forward absolute-form requests byte for byte,
chunk framing included, and (c) give each malformed input its own documented answer (400, 408,
413, 431, 505) under limits we set. aiohttp's server hides the socket behind its protocol and
decodes bodies, so it has no seam for (a) or (b). Nor h11: it reads a request head 3.8-5.7 times
slower than the codec (benchmarks/http1_codec.py) and accepts what the front door must refuse (bare
LF, obs-fold, Content-Length beside Transfer-Encoding, HTTP/1.2). Being strict also closes the
request-smuggling doors a lenient proxy would open.

:class:`Stream` keeps its own read-ahead buffer on top of ``asyncio.StreamReader``, so bytes a
client sent after a head (a pipelined request, a TLS ClientHello right after ``CONNECT``) are
never lost.
"""

import asyncio
from typing import Awaitable, Callable, List, Optional, Tuple, Union

from .. import http1 as codec
from ..http1 import Headers as Headers, HttpError as HttpError  # re-exported: the broker's names
from ..http1 import RequestHead as RequestHead, ResponseHead as ResponseHead

READ_SIZE = 256 * 1024
MAX_LINE = codec.LIMITS.max_line  # chunk-size lines and trailer lines

REASONS = {
    100: "Continue", 101: "Switching Protocols", 200: "OK", 400: "Bad Request", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required",
    413: "Payload Too Large", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable", 505: "HTTP Version Not Supported",
}


class ProtocolError(Exception):
    """The peer broke HTTP framing mid-stream (bad chunk size, short body): drop the connection."""


def header_get(headers: Headers, name: str) -> Optional[str]:
    name = name.lower()
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def header_all(headers: Headers, name: str) -> List[str]:
    name = name.lower()
    return [v for k, v in headers if k.lower() == name]


def header_tokens(headers: Headers, name: str) -> List[str]:
    """Comma-separated tokens of every ``name`` header, lower-cased (``Connection: a, b``)."""
    return codec.list_tokens(header_all(headers, name))


#: The codec's limits, but for the head size: :meth:`Stream.read_head` applies ``--max-head-size``
#: (and the forward path its upstream limit) before a head is parsed.
HEAD_READ_LIMITS = codec.Limits(max_head=1 << 40)


def parse_request_head(data: bytes) -> RequestHead:
    """A complete request head; :class:`HttpError` 400/431/505 (the codec's rules)."""
    return codec.parse_request_head(data, HEAD_READ_LIMITS)


def parse_response_head(data: bytes) -> ResponseHead:
    """An upstream's response head; :class:`ProtocolError` if the codec refuses it."""
    try:
        return codec.parse_response_head(data, HEAD_READ_LIMITS)
    except HttpError as exc:
        raise ProtocolError("malformed response head from upstream: %s" % exc.message) from None


def check_host(head: RequestHead) -> None:
    """RFC 9112 3.2: an HTTP/1.1 request without ``Host``, or any request with more than one, is 400.

    A route's rule, not the codec's: the shim's rpc assembler drops ``Host`` (the URL says where
    a request goes), and ``--compat 0.7.2`` answers as the daemon does (Node keeps the first of
    several ``Host`` fields; without one it answers its own 400). Two ``Host`` fields are two
    answers to "which site", and a proxy must not pick one for its upstream (h11 refuses them too).
    An empty ``Host`` is one field (RFC 9112 3.2: sent when the target has no authority).
    """
    hosts = head.get_all("host")
    if len(hosts) > 1:
        raise HttpError(400, "more than one Host header", "host")
    if not hosts and head.version == (1, 1):
        raise HttpError(400, "HTTP/1.1 request without a Host header", "host")


def request_framing(head: Union[RequestHead, Headers]) -> Tuple[str, int]:
    """``("none", 0)``, ``("length", n)`` or ``("chunked", 0)`` for a request body; 400/501 if ambiguous."""
    if not isinstance(head, RequestHead):  # a bare field list (callers holding no head)
        head = RequestHead("", "", (1, 1), head)
    return codec.request_framing(head)


def response_framing(head: ResponseHead, request_method: str) -> Tuple[str, int]:
    """How a response body ends: ``none``, ``length``, ``chunked`` or ``close`` (read to EOF)."""
    try:
        return codec.response_framing(head, request_method)
    except HttpError as exc:
        raise ProtocolError("%s from upstream" % exc.message) from None


class Stream:
    """A reader/writer pair with a read-ahead buffer we own (see the module docstring)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()

    async def _fill(self) -> bool:
        data = await self.reader.read(READ_SIZE)
        if not data:
            return False
        self.buf += data
        return True

    async def read_head(self, limit: int, idle_timeout: float, head_timeout: float) -> Optional[bytes]:
        """The next head, or ``None`` if the peer closed or stayed silent for ``idle_timeout``.

        Once a first byte is in, the whole head must arrive within ``head_timeout`` (else
        :class:`HttpError` 408) and stay within ``limit`` bytes (else 431).
        """
        loop = asyncio.get_running_loop()
        while self.buf[:2] == b"\r\n":  # RFC 9112 2.2: ignore empty lines before a request
            del self.buf[:2]
        if not self.buf:
            try:
                if not await asyncio.wait_for(self._fill(), idle_timeout):
                    return None
            except asyncio.TimeoutError:
                return None
            while self.buf[:2] == b"\r\n":
                del self.buf[:2]
        deadline = loop.time() + head_timeout
        start = 0
        while True:
            end = codec.head_end(self.buf, start)
            if end >= 0:
                if end > limit:
                    raise HttpError(431, "request head too large")
                head = bytes(self.buf[:end])
                del self.buf[:end]
                return head
            if len(self.buf) > limit:
                raise HttpError(431, "request head too large")
            start = max(0, len(self.buf) - 3)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise HttpError(408, "request head not received in time")
            try:
                if not await asyncio.wait_for(self._fill(), remaining):
                    return None
            except asyncio.TimeoutError:
                raise HttpError(408, "request head not received in time") from None

    async def first_byte(self, idle_timeout: float) -> Optional[int]:
        """The first byte the peer sends (left in the buffer), or ``None`` on EOF or silence."""
        if not self.buf:
            try:
                if not await asyncio.wait_for(self._fill(), idle_timeout):
                    return None
            except asyncio.TimeoutError:
                return None
        return self.buf[0]

    async def read_line(self, limit: int, idle_timeout: float, line_timeout: Optional[float] = None) -> Optional[bytes]:
        """The next ``\\n``-terminated line without its terminator (newline-delimited JSON-RPC);
        ``None`` on EOF or ``idle_timeout`` of silence; :class:`HttpError` 413 over ``limit`` bytes,
        408 when a started line is not complete ``line_timeout`` seconds after its first byte."""
        loop = asyncio.get_running_loop()
        deadline: Optional[float] = None
        start = 0
        while True:
            idx = self.buf.find(b"\n", start)
            if idx >= 0:
                line = bytes(self.buf[:idx])
                del self.buf[: idx + 1]
                return line
            if len(self.buf) > limit:
                raise HttpError(413, "request line larger than %d bytes" % limit)
            start = len(self.buf)
            wait = idle_timeout
            if self.buf and line_timeout is not None:
                if deadline is None:
                    deadline = loop.time() + line_timeout
                wait = deadline - loop.time()
                if wait <= 0:
                    raise HttpError(408, "request line not complete within %g s" % line_timeout)
            try:
                if not await asyncio.wait_for(self._fill(), wait):
                    return None
            except asyncio.TimeoutError:
                if deadline is not None:
                    raise HttpError(408, "request line not complete within %g s" % (line_timeout or 0)) from None
                return None

    async def read_response_head(self, limit: int) -> Optional[bytes]:
        """An upstream response head; ``None`` on EOF before any byte (the caller applies timeouts)."""
        start = 0
        while True:
            end = codec.head_end(self.buf, start)
            if end >= 0:
                head = bytes(self.buf[:end])
                del self.buf[:end]
                return head
            if len(self.buf) > limit:
                raise ProtocolError("upstream response head too large")
            start = max(0, len(self.buf) - 3)
            if not await self._fill():
                if self.buf:
                    raise ProtocolError("upstream closed mid-head")
                return None

    async def read_some(self, n: int = READ_SIZE) -> bytes:
        """Up to ``n`` bytes (buffer first); ``b""`` at EOF."""
        if self.buf:
            data = bytes(self.buf[:n])
            del self.buf[:n]
            return data
        return await self.reader.read(n)

    async def readline(self, limit: int = MAX_LINE) -> bytes:
        start = 0
        while True:
            idx = self.buf.find(b"\n", start)
            if idx >= 0:
                line = bytes(self.buf[: idx + 1])
                del self.buf[: idx + 1]
                return line
            if len(self.buf) > limit:
                raise ProtocolError("line too long")
            start = len(self.buf)
            if not await self._fill():
                raise ProtocolError("unexpected EOF")


Sink = Callable[[bytes], Awaitable[None]]


def writer_sink(writer: asyncio.StreamWriter, touch: Optional[Callable[[], None]] = None) -> Sink:
    """An async ``write(data)`` that applies back-pressure and marks activity for idle timers."""

    async def sink(data: bytes) -> None:
        if touch is not None:
            touch()
        writer.write(data)
        await writer.drain()

    return sink


async def copy_length(src: Stream, sink: Sink, n: int) -> None:
    while n > 0:
        data = await src.read_some(min(n, READ_SIZE))
        if not data:
            raise ProtocolError("peer closed %d bytes before the end of the body" % n)
        n -= len(data)
        await sink(data)


async def copy_until_eof(src: Stream, sink: Sink) -> None:
    while True:
        data = await src.read_some()
        if not data:
            return
        await sink(data)


def _chunk_size(line: bytes) -> int:
    try:
        return codec.chunk_size(line)
    except HttpError as exc:
        raise ProtocolError(exc.message) from None


def _check_trailer(line: bytes) -> None:
    try:
        codec.check_trailer(line)
    except HttpError as exc:
        raise ProtocolError(exc.message) from None


async def copy_chunked(src: Stream, sink: Sink) -> None:
    """Pass a chunked body through unchanged (sizes, extensions, trailers), knowing where it ends.

    Strict, because the bytes are forwarded as read: every line ends in CRLF, a trailer line must
    be a header field, so the end of the body is where any HTTP/1.1 parser puts it (a lenient
    reading here and a different one upstream is how a second request is smuggled in a trailer).
    """
    while True:
        line = await src.readline()
        size = _chunk_size(line)
        await sink(line)
        if size == 0:
            while True:
                trailer = await src.readline()
                if trailer == b"\r\n":
                    await sink(trailer)
                    return
                _check_trailer(trailer)
                await sink(trailer)
        await copy_length(src, sink, size)
        crlf = await src.readline()
        if crlf != b"\r\n":
            raise ProtocolError("missing CRLF after chunk")
        await sink(crlf)


async def read_body(src: Stream, framing: Tuple[str, int], limit: int, timeout: Optional[float] = None) -> bytes:
    """A whole (small) body, for ``/rpc``: :class:`HttpError` 413 past ``limit``, 408 when it is not
    complete within ``timeout`` seconds (a stalled body must not hold a connection, and its file
    descriptor, for ever)."""
    try:
        if timeout is None:
            return await _read_body(src, framing, limit)
        return await asyncio.wait_for(_read_body(src, framing, limit), timeout)
    except asyncio.TimeoutError:
        raise HttpError(408, "request body not received within %g s" % (timeout or 0)) from None
    except ProtocolError as exc:  # a bad chunk line, a short body: answered, then closed
        raise HttpError(400, "malformed request body: %s" % exc) from None


async def _read_body(src: Stream, framing: Tuple[str, int], limit: int) -> bytes:
    kind, n = framing
    if kind == "none":
        return b""
    if kind == "length":
        if n > limit:
            raise HttpError(413, "request body larger than %d bytes" % limit)
        out = bytearray()
        while len(out) < n:
            data = await src.read_some(n - len(out))
            if not data:
                raise ProtocolError("client closed mid-body")
            out += data
        return bytes(out)
    decoder = codec.ChunkedDecoder(limit)
    out = bytearray()
    while not decoder.done:
        data = await src.read_some()
        if not data:
            raise ProtocolError("client closed mid-body")
        try:
            out += decoder.feed(data)
        except HttpError as exc:
            if exc.status == 400:
                raise ProtocolError(exc.message) from None
            raise
    src.buf[:0] = decoder.unused  # what follows the body (a pipelined request) stays for the next read
    return bytes(out)


def render_response(
    status: int,
    body: bytes = b"",
    headers: Optional[Headers] = None,
    reason: Optional[str] = None,
    close: bool = False,
    chunked: bool = False,
    head_only: bool = False,
) -> bytes:
    """Serialise a complete small response (the broker's own answers, never forwarded ones)."""
    lines = ["HTTP/1.1 %d %s" % (status, reason or REASONS.get(status, "Unknown"))]
    for k, v in headers or []:
        lines.append("%s: %s" % (k, v))
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif status >= 200 and status not in (204, 304):
        lines.append("Content-Length: %d" % len(body))
    if close:
        lines.append("Connection: close")
    out = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if head_only:
        return out
    if chunked:
        if body:
            out += b"%x\r\n" % len(body) + body + b"\r\n"
        out += b"0\r\n\r\n"
    else:
        out += body
    return out


def abort(writer: asyncio.StreamWriter) -> None:
    """Close now, dropping unsent data: ``close()`` would wait for a peer that may never read."""
    transport = writer.transport
    if transport is not None and not transport.is_closing():
        transport.abort()
    elif transport is not None:
        try:
            transport.abort()
        except (AttributeError, RuntimeError):  # pragma: no cover - already gone
            pass


class IdleTimer:
    """Calls ``on_idle`` once nothing has ``touch()``-ed it for ``timeout`` seconds.

    One ``call_at`` handle re-armed lazily (not a ``wait_for`` per read), so it costs nothing on the
    hot path of a 100 MB transfer.
    """

    def __init__(self, timeout: float, on_idle: Callable[[], None]) -> None:
        self.loop = asyncio.get_running_loop()
        self.timeout = timeout
        self.on_idle = on_idle
        self.last = self.loop.time()
        self.fired = False
        self._handle: Optional[asyncio.TimerHandle] = self.loop.call_at(self.last + timeout, self._check)

    def touch(self) -> None:
        self.last = self.loop.time()

    def _check(self) -> None:
        due = self.last + self.timeout
        if self.loop.time() >= due:
            self._handle = None
            self.fired = True
            self.on_idle()
        else:
            self._handle = self.loop.call_at(due, self._check)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
