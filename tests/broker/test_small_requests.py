"""Small keep-alive forwards (issue 15, item 5): one send each way, and still correct in pieces.

A forward used to write a response's head and its body in two sends (and a request's head and
its body in two), which on loopback is most of a small request's cost. Each side's segment count
is read from the kernel (``TCP_INFO``'s ``tcpi_data_segs_in``, Linux 4.6+) of real sockets: one
data segment per small answer the client gets, one per small request the upstream gets. The same
exchanges are then taken apart (a head with part of its body, the rest later) to show the
coalescing never holds back or loses a byte, and the connection's one reused timer still ends an
idle keep-alive connection and a stalled exchange.
"""

import socket
import struct
import threading
import time
from typing import Any, List, Tuple

import pytest

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
_DATA_SEGS_IN = 152  # offset of tcpi_data_segs_in in struct tcp_info


def data_segments_in(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_INFO", 11), 256)
    if len(info) < _DATA_SEGS_IN + 4:
        pytest.skip("this kernel's tcp_info has no tcpi_data_segs_in")
    return int(struct.unpack_from("I", info, _DATA_SEGS_IN)[0])


def read_message(sock: socket.socket, buf: bytes = b"") -> Tuple[bytes, bytes, bytes]:
    """(head, body, rest) of one HTTP/1.1 message with a ``Content-Length`` (0 if none)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-head: %r" % buf)
        buf += chunk
    head, _, buf = buf.partition(b"\r\n\r\n")
    n = 0
    for line in head.split(b"\r\n")[1:]:
        if line.lower().startswith(b"content-length:"):
            n = int(line.split(b":", 1)[1])
    while len(buf) < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        buf += chunk
    return head, buf[:n], buf[n:]


class RawUpstream:
    """A loopback HTTP/1.1 upstream on plain sockets, one thread per connection. It answers each
    request with ``self.answer`` (a list of pieces, sent with ``self.pause`` seconds between them)
    and records each request's body and how many data segments its connection had received."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.answer: List[bytes] = [OK]
        self.pause = 0.0
        self.bodies: List[bytes] = []
        self.segments: List[int] = []
        self.conns: List[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        rest = b""
        try:
            while True:
                _head, body, rest = read_message(c, rest)
                self.bodies.append(body)
                self.segments.append(data_segments_in(c))
                for i, piece in enumerate(self.answer):
                    if i:
                        time.sleep(self.pause)
                    c.sendall(piece)
        except (OSError, ConnectionError):
            pass
        finally:
            c.close()

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def upstream() -> Any:
    u = RawUpstream()
    yield u
    u.close()


def _request(upstream: RawUpstream, method: str = "GET", body: bytes = b"", path: str = "/small") -> bytes:
    head = "%s http://127.0.0.1:%d%s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % (method, upstream.port, path, upstream.port)
    if body:
        head += "Content-Length: %d\r\n" % len(body)
    return head.encode() + b"\r\n" + body


def test_a_small_answer_reaches_the_client_in_one_segment(make_broker: Any, upstream: RawUpstream) -> None:
    """20 keep-alive GETs: 20 data segments in at the client, not 40 (head and body apart)."""
    b = make_broker(allow=["127.0.0.1"])
    with socket.create_connection(("127.0.0.1", b.port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        before = data_segments_in(s)
        for _ in range(20):
            s.sendall(_request(upstream))
            head, body, rest = read_message(s)
            assert head.startswith(b"HTTP/1.1 200") and body == b"ok" and not rest
        assert data_segments_in(s) - before == 20
    assert len(b.audit.entries()) == 20


def test_a_small_request_body_reaches_the_upstream_with_its_head(make_broker: Any, upstream: RawUpstream) -> None:
    """20 keep-alive POSTs of a small body sent with its head: one data segment each at the upstream."""
    b = make_broker(allow=["127.0.0.1"])
    with socket.create_connection(("127.0.0.1", b.port), timeout=10) as s:
        for i in range(20):
            s.sendall(_request(upstream, "POST", b"body %d" % i))
            head, body, _ = read_message(s)
            assert head.startswith(b"HTTP/1.1 200") and body == b"ok"
    assert upstream.bodies == [b"body %d" % i for i in range(20)]
    assert upstream.segments == list(range(1, 21))  # one upstream connection, kept


def test_an_answer_in_pieces_is_carried_whole(make_broker: Any, upstream: RawUpstream) -> None:
    """Head with half the body, the rest 0.2 s later: the client gets every byte, and the kept
    connections carry the next request."""
    body = bytes(range(256)) * 64
    upstream.answer = [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:7000], body[7000:]]
    upstream.pause = 0.2
    b = make_broker(allow=["127.0.0.1"])
    with socket.create_connection(("127.0.0.1", b.port), timeout=10) as s:
        for _ in range(2):
            s.sendall(_request(upstream))
            head, got, rest = read_message(s)
            assert head.startswith(b"HTTP/1.1 200") and got == body and not rest


def test_an_answer_to_eof_is_carried_whole(make_broker: Any, upstream: RawUpstream) -> None:
    """No length: the body is what comes before the upstream closes (the client is told so)."""
    upstream.answer = [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nfirst part, ", b"second part"]
    upstream.pause = 0.2
    b = make_broker(allow=["127.0.0.1"])
    threading.Thread(target=lambda: (time.sleep(0.6), [c.shutdown(socket.SHUT_RDWR) for c in upstream.conns]),
                     daemon=True).start()
    with socket.create_connection(("127.0.0.1", b.port), timeout=10) as s:
        s.sendall(_request(upstream))
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, got = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"connection: close" in head.lower()
    assert got == b"first part, second part"


def test_a_request_body_in_pieces_is_carried_whole(make_broker: Any, upstream: RawUpstream) -> None:
    """Head with part of the body, the rest 0.2 s later: the upstream gets the whole body once."""
    b = make_broker(allow=["127.0.0.1"])
    body = b"x" * 5000 + b"y" * 5000
    with socket.create_connection(("127.0.0.1", b.port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(2):
            whole = _request(upstream, "POST", body)
            s.sendall(whole[:-6000])
            time.sleep(0.2)
            s.sendall(whole[-6000:])
            head, got, _ = read_message(s)
            assert head.startswith(b"HTTP/1.1 200") and got == b"ok"
    assert upstream.bodies == [body, body]


def test_the_reused_timer_still_ends_idle_connections_and_stalled_exchanges(
    make_broker: Any, upstream: RawUpstream,
) -> None:
    """After a few forwards on one connection (one timer, reused), a stalled upstream still gets
    the exchange's idle timeout (the client is told 502), and a silent client still gets the
    keep-alive timeout (closed)."""
    b = make_broker(allow=["127.0.0.1"], idle_timeout=0.5, keepalive_timeout=0.7)
    with socket.create_connection(("127.0.0.1", b.port), timeout=10) as s:
        for _ in range(3):
            s.sendall(_request(upstream))
            assert read_message(s)[1] == b"ok"
        upstream.answer = []  # from now on the upstream reads and never answers
        t0 = time.monotonic()
        s.sendall(_request(upstream))
        head, _body, _ = read_message(s)
        assert head.startswith(b"HTTP/1.1 502") and 0.4 < time.monotonic() - t0 < 3
    upstream.answer = [OK]
    with socket.create_connection(("127.0.0.1", b.port), timeout=10) as s:
        for _ in range(3):
            s.sendall(_request(upstream))
            assert read_message(s)[1] == b"ok"
        t0 = time.monotonic()
        assert s.recv(100) == b""
        assert 0.6 < time.monotonic() - t0 < 3
