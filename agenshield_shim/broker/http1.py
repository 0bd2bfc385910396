"""A small, strict HTTP/1.x layer on asyncio streams: head parsing, body framing, raw copying.

Why our own instead of aiohttp's server: the broker's front door must (a) hand a raw byte pipe to
``CONNECT`` tunnels and to ``101`` upgrades, (b) forward absolute-form requests byte for byte,
chunk framing included, and (c) give each malformed input its own documented answer (400, 408,
413, 431, 505) under limits we set. aiohttp's server hides the socket behind its protocol and
decodes bodies, so it has no seam for (a) or (b). What we need of HTTP/1.1 framing is small, and
being strict (no obs-fold, no Content-Length together with Transfer-Encoding, no whitespace
before a colon) also closes the request-smuggling doors a lenient proxy would open.

:class:`Stream` keeps its own read-ahead buffer on top of ``asyncio.StreamReader``, so bytes a
client sent after a head (a pipelined request, a TLS ClientHello right after ``CONNECT``) are
never lost.
"""

import asyncio
import re
from dataclasses import dataclass
from typing import Awaitable, Callable, List, Optional, Tuple

READ_SIZE = 256 * 1024
MAX_LINE = 8 * 1024  # chunk-size lines and trailer lines

_REQUEST_LINE = re.compile(r"^([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])$")
_STATUS_LINE = re.compile(r"^HTTP/([0-9])\.([0-9]) ([0-9]{3})(?: ([^\x00-\x08\x0a-\x1f\x7f]*))?$")
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(r"^[0-9]{1,18}$")
#: A chunk-size line (RFC 9112 7.1): hex size, optional extensions, CRLF; nothing lenient (not
#: even the grammar's optional whitespace around ``;`` and ``=``, which h11 and others refuse).
_CHUNK_LINE = re.compile(rb"^([0-9a-fA-F]{1,16})((?:;[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
                         rb"(?:=(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+|\"(?:[^\"\\\x00-\x08\x0a-\x1f\x7f]|\\[^\x00-\x08\x0a-\x1f\x7f])*\"))?)*)\r\n$")
#: A trailer field line: a header field, CRLF-terminated. A request line there is refused.
_TRAILER_LINE = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*\r\n$")

REASONS = {
    100: "Continue", 101: "Switching Protocols", 200: "OK", 400: "Bad Request", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required",
    413: "Payload Too Large", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable", 505: "HTTP Version Not Supported",
}


class HttpError(Exception):
    """A request the broker answers with ``status`` and then closes the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ProtocolError(Exception):
    """The peer broke HTTP framing mid-stream (bad chunk size, short body): drop the connection."""


Headers = List[Tuple[str, str]]


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
    out: List[str] = []
    for v in header_all(headers, name):
        # only SP and HTAB are HTTP whitespace: str.strip() would also eat "\xa0", and a
        # "chunked\xa0" the broker read as chunked would reach the upstream as something else
        out.extend(t.strip(" \t").lower() for t in v.split(",") if t.strip(" \t"))
    return out


@dataclass
class RequestHead:
    method: str
    target: str
    version: Tuple[int, int]
    headers: Headers

    def get(self, name: str) -> Optional[str]:
        return header_get(self.headers, name)


@dataclass
class ResponseHead:
    version: Tuple[int, int]
    status: int
    reason: str
    headers: Headers
    raw_status_line: str

    def get(self, name: str) -> Optional[str]:
        return header_get(self.headers, name)


def _parse_headers(lines: List[str]) -> Headers:
    headers: Headers = []
    for line in lines:
        if not line:
            continue
        if line[0] in " \t":
            raise HttpError(400, "obsolete header line folding is not accepted")
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.match(name):
            raise HttpError(400, "malformed header line")
        value = value.strip(" \t")
        if _BAD_VALUE.search(value):
            raise HttpError(400, "control character in header value")
        headers.append((name, value))
    return headers


def parse_request_head(data: bytes) -> RequestHead:
    """Parse a complete head (ending in CRLF CRLF); :class:`HttpError` 400/505 when malformed."""
    text = data.decode("latin-1")
    lines = text[:-4].split("\r\n") if text.endswith("\r\n\r\n") else text.split("\r\n")
    m = _REQUEST_LINE.match(lines[0])
    if not m:
        if re.match(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [\x21-\x7e]+ HTTP/[0-9]+(\.[0-9]+)?$", lines[0]):
            raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        raise HttpError(400, "malformed request line")
    major, minor = int(m.group(3)), int(m.group(4))
    if major != 1 or minor > 1:
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    if any("\r" in ln or "\n" in ln for ln in lines):
        raise HttpError(400, "bare CR or LF in head")
    return RequestHead(m.group(1), m.group(2), (major, minor), _parse_headers(lines[1:]))


def parse_response_head(data: bytes) -> ResponseHead:
    text = data.decode("latin-1")
    lines = text[:-4].split("\r\n") if text.endswith("\r\n\r\n") else text.split("\r\n")
    m = _STATUS_LINE.match(lines[0])
    if not m:
        raise ProtocolError("malformed status line from upstream: %r" % lines[0][:80])
    try:
        headers = _parse_headers(lines[1:])
    except HttpError as exc:
        raise ProtocolError("malformed upstream header: %s" % exc.message) from None
    return ResponseHead((int(m.group(1)), int(m.group(2))), int(m.group(3)), m.group(4) or "", headers, lines[0])


def request_framing(headers: Headers) -> Tuple[str, int]:
    """``("none", 0)``, ``("length", n)`` or ``("chunked", 0)`` for a request body; 400/501 if ambiguous."""
    te = header_tokens(headers, "transfer-encoding")
    cls = header_all(headers, "content-length")
    if te or header_all(headers, "transfer-encoding"):
        if any(not t.strip(" \t") for v in header_all(headers, "transfer-encoding") for t in v.split(",")):
            raise HttpError(400, "empty element in Transfer-Encoding")  # strict, as h11: one reading only
        if cls:
            raise HttpError(400, "both Content-Length and Transfer-Encoding")
        if te != ["chunked"]:
            raise HttpError(501, "unsupported Transfer-Encoding")
        return "chunked", 0
    if cls:
        values = {v.strip(" \t") for c in cls for v in c.split(",")}
        if len(values) != 1:
            raise HttpError(400, "conflicting Content-Length")
        v = values.pop()
        if not _DIGITS.match(v):  # ASCII digits: "²".isdigit() is true, and int("²") raises
            raise HttpError(400, "invalid Content-Length")
        n = int(v)
        return ("length", n) if n else ("none", 0)
    return "none", 0


def response_framing(head: ResponseHead, request_method: str) -> Tuple[str, int]:
    """How a response body ends: ``none``, ``length``, ``chunked`` or ``close`` (read to EOF)."""
    if request_method == "HEAD" or 100 <= head.status < 200 or head.status in (204, 304):
        return "none", 0
    te = header_tokens(head.headers, "transfer-encoding")
    if te:
        return ("chunked", 0) if te[-1] == "chunked" else ("close", 0)
    cls = header_all(head.headers, "content-length")
    if cls:
        values = {v.strip(" \t") for c in cls for v in c.split(",")}
        if len(values) != 1 or not _DIGITS.match(next(iter(values))):
            raise ProtocolError("invalid Content-Length from upstream")
        return "length", int(values.pop())
    return "close", 0


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
            idx = self.buf.find(b"\r\n\r\n", start)
            if idx >= 0:
                if idx + 4 > limit:
                    raise HttpError(431, "request head too large")
                head = bytes(self.buf[: idx + 4])
                del self.buf[: idx + 4]
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
            idx = self.buf.find(b"\r\n\r\n", start)
            if idx >= 0:
                head = bytes(self.buf[: idx + 4])
                del self.buf[: idx + 4]
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
    m = _CHUNK_LINE.match(line)
    if m is None:
        raise ProtocolError("bad chunk size line")
    return int(m.group(1), 16)


def _check_trailer(line: bytes) -> None:
    if not _TRAILER_LINE.match(line):
        raise ProtocolError("bad trailer line")


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
    out = bytearray()
    while True:
        size = _chunk_size(await src.readline())
        if size == 0:
            while True:
                trailer = await src.readline()
                if trailer == b"\r\n":
                    return bytes(out)
                _check_trailer(trailer)
        if len(out) + size > limit:
            raise HttpError(413, "request body larger than %d bytes" % limit)
        while size > 0:
            data = await src.read_some(size)
            if not data:
                raise ProtocolError("client closed mid-body")
            out += data
            size -= len(data)
        if (await src.readline()) != b"\r\n":
            raise ProtocolError("missing CRLF after chunk")


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
