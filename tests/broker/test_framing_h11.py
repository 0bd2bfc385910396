"""Differential: the broker's chunked-body reader against h11 (test-only) on generated and mutated
bodies. The broker forwards chunked bodies byte for byte, so wherever it accepts a body it must
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
from hypothesis import given, settings
from hypothesis import strategies as st

from agenshield_shim.broker.http1 import HttpError, ProtocolError, Stream, copy_chunked, read_body

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


@st.composite
def mutated(draw: Any) -> bytes:
    body = bytearray(draw(chunked_bodies()))
    for _ in range(draw(st.integers(1, 3))):
        if not body:
            break
        i = draw(st.integers(0, len(body) - 1))
        how = draw(st.sampled_from(["insert", "replace", "delete"]))
        if how == "delete":
            del body[i]
        else:
            piece = draw(st.sampled_from(_MUTATIONS))
            body[i:i + (1 if how == "replace" else 0)] = piece
    return bytes(body)


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
            if head.version == (1, 1) and head.get("host") is None:
                return None  # the broker's routes answer it 400 too (h11 refuses it)
            data = await read_body(src, request_framing(head.headers), 1 << 20)
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
    message = bytearray(draw(request_messages()))
    for _ in range(draw(st.integers(1, 2))):
        i = draw(st.integers(0, len(message) - 1))
        how = draw(st.sampled_from(["insert", "replace", "delete"]))
        if how == "delete":
            del message[i]
        else:
            message[i:i + (1 if how == "replace" else 0)] = draw(st.sampled_from(_HEAD_MUTATIONS))
    return bytes(message)


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
