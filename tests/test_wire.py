"""The virtual connection's HTTP/1.1 framing (agenshield_shim._wire), against real parsers.

A request written by http.client itself, split at arbitrary points, must come back whole; any
garbage must be a ``WireError`` and nothing else; a response we write must read back through
http.client's own parser exactly as the broker reported it, and a broker's header that would
smuggle lines into that parser must be refused.
"""

import http.client
import io
from typing import List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agenshield_shim._rpc import RpcProtocolError, RpcResponse
from agenshield_shim._wire import (
    RequestAssembler,
    TunnelOnlyError,
    WireError,
    end_to_end_headers,
    response_bytes,
)


class CapturingSocket:
    """What http.client writes, kept (http.client's own serializer produces the requests under test)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def sendall(self, data: bytes) -> None:
        self.data += data

    def setsockopt(self, *args: object) -> None:
        pass

    def close(self) -> None:
        pass


def written_by_http_client(method: str, path: str, headers: List[Tuple[str, str]], body: object,
                           encode_chunked: bool = False) -> bytes:
    conn = http.client.HTTPConnection("upstream.test", 8080)
    sock = CapturingSocket()
    conn.sock = sock  # type: ignore[assignment]
    conn.request(method, path, body=body, headers=dict(headers), encode_chunked=encode_chunked)
    return bytes(sock.data)


def feed_in_pieces(data: bytes, cuts: List[int]) -> RequestAssembler:
    assembler = RequestAssembler()
    start = 0
    for cut in sorted(set(c % (len(data) + 1) for c in cuts)) + [len(data)]:
        assembler.feed(data[start:cut])
        start = cut
    return assembler


header_names = st.from_regex(r"X-[A-Za-z0-9]{1,12}", fullmatch=True)
header_values = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "PROPFIND"]),
    headers=st.lists(st.tuples(header_names, header_values), max_size=5, unique_by=lambda h: h[0].lower()),
    body=st.binary(max_size=3000),
    chunks=st.lists(st.integers(1, 700), max_size=6),
    chunked=st.booleans(),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
)
def test_requests_written_by_http_client_come_back_whole(method, headers, body, chunks, chunked, cuts) -> None:
    if chunked:
        parts, rest = [], body
        for size in chunks:
            parts.append(rest[:size])
            rest = rest[size:]
        parts.append(rest)
        data = written_by_http_client(method, "/p?q=1", headers, iter(parts), encode_chunked=True)
    else:
        data = written_by_http_client(method, "/p?q=1", headers, body or None)
    second = written_by_http_client("GET", "/next", [], None)
    assembler = feed_in_pieces(data + second, cuts)
    first = assembler.pop()
    assert first is not None and first.method == method and first.target == "/p?q=1"
    assert first.body == body
    assert first.url("https", "upstream.test:8080") == "https://upstream.test:8080/p?q=1"
    forwarded = dict(first.forwarded_headers())
    for name, value in headers:
        assert forwarded[name] == value
    assert not {"Host", "Content-Length", "Transfer-Encoding"} & set(forwarded)
    nxt = assembler.pop()
    assert nxt is not None and nxt.target == "/next" and nxt.body == b""
    assert assembler.pop() is None and assembler.idle


def test_incomplete_request_is_not_popped() -> None:
    assembler = RequestAssembler()
    assembler.feed(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n12345")
    assert assembler.pop() is None and not assembler.idle
    assembler.feed(b"67890")
    request = assembler.pop()
    assert request is not None and request.body == b"1234567890"


def test_absolute_form_target_is_the_url() -> None:
    assembler = RequestAssembler()
    assembler.feed(b"GET http://elsewhere.test/x HTTP/1.1\r\nHost: elsewhere.test\r\n\r\n")
    request = assembler.pop()
    assert request is not None and request.url("https", "proxy.test:3128") == "http://elsewhere.test/x"


@pytest.mark.parametrize("raw", [
    b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
])
def test_tunnel_only_requests_are_refused_by_name(raw: bytes) -> None:
    assembler = RequestAssembler()
    assembler.feed(raw)
    request = assembler.pop()
    assert request is not None
    with pytest.raises(TunnelOnlyError, match="AGENSHIELD_TRANSPORT=tunnel"):
        request.check_carriable()


@pytest.mark.parametrize("raw", [
    b"GET / HTTP/2\r\n\r\n",
    b"GET /\r\n\r\n",
    b"G(T / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n",
])
def test_malformed_requests_are_wire_errors(raw: bytes) -> None:
    with pytest.raises(WireError):
        RequestAssembler().feed(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_raises_only_wire_errors(data: bytes) -> None:
    assembler = RequestAssembler()
    try:
        assembler.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + data)
        assembler.feed(data)
    except WireError:
        pass


def test_connection_named_headers_are_hop_by_hop() -> None:
    kept = end_to_end_headers([("Connection", "keep-alive, X-Hop"), ("X-Hop", "1"), ("X-End", "2"),
                               ("Proxy-Authorization", "Basic c2VjcmV0"), ("TE", "trailers")])
    assert kept == [("X-End", "2")]


# -- responses --------------------------------------------------------------------------------


def parsed(head: bytes, body: bytes, method: str) -> http.client.HTTPResponse:
    class Source:
        def makefile(self, mode: str) -> io.BufferedReader:
            return io.BufferedReader(io.BytesIO(head + body))  # type: ignore[arg-type]

    response = http.client.HTTPResponse(Source(), method=method)  # type: ignore[arg-type]
    response.begin()
    return response


cookie_values = st.from_regex(r"[a-z]{1,8}=[A-Za-z0-9]{0,8}(; Path=/)?", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(
    status=st.sampled_from([200, 201, 204, 301, 304, 404, 500, 599]),
    method=st.sampled_from(["GET", "HEAD", "POST"]),
    cookies=st.lists(cookie_values, max_size=3),
    body=st.binary(max_size=2000),
)
def test_responses_read_back_through_http_client(status, method, cookies, body) -> None:
    headers = [("content-type", "application/octet-stream"), ("transfer-encoding", "chunked"),
               ("connection", "close"), ("content-length", "77")]
    headers += [("set-cookie", c) for c in cookies]
    head, payload = response_bytes(RpcResponse(status, "Some Reason", headers, body, "https://u.test/"), method)
    response = parsed(head, payload, method)
    assert response.status == status and response.reason == "Some Reason"
    assert response.msg.get_all("Set-Cookie", []) == cookies
    assert response.getheader("Transfer-Encoding") is None and response.getheader("Connection") is None
    assert not response.will_close  # the virtual connection stays open for the next request
    no_body = method == "HEAD" or status in (204, 304)
    assert response.read() == (b"" if no_body else body)
    if method == "HEAD":  # the upstream's length of the body a GET would get
        assert response.getheader("Content-Length") == "77"


@pytest.mark.parametrize("headers", [
    [("x-evil", "a\r\nSet-Cookie: injected=1")],
    [("x-evil", "a\nb")],
    [("x-evil", "a\x00b")],
    [("bad name", "v")],
    [("x:y", "v")],
])
def test_response_headers_that_would_smuggle_lines_are_refused(headers) -> None:
    with pytest.raises(RpcProtocolError, match="AgenShield"):
        response_bytes(RpcResponse(200, "OK", headers, b"", "https://u.test/"), "GET")


def test_reason_with_line_breaks_is_flattened() -> None:
    head, _ = response_bytes(RpcResponse(200, "O\r\nK", [], b"x", "https://u.test/"), "GET")
    assert head.startswith(b"HTTP/1.1 200 O  K\r\n")


def test_expect_continue_is_reported_once_while_the_body_is_awaited() -> None:
    assembler = RequestAssembler()
    assembler.feed(b"POST / HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n")
    assert assembler.take_continue() and not assembler.take_continue()
    assembler.feed(b"abc")
    request = assembler.pop()
    assert request is not None and request.body == b"abc" and not assembler.take_continue()
    # head and body in one write: the sender is not waiting, nothing to answer
    assembler.feed(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc")
    assert not assembler.take_continue() and assembler.pop() is not None
    # no body to wait for
    assembler.feed(b"GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n")
    assert not assembler.take_continue() and assembler.pop() is not None


@pytest.mark.parametrize("raw", [
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1_0\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nGET /x HTTP/1.1\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n",
    b"GET / HTTP/1.2\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
    b"POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
])
def test_assembler_reads_with_the_brokers_rules(raw: bytes) -> None:
    """The virtual connection reads requests with the broker's codec: what the broker would refuse
    (smuggling shapes it took before: ``1_0``, ``0x3``, a request line in a trailer, TE with CL, TE in
    HTTP/1.0) is a WireError here too. The routes' ``Host`` rule is not applied: ``Host`` is dropped here."""
    with pytest.raises(WireError):
        RequestAssembler().feed(raw)
