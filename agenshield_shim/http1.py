"""One sans-IO HTTP/1.1 codec for the whole package: the shim's rpc transport and the broker.

Why one: four readers with four rule sets (``1_0`` a chunk size to one, ``0x4`` to another,
``Transfer-Encoding`` with ``Content-Length`` accepted by one and refused by another) are four
places where two ends of a connection can disagree about where a message ends, which is how a
request is smuggled past a policy (issue 15). Here the RFC 9110/9112 grammar is data (the strings
below, compiled once), and every reader asks the same functions:

- :func:`parse_request_head` / :func:`parse_response_head`: a complete head -> :class:`RequestHead`
  / :class:`ResponseHead`, or :class:`HttpError`;
- :func:`request_framing` / :func:`response_framing`: how the body ends (``none``, ``length``,
  ``chunked``, ``close``), with the ``Transfer-Encoding`` + ``Content-Length`` rule and the
  bodiless responses (``HEAD``, 1xx, 204, 304, a 2xx to ``CONNECT``);
- :func:`chunk_size` / :func:`check_trailer` (one line each) and :class:`ChunkedDecoder` (a whole
  chunked body, incrementally, trailers included, and where it ends).

It does no IO and imports only ``re``: the broker's asyncio streams, the shim's sockets and its
virtual connections feed it bytes. Nothing imports it at interpreter start-up.

Strict on purpose, and stricter than h11 (``tests/broker/test_framing_h11.py`` runs both on generated
and mutated messages and names every rule where they part, :data:`STRICTER`): CRLF only, no obs-fold,
no control characters in field values, no whitespace in chunk-size lines, ``Content-Length`` with
``Transfer-Encoding`` refused, ``Transfer-Encoding`` in HTTP/1.0 refused, HTTP/1.0 and 1.1 only. A message both accept is framed identically.
"""

import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

# -- the grammar (RFC 9110 section 5.6, RFC 9112 sections 2-7), as data --------------------------------

TCHAR = r"!#$%&'*+\-.^_`|~0-9A-Za-z"
TOKEN = "[%s]+" % TCHAR
#: field-vchar = VCHAR / obs-text; SP and HTAB only between them (RFC 9110 5.5).
FIELD_VCHAR = r"[\x21-\x7e\x80-\xff]"
OWS = r"[ \t]*"
FIELD_VALUE = r"(?:{v}+(?:[ \t]+{v}+)*)?".format(v=FIELD_VCHAR)
#: field-line = field-name ":" OWS field-value OWS, CRLF-terminated (RFC 9112 5): no space before ":".
FIELD_LINE = r"({t}):{ows}({v}){ows}\r\n".format(t=TOKEN, ows=OWS, v=FIELD_VALUE)
HTTP_VERSION = r"HTTP/([0-9])\.([0-9])"
#: request-target: any visible ASCII (its forms are the router's business, RFC 9112 3.2).
REQUEST_TARGET = r"[\x21-\x7e]+"
REQUEST_LINE = r"({t}) ({rt}) {v}".format(t=TOKEN, rt=REQUEST_TARGET, v=HTTP_VERSION)
#: A looser shape, only to tell a version we do not speak (505) from garbage (400).
ANY_VERSION_REQUEST_LINE = r"{t} {rt} HTTP/[0-9]+(?:\.[0-9]+)?".format(t=TOKEN, rt=REQUEST_TARGET)
#: status-line = HTTP-version SP status-code SP [ reason-phrase ]; a missing reason tolerated, as h11.
REASON_PHRASE = r"[\t \x21-\x7e\x80-\xff]*"
STATUS_LINE = r"{v} ([0-9]{{3}})(?: ({r}))?".format(v=HTTP_VERSION, r=REASON_PHRASE)
QUOTED_STRING = r'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
#: chunk-ext without the grammar's BWS around ";" and "=" (h11 and others refuse it too).
CHUNK_EXT = r"(?:;{t}(?:=(?:{t}|{q}))?)*".format(t=TOKEN, q=QUOTED_STRING)
HEXDIG = "[0-9A-Fa-f]"


class Limits:
    """Bounds on what one message may make us hold (each over-limit input has its own status)."""

    __slots__ = ("max_head", "max_fields", "max_line", "max_chunk_digits", "max_length_digits")

    def __init__(self, max_head: int = 64 * 1024, max_fields: int = 256, max_line: int = 8 * 1024,
                 max_chunk_digits: int = 16, max_length_digits: int = 18) -> None:
        self.max_head = max_head  # a whole head, request or status line included: 431
        self.max_fields = max_fields  # field lines in a head or a trailer section: 431
        self.max_line = max_line  # a chunk-size line or a trailer line: 400
        self.max_chunk_digits = max_chunk_digits  # hex digits of a chunk size (16: 2**64 - 1)
        self.max_length_digits = max_length_digits  # decimal digits of a Content-Length


LIMITS = Limits()

_FIELD_RE = re.compile(FIELD_LINE)
_REQUEST_LINE_RE = re.compile(REQUEST_LINE)
_ANY_VERSION_RE = re.compile(ANY_VERSION_REQUEST_LINE)
_STATUS_LINE_RE = re.compile(STATUS_LINE)
_TOKEN_RE = re.compile(TOKEN)
_FIELD_VALUE_RE = re.compile(FIELD_VALUE)
_CHUNK_LINE_RE = re.compile((r"(%s{1,%d})%s\r\n" % (HEXDIG, LIMITS.max_chunk_digits, CHUNK_EXT)).encode("latin-1"))
_TRAILER_RE = re.compile(FIELD_LINE.encode("latin-1"))
_DIGITS_RE = re.compile("[0-9]+")

# -- the one error type ----------------------------------------------------------------------------------

#: Rules by which this codec refuses what h11 accepts (each checked against h11 by the differential test).
STRICTER = frozenset({
    "bare-lf",  # a line ended by LF alone (RFC 9112 2.2 lets a recipient accept it; we do not)
    "obs-fold",  # a field line starting with SP/HTAB (RFC 9112 5.2: reject or unfold; we reject)
    "control",  # a control character (not SP/HTAB) in a field value or reason phrase (RFC 9110 5.5)
    "te-with-cl",  # Transfer-Encoding and Content-Length together (RFC 9112 6.3: "ought to be an error")
    "te-http1.0",  # Transfer-Encoding in an HTTP/1.0 request (RFC 9112 6.1: its framing is faulty)
    "version",  # an HTTP version other than 1.0 and 1.1 (505 to a request)
    "chunk-line",  # whitespace or a malformed extension in a chunk-size line (RFC 9112 7.1)
    "trailer-field",  # a trailer line that is not a field line, or a framing field in trailers
    "limit",  # over one of the :class:`Limits`
})


class HttpError(Exception):
    """A message that breaks HTTP/1.1 (or our limits). ``status`` is what a server answers a
    request with (400, 413, 431, 501, 505; 502 for a response); ``rule`` names the broken rule (those
    in :data:`STRICTER` are where h11 would have read on). The message never quotes the input: the
    broker sends it back, and a peer's bytes are not ours to echo."""

    def __init__(self, status: int, message: str, rule: str = "syntax") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.rule = rule


# -- heads --------------------------------------------------------------------------------------------------

Headers = List[Tuple[str, str]]


class _Head:
    __slots__ = ("headers", "_index")

    headers: Headers
    _index: Optional[Dict[str, List[str]]]

    def _fields(self) -> Dict[str, List[str]]:
        index = self._index
        if index is None:
            index = {}
            for k, v in self.headers:
                key = k.lower()
                if key in index:
                    index[key].append(v)
                else:
                    index[key] = [v]
            self._index = index
        return index

    def get(self, name: str) -> Optional[str]:
        """The first value of field ``name`` (case-insensitive), or None."""
        values = self._fields().get(name.lower())
        return values[0] if values else None

    def get_all(self, name: str) -> List[str]:
        return self._fields().get(name.lower(), [])

    def tokens(self, name: str) -> List[str]:
        """The comma-separated elements of every ``name`` field, lower-cased (``Connection: a, b``)."""
        return list_tokens(self._fields().get(name.lower(), ()))


class RequestHead(_Head):
    __slots__ = ("method", "target", "version")

    def __init__(self, method: str, target: str, version: Tuple[int, int], headers: Headers) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self._index: Optional[Dict[str, List[str]]] = None

    def __repr__(self) -> str:
        return "RequestHead(%s %s HTTP/%d.%d, %d fields)" % (self.method, self.target[:100], *self.version,
                                                             len(self.headers))


class ResponseHead(_Head):
    __slots__ = ("version", "status", "reason", "raw_status_line")

    def __init__(self, version: Tuple[int, int], status: int, reason: str, headers: Headers,
                 raw_status_line: str) -> None:
        self.version = version
        self.status = status
        self.reason = reason
        self.headers = headers
        self.raw_status_line = raw_status_line
        self._index: Optional[Dict[str, List[str]]] = None

    def __repr__(self) -> str:
        return "ResponseHead(%d %r, %d fields)" % (self.status, self.reason[:60], len(self.headers))


def list_tokens(values: Sequence[str]) -> List[str]:
    """Elements of comma-separated field values, lower-cased; only SP and HTAB are whitespace
    (``str.strip()`` would eat ``\\xa0``, and a ``chunked\\xa0`` read as ``chunked`` here would
    reach the next hop as something else)."""
    out: List[str] = []
    for v in values:
        for t in v.split(","):
            t = t.strip(" \t")
            if t:
                out.append(t.lower())
    return out


def is_token(text: str) -> bool:
    """Whether ``text`` is a token (a method, a field name, a transfer coding)."""
    return _TOKEN_RE.fullmatch(text) is not None


def head_end(buf: Union[bytes, bytearray], start: int = 0) -> int:
    """The length of the head at the start of ``buf`` (through its empty line), or -1 if incomplete."""
    idx = buf.find(b"\r\n\r\n", start)
    return idx + 4 if idx >= 0 else -1


def _fields(text: str, start: int, limits: Limits) -> Headers:
    """The field lines of ``text[start:]`` (which ends with the empty line's CRLF)."""
    block = text[start:-2]
    if not block:
        return []
    parts = _FIELD_RE.split(block)  # ['', name, value, '', name, value, ..., '']: any text between is bad
    if any(parts[::3]):
        raise _field_error(block)
    if len(parts) > 3 * limits.max_fields:
        raise HttpError(431, "more than %d header fields" % limits.max_fields, "limit")
    return list(zip(parts[1::3], parts[2::3]))


def _field_error(block: str) -> HttpError:
    """Which rule the first bad field line of ``block`` breaks (the slow path: only for refusals)."""
    for line in block.split("\r\n"):
        if not line:
            return HttpError(400, "empty line inside the head")
        if line[0] in " \t":
            return HttpError(400, "obsolete line folding is not accepted", "obs-fold")
        if "\n" in line:
            return HttpError(400, "bare LF in the head", "bare-lf")
        if _FIELD_RE.fullmatch(line + "\r\n"):
            continue
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN_RE.fullmatch(name):
            return HttpError(400, "malformed header line")
        if any(c < " " and c != "\t" or c == "\x7f" for c in value):
            rule = "control" if "\x00" not in value and "\r" not in value else "syntax"
            return HttpError(400, "control character in the value of header %r" % name[:100], rule)
        return HttpError(400, "malformed header line")  # pragma: no cover - no other way
    return HttpError(400, "malformed header section")  # pragma: no cover


def _first_line(data: Union[bytes, bytearray], limits: Limits) -> Tuple[str, int]:
    if len(data) > limits.max_head:
        raise HttpError(431, "head larger than %d bytes" % limits.max_head, "limit")
    text = data.decode("latin-1")
    if not text.endswith("\r\n\r\n"):
        raise HttpError(400, "head does not end with an empty line", "bare-lf" if text.endswith("\n") else "syntax")
    return text, text.find("\r\n")


def parse_request_head(data: Union[bytes, bytearray], limits: Limits = LIMITS) -> RequestHead:
    """A complete request head (through CRLF CRLF) -> :class:`RequestHead`; :class:`HttpError` 400,
    431 or 505 if it is not one we accept."""
    text, end = _first_line(data, limits)
    m = _REQUEST_LINE_RE.fullmatch(text, 0, end)
    if m is None:
        line = text[:end]
        if "\n" in line:
            raise HttpError(400, "bare LF in the request line", "bare-lf")
        if _ANY_VERSION_RE.fullmatch(line):
            raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported", "version")
        raise HttpError(400, "malformed request line")
    method, target, major, minor = m.groups()
    if major != "1" or minor not in ("0", "1"):
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported", "version")
    return RequestHead(method, target, (1, 1) if minor == "1" else (1, 0), _fields(text, end + 2, limits))


def parse_response_head(data: Union[bytes, bytearray], limits: Limits = LIMITS) -> ResponseHead:
    """A complete response head -> :class:`ResponseHead`; :class:`HttpError` (status 502: the
    peer is a server) if it is not one we accept."""
    try:
        text, end = _first_line(data, limits)
        line = text[:end]
        m = _STATUS_LINE_RE.fullmatch(line)
        if m is None:
            if "\n" in line:
                raise HttpError(502, "bare LF in the status line", "bare-lf")
            if re.fullmatch(r"HTTP/[0-9]\.[0-9] [0-9]{3} .*", line, re.S):
                raise HttpError(502, "control character in the reason phrase", "control")
            raise HttpError(502, "malformed status line")
        major, minor, code, reason = m.groups()
        if major != "1" or minor not in ("0", "1"):
            raise HttpError(502, "only HTTP/1.0 and HTTP/1.1 responses are read", "version")
        status = int(code)
        if status < 100:
            raise HttpError(502, "status code %s below 100" % code)
        return ResponseHead((1, int(minor)), status, reason or "", _fields(text, end + 2, limits), line)
    except HttpError as exc:
        exc.status = 502
        raise


# -- framing ----------------------------------------------------------------------------------------------

Framing = Tuple[str, int]
NO_BODY: Framing = ("none", 0)


def _content_length(values: List[str], limits: Limits) -> int:
    lengths = {v.strip(" \t") for c in values for v in c.split(",")}
    if len(lengths) != 1:
        raise HttpError(400, "conflicting Content-Length")
    v = lengths.pop()
    if not _DIGITS_RE.fullmatch(v):  # ASCII digits: "²".isdigit() is true, and int("²") raises
        raise HttpError(400, "invalid Content-Length")
    if len(v) > limits.max_length_digits:
        raise HttpError(400, "Content-Length with more than %d digits" % limits.max_length_digits, "limit")
    return int(v)


def _transfer_codings(values: List[str]) -> List[str]:
    codings = []
    for value in values:
        for t in value.split(","):
            t = t.strip(" \t")
            if not t:
                raise HttpError(400, "empty element in Transfer-Encoding")  # one reading only, as h11
            codings.append(t.lower())
    return codings


def request_framing(head: RequestHead, limits: Limits = LIMITS) -> Framing:
    """How a request body ends (RFC 9112 6.3): ``("none", 0)``, ``("length", n)`` or
    ``("chunked", 0)``; 400 if ambiguous, 501 for a transfer coding other than ``chunked``.

    ``Transfer-Encoding`` in an HTTP/1.0 request is 400 (RFC 9112 6.1: its framing is faulty): an
    HTTP/1.0 recipient does not know the field, so a chunked body it reads as no body at all would
    be read as the next request (a proxy passing it on would smuggle that request past its policy).
    """
    fields = head._fields()
    te = fields.get("transfer-encoding")
    cl = fields.get("content-length")
    if te is not None:
        codings = _transfer_codings(te)
        if cl is not None:
            raise HttpError(400, "both Content-Length and Transfer-Encoding", "te-with-cl")
        if head.version == (1, 0):
            raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request", "te-http1.0")
        if codings != ["chunked"]:
            raise HttpError(501, "unsupported Transfer-Encoding")
        return "chunked", 0
    if cl is not None:
        n = _content_length(cl, limits)
        return ("length", n) if n else NO_BODY
    return NO_BODY


def response_framing(head: ResponseHead, request_method: str, limits: Limits = LIMITS) -> Framing:
    """How a response body ends: ``none``, ``length``, ``chunked`` or ``close`` (read to EOF).

    No body for ``HEAD``, 1xx, 204, 304 and a 2xx to ``CONNECT`` (RFC 9110 6.4.1). A transfer
    coding list ending in ``chunked`` is chunked; any other is read to EOF (RFC 9112 6.3 rule 4).
    With ``Content-Length`` beside ``Transfer-Encoding`` it is an error (502), never a guess: a
    proxy passing both on would let its client pick the other one.
    """
    status = head.status
    fields = head._fields()
    te = fields.get("transfer-encoding")
    cl = fields.get("content-length")
    framing: Framing = ("close", 0)
    try:  # checked even where no body follows: a proxy passes these fields on
        if te is not None:
            codings = _transfer_codings(te)
            if cl is not None:
                raise HttpError(502, "both Content-Length and Transfer-Encoding", "te-with-cl")
            if codings[-1] == "chunked" and "chunked" not in codings[:-1]:
                framing = ("chunked", 0)
            elif "chunked" in codings:
                raise HttpError(502, "chunked applied twice or not last")
        elif cl is not None:
            framing = ("length", _content_length(cl, limits))
    except HttpError as exc:
        exc.status = 502
        raise
    if (request_method == "HEAD" or status < 200 or status in (204, 304)
            or (request_method == "CONNECT" and status < 300)):
        return NO_BODY
    return framing


# -- chunked bodies ---------------------------------------------------------------------------------------

#: Field names a trailer section may not carry (RFC 9110 6.5.1: framing and routing are head-only).
_TRAILER_FORBIDDEN = frozenset({b"content-length", b"transfer-encoding", b"host"})


def chunk_size(line: Union[bytes, bytearray], limits: Limits = LIMITS) -> int:
    """The size in a chunk-size line (with its CRLF): hex digits, optional extensions, CRLF; nothing
    lenient (no ``0x``, ``_``, sign, whitespace or bare LF). 400 otherwise."""
    m = _CHUNK_LINE_RE.fullmatch(line)
    if m is None:
        raise _chunk_error(bytes(line), limits)
    return int(m.group(1), 16)


def _chunk_error(line: bytes, limits: Limits) -> HttpError:
    if not line.endswith(b"\r\n"):
        return HttpError(400, "chunk-size line not ended by CRLF", "bare-lf" if line.endswith(b"\n") else "syntax")
    m = re.match(rb"[0-9A-Fa-f]+", line)
    if m is None:
        return HttpError(400, "bad chunk size")
    if m.end() > limits.max_chunk_digits:
        return HttpError(400, "chunk size with more than %d digits" % limits.max_chunk_digits, "limit")
    rest = line[m.end():-2]
    if b"\n" in rest:
        return HttpError(400, "bare LF in a chunk-size line", "bare-lf")
    if rest.startswith(b";") or rest.strip(b" \t") == b"" or rest.rstrip(b" \t").startswith(b";"):
        return HttpError(400, "bad chunk extension or whitespace in a chunk-size line", "chunk-line")
    return HttpError(400, "bad chunk size line")


def check_trailer(line: Union[bytes, bytearray]) -> None:
    """A trailer line (with its CRLF) must be a field line, and not a framing one: a request line
    there is refused, so nothing can ride in a trailer."""
    m = _TRAILER_RE.fullmatch(line)
    if m is None:
        rule = "bare-lf" if b"\n" in line[:-1] or not line.endswith(b"\r\n") else "trailer-field"
        raise HttpError(400, "bad trailer line", rule)
    if m.group(1).lower() in _TRAILER_FORBIDDEN:
        raise HttpError(400, "framing field %r in trailers" % m.group(1).decode("latin-1"), "trailer-field")


class ChunkedDecoder:
    """A chunked body, incrementally: ``feed`` bytes, get the data they complete; ``done`` once the
    last chunk and the trailer section are in, ``unused`` is then what followed them (the next
    message). ``limit`` bounds the decoded size (413 as soon as a chunk size says it is over)."""

    __slots__ = ("limits", "limit", "done", "trailers", "unused", "size", "_buf", "_state", "_left")

    def __init__(self, limit: Optional[int] = None, limits: Limits = LIMITS) -> None:
        self.limits = limits
        self.limit = limit
        self.done = False
        self.trailers: List[bytes] = []  # the trailer lines as received, CRLF included
        self.unused = b""
        self.size = 0
        self._buf = bytearray()
        self._state = 0  # 0 size line, 1 data, 2 CRLF after data, 3 trailer lines
        self._left = 0

    def feed(self, data: Union[bytes, bytearray]) -> bytes:
        if self.done:
            self.unused += data
            return b""
        buf = self._buf
        buf += data
        out = bytearray()
        pos = 0
        n = len(buf)
        while pos < n:
            state = self._state
            if state == 1:
                take = min(self._left, n - pos)
                out += buf[pos:pos + take]
                pos += take
                self._left -= take
                if self._left == 0:
                    self._state = 2
            elif state == 2:
                if n - pos < 2:
                    if buf[pos] != 13:
                        raise HttpError(400, "chunk data not followed by CRLF")
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise HttpError(400, "chunk data not followed by CRLF")
                pos += 2
                self._state = 0
            else:
                end = buf.find(b"\n", pos)
                if end < 0:
                    if n - pos > self.limits.max_line:
                        raise HttpError(400, "chunk-size or trailer line over %d bytes" % self.limits.max_line, "limit")
                    break
                if end - pos >= self.limits.max_line:
                    raise HttpError(400, "chunk-size or trailer line over %d bytes" % self.limits.max_line, "limit")
                line = buf[pos:end + 1]
                pos = end + 1
                if state == 0:
                    size = chunk_size(line, self.limits)
                    if self.limit is not None and self.size + size > self.limit:
                        raise HttpError(413, "body larger than %d bytes" % self.limit, "limit")
                    self.size += size
                    if size:
                        self._state, self._left = 1, size
                    else:
                        self._state = 3
                elif line == b"\r\n":
                    self.done = True
                    self.unused = bytes(buf[pos:])
                    pos = n
                else:
                    check_trailer(line)
                    if len(self.trailers) >= self.limits.max_fields:
                        raise HttpError(431, "more than %d trailer fields" % self.limits.max_fields, "limit")
                    self.trailers.append(bytes(line))
        del buf[:pos]
        return bytes(out)

    def feed_eof(self) -> None:
        """The peer closed: an error unless the body was complete."""
        if not self.done:
            raise HttpError(400, "connection closed inside a chunked body")


def trailer_fields(lines: List[bytes]) -> Headers:
    """Trailer lines (as :attr:`ChunkedDecoder.trailers` keeps them) as (name, value) pairs."""
    out = []
    for line in lines:
        m = _TRAILER_RE.fullmatch(line)
        if m is not None:
            out.append((m.group(1).decode("latin-1"), m.group(2).decode("latin-1")))
    return out


__all__ = [
    "HttpError", "Limits", "LIMITS", "STRICTER", "RequestHead", "ResponseHead", "Headers", "Framing",
    "head_end", "parse_request_head", "parse_response_head", "request_framing", "response_framing",
    "chunk_size", "check_trailer", "ChunkedDecoder", "list_tokens", "trailer_fields", "is_token",
]
