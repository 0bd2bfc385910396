"""Differential: the package's HTTP/1.1 codec (agenshield_shim/http1.py) and the broker's readers on
it, against h11 (test-only), on generated and mutated requests, responses and chunked bodies.

The codec side: where the codec accepts a message, h11 accepts it too and frames it the same way
(same method or status, same body bytes, same end: the bytes after it are the next message);
where only the codec refuses, its error names a rule of ``http1.STRICTER`` and the message shows
it (a bare LF, a control character, ``Content-Length`` beside ``Transfer-Encoding``...); where only
h11 refuses, the message is one of the two declared leniencies (empty lines before a request,
RFC 9112 2.2; a response transfer coding other than ``chunked``, read to EOF by RFC 9112 6.3).

The codec's runs are also compared with the broker's own Stream readers on the same bytes (same
reading), and each STRICTER rule has one example h11 reads. A larger run: H11_EXAMPLES=8000 (and
``--timeout=0`` or calling the test functions directly: the broker tree's default timeout is 60 s).

The broker side, first below: its chunked-body reader against h11. The broker forwards chunked bodies byte for byte, so wherever it accepts a body it must
end it exactly where a strict HTTP/1.1 parser does, with the same data; otherwise the bytes after
the end it saw are a request the upstream reads and the policy never saw (issue 15, smuggling).

One direction is required: broker accepts => h11 accepts, same data, same end. The broker may
refuse more than h11 (it is stricter on purpose: no bare LF, trailer lines must be fields),
never less. Found by this test and fixed: the broker took whitespace around ``;`` in a chunk
extension, which h11 refuses.
"""

import os
import asyncio
from typing import Any, List, Optional, Tuple

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import re

from agenshield_shim import http1
from agenshield_shim.broker.http1 import HttpError, ProtocolError, Stream, check_host, copy_chunked, read_body

HEAD = b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
NEXT = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"


def h11_frame(body: bytes) -> Optional[Tuple[bytes, bytes]]:
    """(data, bytes after the body) as h11 reads ``body``, or None if h11 refuses it."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(HEAD + body + NEXT)
    data = b""
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Data):
                data += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            elif event is h11.NEED_DATA:
                return None
    except h11.RemoteProtocolError:
        return None
    rest = bytes(conn.trailing_data[0])
    return data, rest


class _Feed:
    """A Stream over fixed bytes (the broker reads only through ``Stream``)."""

    @staticmethod
    def stream(data: bytes) -> Stream:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return Stream(reader, None)  # type: ignore[arg-type]  # nothing is written


def broker_frame(body: bytes) -> Optional[Tuple[bytes, bytes, bytes]]:
    """(data, bytes after the body, bytes forwarded) as the broker reads ``body``; None if refused."""

    async def run() -> Optional[Tuple[bytes, bytes, bytes]]:
        src = _Feed.stream(body + NEXT)
        try:
            data = await read_body(src, ("chunked", 0), 1 << 20)
        except (HttpError, ProtocolError):
            return None
        rest = bytes(src.buf) + await src.reader.read()
        copied: List[bytes] = []

        async def sink(b: bytes) -> None:
            copied.append(b)

        src2 = _Feed.stream(body + NEXT)
        await copy_chunked(src2, sink)
        rest2 = bytes(src2.buf) + await src2.reader.read()
        assert rest2 == rest, "the forwarding copier and the reader end the body in different places"
        return data, rest, b"".join(copied)

    return asyncio.run(run())


def _chunk(data: bytes, ext: bytes = b"") -> bytes:
    return b"%x%s\r\n%s\r\n" % (len(data), ext, data)


@st.composite
def chunked_bodies(draw: Any) -> bytes:
    parts = draw(st.lists(st.binary(min_size=1, max_size=20), max_size=4))
    exts = st.sampled_from([b"", b";a", b";a=b", b';a="q s"', b" ;a", b";a =b", b"; a"])
    body = b"".join(_chunk(p, draw(exts)) for p in parts)
    body += b"0" + draw(exts) + b"\r\n"
    trailers = draw(st.lists(st.sampled_from([b"X-T: 1\r\n", b"X-U:\r\n", b"Bad Trailer\r\n", b"GET / HTTP/1.1\r\n"]),
                             max_size=2))
    return body + b"".join(trailers) + b"\r\n"


_MUTATIONS = [b"\n", b"\r", b" ", b"\t", b"0", b"x", b";", b"_", b"\x00", b"\xa0", b"\r\n", b"0x"]


def _mutate(draw: Any, message: bytes, pieces: List[bytes], most: int) -> bytes:
    """Up to ``most`` edits at drawn places: a byte deleted, replaced or preceded by one of ``pieces``."""
    buf = bytearray(message)
    for _ in range(draw(st.integers(1, most))):
        if not buf:
            break
        i = draw(st.integers(0, len(buf) - 1))
        how = draw(st.sampled_from(["insert", "replace", "delete"]))
        if how == "delete":
            del buf[i]
        else:
            buf[i:i + (1 if how == "replace" else 0)] = draw(st.sampled_from(pieces))
    return bytes(buf)


@st.composite
def mutated(draw: Any) -> bytes:
    return _mutate(draw, draw(chunked_bodies()), _MUTATIONS, 3)


def _check(body: bytes) -> None:
    ours = broker_frame(body)
    if ours is None:
        return  # the broker refused: nothing is forwarded, nothing can be smuggled
    data, rest, copied = ours
    ref = h11_frame(body)
    assert ref is not None, "the broker accepts a chunked body h11 refuses: %r" % body
    assert (data, rest) == ref, "the broker and h11 end or decode %r differently" % body
    assert copied + rest == body + NEXT  # forwarded exactly what it framed, nothing after it


@settings(max_examples=150, deadline=None)
@given(body=chunked_bodies())
def test_generated_chunked_bodies_frame_as_h11_does(body: bytes) -> None:
    _check(body)


@settings(max_examples=int(os.environ.get("H11_EXAMPLES", "400")), deadline=None)
@given(body=mutated())
def test_mutated_chunked_bodies_never_frame_differently(body: bytes) -> None:
    _check(body)


def test_known_smuggling_shapes_are_refused() -> None:
    for body in (b"0\r\nGET /bytes HTTP/1.1\r\n\r\n", b"0\r\n\n", b"0\n\r\n", b"1_0\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n",
                 b"0x4\r\nabcd\r\n0\r\n\r\n", b"4 \r\nabcd\r\n0\r\n\r\n"):
        assert broker_frame(body) is None, body
    assert broker_frame(b"4;a=b\r\nabcd\r\n0\r\nX-T: 1\r\n\r\n") is not None


# -- request heads: accept/reject and body framing ---------------------------------------------------------


def h11_request(message: bytes) -> Optional[Tuple[str, bytes, bytes]]:
    """(method, body, bytes after the message) as h11 reads ``message + NEXT``; None if refused.

    Empty lines before the request line are dropped first: RFC 9112 section 2.2 lets a server ignore
    them, and the broker does (``Stream.read_head``); h11 refuses them. The one declared difference.
    """
    while message.startswith(b"\r\n"):
        message = message[2:]
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(message + NEXT)
    method, data = "", b""
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Request):
                method = event.method.decode("latin-1")
            elif isinstance(event, h11.Data):
                data += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            elif event is h11.NEED_DATA:
                return None
    except h11.RemoteProtocolError:
        return None
    return method, data, bytes(conn.trailing_data[0])


def broker_request(message: bytes) -> Optional[Tuple[str, bytes, bytes]]:
    from agenshield_shim.broker.http1 import parse_request_head, request_framing

    async def run() -> Optional[Tuple[str, bytes, bytes]]:
        src = _Feed.stream(message + NEXT)
        try:
            raw = await src.read_head(64 * 1024, 5.0, 5.0)
            if raw is None:
                return None
            head = parse_request_head(raw)
            check_host(head)  # the broker's routes' rule (h11 refuses such a request too)
            data = await read_body(src, request_framing(head), 1 << 20)
        except (HttpError, ProtocolError):
            return None
        return head.method, data, bytes(src.buf) + await src.reader.read()

    return asyncio.run(run())


@st.composite
def request_messages(draw: Any) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
    body = draw(st.binary(max_size=12))
    headers = [b"Host: x"]
    framing = draw(st.sampled_from(["length", "chunked", "none", "both", "two-lengths"]))
    if framing in ("length", "both"):
        headers.append(b"Content-Length: %d" % len(body))
    if framing == "two-lengths":
        headers += [b"Content-Length: %d" % len(body), b"Content-Length: %d" % (len(body) + 1)]
    if framing in ("chunked", "both"):
        headers.append(b"Transfer-Encoding: chunked")
        body = (_chunk(body) if body else b"") + b"0\r\n\r\n"
    if framing == "none":
        body = b""
    headers += draw(st.lists(st.sampled_from([b"X-A: 1", b"X-B:  spaced  ", b"Accept: */*"]), max_size=2))
    return b"%s /p %s\r\n%s\r\n\r\n%s" % (method, version, b"\r\n".join(headers), body)


_HEAD_MUTATIONS = [b" ", b"\t", b"\r", b"\n", b"\r\n", b":", b"\x00", b"\xa0", b"\xb2", b"0", b",", b"chunked", b"-"]


@st.composite
def mutated_requests(draw: Any) -> bytes:
    return _mutate(draw, draw(request_messages()), _HEAD_MUTATIONS, 2)


def _check_request(message: bytes) -> None:
    ours = broker_request(message)
    if ours is None:
        return
    ref = h11_request(message)
    assert ref is not None, "the broker accepts a request h11 refuses: %r" % message
    assert ours == ref, "the broker and h11 frame %r differently: %r != %r" % (message, ours, ref)


@settings(max_examples=150, deadline=None)
@given(message=request_messages())
def test_generated_requests_frame_as_h11_does(message: bytes) -> None:
    _check_request(message)


@settings(max_examples=int(os.environ.get("H11_EXAMPLES", "400")), deadline=None)
@given(message=mutated_requests())
def test_mutated_requests_never_frame_differently(message: bytes) -> None:
    _check_request(message)



# == the codec itself, sans IO ===============================================================================

NEXT_RESPONSE = b"HTTP/1.1 204 No Content\r\n\r\n"
_CONTROL = frozenset(range(0, 9)) | frozenset(range(10, 32)) - {13} | {127}


class Refused(Exception):
    """The codec refused: ``rule`` says which of its rules."""

    def __init__(self, rule: str) -> None:
        super().__init__(rule)
        self.rule = rule


def _split_feed(decoder: http1.ChunkedDecoder, data: bytes, cut: int) -> bytes:
    """Feed in two pieces (the decoder is incremental: where a read ends must not matter)."""
    return decoder.feed(data[:cut]) + decoder.feed(data[cut:])


def codec_request(message: bytes, cut: int = 7) -> Tuple[str, str, bytes, bytes]:
    """(method, target, body, bytes after the message) as the codec reads ``message + NEXT``."""
    data = message + NEXT
    while data.startswith(b"\r\n"):  # RFC 9112 2.2, as the broker's Stream and the shim's assembler
        data = data[2:]
    end = http1.head_end(data)
    try:
        assert end > 0, "NEXT always completes a head"
        head = http1.parse_request_head(data[:end])
        try:
            check_host(head)  # the routes' rule (RFC 9112 3.2), not a framing one; h11 has it too
        except http1.HttpError:
            raise Refused("host") from None
        kind, n = http1.request_framing(head)
        rest = data[end:]
        if kind == "chunked":
            decoder = http1.ChunkedDecoder()
            body = _split_feed(decoder, rest, cut)
            if not decoder.done:
                raise Refused("incomplete")
            rest = decoder.unused
        else:
            body, rest = rest[:n], rest[n:]
            if len(body) < n:
                raise Refused("incomplete")
    except http1.HttpError as exc:
        raise Refused(exc.rule) from None
    return head.method, head.target, body, rest


def h11_request_full(message: bytes) -> Optional[Tuple[str, str, bytes, bytes]]:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(message + NEXT)
    method, target, data = "", "", b""
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Request):
                method, target = event.method.decode("latin-1"), event.target.decode("latin-1")
            elif isinstance(event, h11.Data):
                data += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            elif event is h11.NEED_DATA:
                return None
    except h11.RemoteProtocolError:
        return None
    return method, target, data, bytes(conn.trailing_data[0])


def codec_response(message: bytes, method: str, cut: int = 7) -> Tuple[int, str, bytes, bytes]:
    """(status, framing, body, bytes after it) as the codec reads ``message + NEXT_RESPONSE`` then EOF;
    interim (1xx) responses are skipped, as every client does."""
    data = message + NEXT_RESPONSE
    try:
        while True:
            end = http1.head_end(data)
            if end < 0:
                raise Refused("incomplete")
            head = http1.parse_response_head(data[:end])
            data = data[end:]
            if head.status >= 200:
                break
        kind, n = http1.response_framing(head, method)
        if kind == "chunked":
            decoder = http1.ChunkedDecoder()
            body = _split_feed(decoder, data, cut)
            decoder.feed_eof()
            rest = decoder.unused
        elif kind == "close":
            body, rest = data, b""
        else:
            body, rest = data[:n], data[n:]
            if len(body) < n:
                raise Refused("incomplete")
    except http1.HttpError as exc:
        raise Refused(exc.rule) from None
    return head.status, kind, body, rest


def h11_response(message: bytes, method: str) -> Optional[Tuple[int, bytes, bytes]]:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(message + NEXT_RESPONSE)
    conn.receive_data(b"")
    status, data = 0, b""
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                data += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                return None
    except h11.RemoteProtocolError:
        return None
    return status, data, bytes(conn.trailing_data[0])


def _shows(rule: str, message: bytes) -> bool:
    """Independent evidence that ``message`` breaks ``rule`` (so a refusal h11 does not share is
    the declared rule, not a codec bug hiding behind its name)."""
    low = message.lower()
    return {
        "bare-lf": re.search(rb"(?<!\r)\n", message) is not None,
        "obs-fold": re.search(rb"\n[ \t]", message) is not None,
        "control": any(b in _CONTROL for b in message),
        "te-with-cl": b"transfer-encoding" in low and b"content-length" in low,
        "te-http1.0": b"transfer-encoding" in low and re.match(rb"(\r\n)*[^\r\n]* HTTP/1\.0\r\n", message) is not None,
        "version": re.search(rb"HTTP/(?!1\.[01])[0-9]\.[0-9]", message) is not None,
        "chunk-line": b"chunked" in low,
        "trailer-field": b"chunked" in low,
        "limit": True,
    }.get(rule, False)


def _differ(ours: Any, ref: Any, message: bytes, lenient: bool) -> None:
    if isinstance(ours, Refused):
        if ours.rule == "host":  # the routes' Host rule (RFC 9112 3.2): h11 has it, so it is not STRICTER
            assert ref is None, "the Host rule refuses %r, h11 accepts it" % message
            return
        if ref is None:
            return  # both refuse
        assert ours.rule in http1.STRICTER, "the codec refuses %r (rule %s), h11 accepts it" % (message, ours.rule)
        assert _shows(ours.rule, message), "refused %r by rule %s, which it does not break" % (message, ours.rule)
        return
    if ref is None:
        assert lenient, "the codec accepts %r, h11 refuses it: %r" % (message, ours)
        return
    assert ours == ref, "the codec and h11 frame %r differently: %r != %r" % (message, ours, ref)


def _check_codec_request(message: bytes, cut: int) -> None:
    try:
        ours: Any = codec_request(message, cut)
    except Refused as exc:
        ours = exc
    ref = h11_request_full(message)
    _differ(ours, ref, message, lenient=message.startswith(b"\r\n"))
    broker = broker_request(message)  # the broker's Stream and read_body on the codec: the same reading
    if isinstance(ours, Refused):
        assert broker is None, "the broker accepts %r, the codec (or the Host rule) refuses it" % message
    else:
        assert broker == (ours[0], ours[2], ours[3]), "the broker and the codec frame %r differently" % message


_REQUEST_EXTRAS = [b"X-A: 1", b"X-B:  spaced  ", b"Accept: */*", b"X-C: \xe9t\xe9", b"X-D:", b"Host: y",
                   b"Transfer-Encoding: chunked", b"Content-Length: 3", b"Transfer-Encoding: gzip, chunked",
                   b"Content-Length: 00", b"Content-Length: 4, 4", b"Transfer-Encoding: Chunked"]


@st.composite
def codec_requests(draw: Any) -> bytes:
    message = bytearray(draw(request_messages()))
    end = message.index(b"\r\n\r\n")
    extra = draw(st.lists(st.sampled_from(_REQUEST_EXTRAS), max_size=2))
    message[end:end] = b"".join(b"\r\n" + e for e in extra)
    if draw(st.booleans()):
        message[:0] = draw(st.sampled_from([b"\r\n", b"\r\n\r\n"]))
    if draw(st.integers(0, 3)) == 0:
        first = message.index(b" HTTP/1.")
        message[first:first + 9] = b" " + draw(st.sampled_from([b"HTTP/1.2", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.0"]))
    return bytes(message)


@st.composite
def mutated_codec_requests(draw: Any) -> bytes:
    return _mutate(draw, draw(codec_requests()), _HEAD_MUTATIONS + [b"\x01", b"\x7f"], 3)


@settings(max_examples=300, deadline=None)
@given(message=codec_requests(), cut=st.integers(0, 40))
def test_codec_generated_requests_as_h11(message: bytes, cut: int) -> None:
    _check_codec_request(message, cut)


@settings(max_examples=int(os.environ.get("H11_EXAMPLES", "600")), deadline=None)
@given(message=mutated_codec_requests(), cut=st.integers(0, 40))
def test_codec_mutated_requests_as_h11(message: bytes, cut: int) -> None:
    _check_codec_request(message, cut)


# -- responses --------------------------------------------------------------------------------------------------

@st.composite
def response_messages(draw: Any) -> Tuple[bytes, str]:
    method = draw(st.sampled_from(["GET", "POST", "HEAD"]))
    status = draw(st.sampled_from([b"200 OK", b"201 Created", b"204 No Content", b"304 Not Modified", b"404 Not Found",
                                   b"500", b"200 ", b"299 x\ty", b"999 Odd", b"200 caf\xe9"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    body = draw(st.binary(max_size=12))
    framing = draw(st.sampled_from(["length", "chunked", "close", "both", "two-lengths", "gzip-chunked", "gzip"]))
    headers = [b"Server: t"]
    if framing in ("length", "both"):
        headers.append(b"Content-Length: %d" % len(body))
    if framing == "two-lengths":
        headers += [b"Content-Length: %d" % len(body), b"Content-Length: %d" % (len(body) + 1)]
    if framing in ("chunked", "both", "gzip-chunked"):
        headers.append(b"Transfer-Encoding: " + (b"gzip, chunked" if framing == "gzip-chunked" else b"chunked"))
        trailer = draw(st.sampled_from([b"", b"X-T: 1\r\n", b"Content-Length: 1\r\n"]))
        ext = draw(st.sampled_from([b"", b";a=b", b';q="x y"']))
        body = (_chunk(body, ext) if body else b"") + b"0\r\n" + trailer + b"\r\n"
    if framing == "gzip":
        headers.append(b"Transfer-Encoding: gzip")
    headers += draw(st.lists(st.sampled_from([b"X-A: 1", b"Set-Cookie: a=b; Path=/", b"X-E:"]), max_size=2))
    interim = draw(st.sampled_from([b"", b"", b"HTTP/1.1 100 Continue\r\n\r\n",
                                    b"HTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n"]))
    message = interim + b"%s %s\r\n%s\r\n\r\n%s" % (version, status, b"\r\n".join(headers), body)
    return message, method


@st.composite
def mutated_responses(draw: Any) -> Tuple[bytes, str]:
    message, method = draw(response_messages())
    return _mutate(draw, message, _HEAD_MUTATIONS + [b"\x01", b"\x7f", b";"], 3), method


def _check_response(message: bytes, method: str, cut: int) -> None:
    try:
        ours: Any = codec_response(message, method, cut)
    except Refused as exc:
        ours = exc
    ref = h11_response(message, method)
    if isinstance(ours, Refused) or ref is None:
        te = re.findall(rb"(?im)^transfer-encoding:([^\r\n]*)", message)
        lenient = any(t.strip(b" \t").lower() != b"chunked" for t in te)  # RFC 9112 6.3: read to EOF
        _differ(ours, ref, message, lenient)
        return
    status, kind, body, rest = ours
    assert (status, body, rest) == ref, "the codec (%s) and h11 frame %r differently: %r != %r" % (
        kind, message, ours, ref)


@settings(max_examples=300, deadline=None)
@given(pair=response_messages(), cut=st.integers(0, 40))
def test_codec_generated_responses_as_h11(pair: Tuple[bytes, str], cut: int) -> None:
    _check_response(pair[0], pair[1], cut)


@settings(max_examples=int(os.environ.get("H11_EXAMPLES", "600")), deadline=None)
@given(pair=mutated_responses(), cut=st.integers(0, 40))
def test_codec_mutated_responses_as_h11(pair: Tuple[bytes, str], cut: int) -> None:
    _check_response(pair[0], pair[1], cut)


# -- the chunked decoder ------------------------------------------------------------------------------------------

def codec_chunked(body: bytes, cuts: List[int]) -> Tuple[bytes, bytes]:
    decoder = http1.ChunkedDecoder()
    data, out, pos = body + NEXT, b"", 0
    for cut in sorted(c % (len(data) + 1) for c in cuts) + [len(data)]:
        out += decoder.feed(data[pos:cut])
        pos = max(pos, cut)
    if not decoder.done:
        raise Refused("incomplete")
    return out, decoder.unused


def _check_chunked(body: bytes, cuts: List[int]) -> None:
    try:
        ours: Any = codec_chunked(body, cuts)
    except http1.HttpError as exc:
        ours = Refused(exc.rule)
    except Refused as exc:
        ours = exc
    _differ(ours, h11_frame(body), b"Transfer-Encoding: chunked\r\n" + body, lenient=False)
    broker = broker_frame(body)  # the broker's copier and reader: the codec's reading, byte for byte
    assert (broker is None) == isinstance(ours, Refused), "the broker and the codec disagree on %r" % body
    if broker is not None:
        assert broker[:2] == ours


@settings(max_examples=300, deadline=None)
@given(body=chunked_bodies(), cuts=st.lists(st.integers(0, 200), max_size=4))
def test_codec_generated_chunked_as_h11(body: bytes, cuts: List[int]) -> None:
    _check_chunked(body, cuts)


@settings(max_examples=int(os.environ.get("H11_EXAMPLES", "600")), deadline=None)
@given(body=mutated(), cuts=st.lists(st.integers(0, 200), max_size=4))
def test_codec_mutated_chunked_as_h11(body: bytes, cuts: List[int]) -> None:
    _check_chunked(body, cuts)


@pytest.mark.parametrize("message,rule", [
    (b"GET / HTTP/1.1\nHost: x\n\n", "bare-lf"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n", "obs-fold"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x01b\r\n\r\n", "control"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "te-with-cl"),
    (b"POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n", "te-http1.0"),
    (b"GET / HTTP/1.2\r\nHost: x\r\n\r\n", "version"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4 \r\nabcd\r\n0\r\n\r\n", "chunk-line"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nContent-Length: 5\r\n\r\n", "trailer-field"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n00000000000000004\r\nabcd\r\n0\r\n\r\n", "limit"),
])
def test_each_stricter_rule_is_one_h11_does_not_have(message: bytes, rule: str) -> None:
    """Every rule of http1.STRICTER, shown on one message h11 reads and the codec refuses."""
    assert h11_request_full(message) is not None
    with pytest.raises(Refused) as info:
        codec_request(message)
    assert info.value.rule == rule and rule in http1.STRICTER
    assert len(http1.STRICTER) == 9  # a new rule needs its example here


def test_codec_statuses_for_bad_requests() -> None:
    """The statuses PROTOCOL.md documents for bad heads come from the codec's one error type."""
    cases = {
        b"GET / HTTP/1.2\r\nHost: x\r\n\r\n": 505,
        b"GET / HTTP/2\r\n\r\n": 505,
        b"GET / HTTP/1.1\r\nHost: x\r\n X: y\r\n\r\n": 400,
        b"GET / HTTP/1.1\r\nHost : x\r\n\r\n": 400,
        b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 300 + b"\r\n": 431,
    }
    for raw, status in cases.items():
        with pytest.raises(http1.HttpError) as info:
            http1.parse_request_head(raw)
        assert info.value.status == status, raw
    framing = {
        b"Content-Length: \xb2": 400, b"Content-Length: 1\r\nContent-Length: 2": 400,
        b"Content-Length: 1\r\nTransfer-Encoding: chunked": 400, b"Transfer-Encoding: chunked\xa0": 501,
        b"Transfer-Encoding: gzip": 501, b"Transfer-Encoding: chunked, chunked": 501,
        b"Transfer-Encoding: chunked,": 400,
    }
    for fields, status in framing.items():
        head = http1.parse_request_head(b"POST / HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n\r\n")
        with pytest.raises(http1.HttpError) as info:
            http1.request_framing(head)
        assert info.value.status == status, fields
    for fields in (b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked\xa0"):
        head = http1.parse_request_head(b"POST / HTTP/1.0\r\n" + fields + b"\r\n\r\n")
        with pytest.raises(http1.HttpError) as info:  # RFC 9112 6.1: faulty framing, whatever the coding
            http1.request_framing(head)
        assert (info.value.status, info.value.rule) == (400, "te-http1.0"), fields
    decoder = http1.ChunkedDecoder(limit=10)
    with pytest.raises(http1.HttpError) as info:
        decoder.feed(b"5\r\nabcde\r\n6\r\n")
    assert info.value.status == 413


def test_response_framing_rules() -> None:
    def framing(raw: bytes, method: str = "GET") -> Tuple[str, int]:
        return http1.response_framing(http1.parse_response_head(raw), method)

    assert framing(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", "HEAD") == ("none", 0)
    assert framing(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n") == ("none", 0)
    assert framing(b"HTTP/1.1 200 Connection Established\r\n\r\n", "CONNECT") == ("none", 0)
    assert framing(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n") == ("chunked", 0)
    assert framing(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n") == ("close", 0)
    assert framing(b"HTTP/1.0 200 OK\r\n\r\n") == ("close", 0)
    for bad in (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip, chunked\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n"):
        with pytest.raises(http1.HttpError) as info:
            framing(bad)
        assert info.value.status == 502


# -- the broker reads its upstreams with the codec -------------------------------------------------------------

def _one_answer_upstream(answer: bytes) -> Tuple[Any, int]:
    """A loopback upstream that answers every connection's first head with ``answer``, then closes."""
    import socket
    import threading

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)

    def serve() -> None:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                got = conn.recv(65536)
                if not got:
                    return
                data += got
            conn.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    return sock, sock.getsockname()[1]


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.2 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\nContent-Length: 5\r\n\r\nhello",
])
def test_a_response_the_codec_refuses_is_502(broker: Any, answer: bytes) -> None:
    """A proxy that passed ``Transfer-Encoding`` and ``Content-Length`` on would let its client pick
    the other reading; the broker refuses such an answer (502, ``network-error``) and forwards none of it."""
    from .conftest import raw_exchange, status_of

    sock, port = _one_answer_upstream(answer)
    try:
        out = raw_exchange(broker.port, b"GET http://127.0.0.1:%d/x HTTP/1.1\r\nHost: x\r\n\r\n" % port)
    finally:
        sock.close()
    assert status_of(out) == 502 and b"X-Proxy-Error: network-error" in out and b"hello" not in out


def test_max_head_size_is_the_brokers_not_the_codecs_default(make_broker: Any) -> None:
    """``--max-head-size`` above the codec's 64 KiB default is honoured (the codec does not cut it again)."""
    from .conftest import raw_exchange, status_of

    b = make_broker(max_head_size=256 * 1024)
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\nConnection: close\r\n\r\n"
    assert status_of(raw_exchange(b.port, head)) == 200
