"""``CONNECT host[:port]``: policy check, upstream connect, then a two-way byte pipe.

The pipe holds at most one transport write buffer per direction: when the receiving side's buffer
is full, reading from the sending side pauses (back-pressure), so a slow client slows the upstream
instead of filling memory. A
half-close is passed on (``write_eof``) and the pipe lives until both directions ended; a reset on
either side, an idle period of ``idle_timeout`` or a broker shutdown closes both sockets at once.

Answers (the daemon's): ``200 Connection Established``; policy refusal ``403`` with
``X-Proxy-Error: blocked-by-policy``; DNS failure ``403`` with ``dns-resolution-failed``; connect
failure ``502`` with ``connection-refused``, ``connection-timeout`` or ``network-error``.
"""

import asyncio
import re
import time
from typing import Any, Optional, Tuple

from .audit import AuditError
from .context import AUDIT_TEXT, Conn, Services
from .http1 import RequestHead, Stream, render_response
from ..addr import canonical_host
from .policy import Decision, Target
from .upstream import DENIED, DNS_FAILED, UpstreamError, open_upstream

#: Write-buffer high-water mark of each side of a pipe. A tunnel whose client never reads holds
#: at most this plus one read (``READ_SIZE``) per direction; measured in
#: ``tests/broker/test_faults.py``. Larger marks save pause/resume round trips but not throughput
#: (``benchmarks/broker.py``), and memory per stalled tunnel grows with them.
PIPE_BUFFER = 256 * 1024
#: ASCII digits only: ``str.isdigit`` is true for ``²`` too, which ``int`` then refuses.
_PORT = re.compile(r"^[0-9]{1,5}$")


def parse_authority(target: str, default_port: int = 443) -> Optional[Tuple[str, int]]:
    """``host:port``, ``[v6]:port`` or ``host`` -> (host, port); ``None`` when malformed."""
    if not target or "/" in target or "@" in target or not target.isascii():
        return None
    if target.startswith("["):
        end = target.find("]")
        if end < 0:
            return None
        host, rest = target[1:end], target[end + 1:]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else ""
    elif target.count(":") == 1:
        host, port_text = target.split(":")
    elif ":" in target:
        return None
    else:
        host, port_text = target, ""
    if not host:
        return None
    if port_text:
        if not _PORT.match(port_text) or not 0 < int(port_text) < 65536:
            return None
        port = int(port_text)
    else:
        port = default_port
    return host, port


class _PipeEnd(asyncio.Protocol):
    """One side of a pipe: what arrives here is written straight to the peer's transport.

    Flow control is the transports' own: when the peer's write buffer passes its high-water mark,
    asyncio calls the *peer's* ``pause_writing``, which pauses reading on this side; so at most one
    write buffer (1 MiB high-water mark) per direction is ever held.
    """

    def __init__(self, state: "_PipeState", index: int) -> None:
        self.state = state
        self.index = index

    def data_received(self, data: bytes) -> None:
        st = self.state
        st.last = st.loop.time()
        st.moved[self.index] += len(data)
        peer = st.transports[1 - self.index]
        peer.write(data)

    def eof_received(self) -> bool:
        st = self.state
        st.eof[self.index] = True
        peer = st.transports[1 - self.index]
        if all(st.eof):
            st.finish(None)
            return False
        try:
            if peer.can_write_eof():
                peer.write_eof()
                return True  # keep our side open for the other direction (half-close)
        except (OSError, RuntimeError):
            pass
        st.finish(None)
        return False

    def pause_writing(self) -> None:  # our write buffer is full: stop reading from the peer
        self.state.transports[1 - self.index].pause_reading()

    def resume_writing(self) -> None:
        peer = self.state.transports[1 - self.index]
        if not peer.is_closing():
            peer.resume_reading()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.state.finish(exc, lost=self.index)


class _PipeState:
    def __init__(self, loop: asyncio.AbstractEventLoop, transports: Tuple[Any, Any]) -> None:
        self.loop = loop
        self.transports = transports
        self.moved = [0, 0]
        self.eof = [False, False]
        self.last = loop.time()
        self.done: "asyncio.Future[Optional[Exception]]" = loop.create_future()

    def finish(self, exc: Optional[Exception], lost: int = -1) -> None:
        if not self.done.done():
            self.done.set_result(exc)
        for i, t in enumerate(self.transports):
            if i == lost:
                continue
            if exc is not None or lost >= 0 and not all(self.eof):
                t.abort()  # the other side died: drop what is queued, now
            else:
                t.close()


def _drain_reader(stream: Stream) -> Tuple[bytes, bool]:
    """Bytes already read ahead (our buffer and the StreamReader's) and whether EOF was seen."""
    data = bytes(stream.buf)
    stream.buf.clear()
    reader = stream.reader
    buffered = getattr(reader, "_buffer", None)  # CPython's StreamReader buffer (3.9-3.13)
    if buffered:
        data += bytes(buffered)
        buffered.clear()
    return data, reader.at_eof()


async def pipe(
    services: Services,
    client: Stream,
    upstream: Stream,
    idle_timeout: float,
) -> Tuple[int, int]:
    """Move bytes both ways until both sides are done; returns (bytes up, bytes down).

    The streams' transports are handed to two small protocols (``transport.set_protocol``) so each
    received block is written to the other side without a coroutine switch or an extra copy: on
    loopback this moves several times more bytes per second than a ``read()``/``drain()`` loop.
    """
    loop = asyncio.get_running_loop()
    cw, uw = client.writer, upstream.writer
    ct: Any = cw.transport  # a read/write transport (typed WriteTransport by typeshed)
    ut: Any = uw.transport
    pending = [_drain_reader(client), _drain_reader(upstream)]
    state = _PipeState(loop, (ct, ut))
    pair = (cw, uw)
    services.pipes.add(pair)
    timer: Optional[asyncio.TimerHandle] = None

    def check_idle() -> None:
        nonlocal timer
        due = state.last + idle_timeout
        if loop.time() >= due:
            state.finish(TimeoutError("idle"))
        else:
            timer = loop.call_at(due, check_idle)

    try:
        ends = (_PipeEnd(state, 0), _PipeEnd(state, 1))
        ct.set_protocol(ends[0])
        ut.set_protocol(ends[1])
        for end, (data, eof) in zip(ends, pending):
            if data:
                end.data_received(data)
            if eof:
                end.eof_received()
        for t in (ct, ut):
            if not t.is_closing():
                t.set_write_buffer_limits(high=PIPE_BUFFER)
                t.resume_reading()
        timer = loop.call_at(state.last + idle_timeout, check_idle)
        await state.done
    finally:
        if timer is not None:
            timer.cancel()
        if not state.done.done():  # cancelled (shutdown): drop both now
            state.finish(ConnectionAbortedError("pipe cancelled"))
        services.pipes.discard(pair)
    return state.moved[0], state.moved[1]


def _refusal(status: int, kind: str, text: str) -> bytes:
    return render_response(
        status, (text + "\n").encode("utf-8", "replace"),
        [("X-Proxy-Error", kind), ("Content-Type", "text/plain; charset=utf-8")], close=True,
    )


async def handle_connect(services: Services, conn: Conn, head: RequestHead) -> bool:
    """Serve one ``CONNECT``; always ends the client connection (returns ``False``)."""
    started = time.monotonic()
    writer = conn.stream.writer
    authority = parse_authority(head.target)
    if authority is None:
        writer.write(render_response(400, b"Bad CONNECT target\n", [("Content-Type", "text/plain")], close=True))
        await writer.drain()
        return False
    raw_host, port = authority
    try:
        host = canonical_host(raw_host)
    except ValueError as exc:
        writer.write(render_response(400, ("Bad CONNECT target: %s\n" % exc).encode("ascii", "replace"),
                                     [("Content-Type", "text/plain")], close=True))
        await writer.drain()
        return False
    shown = "%s:%d" % (host.authority_host, port)
    target = Target(host=host.text, port=port, tunnel=True)
    decision = services.policy.check(target, check_port=services.ext)
    if not decision.allowed:
        services.count("connect_denied")
        services.audit_decision(conn, "connect", decision, shown, "denied", started)
        writer.write(_refusal(403, "blocked-by-policy", "Blocked by AgenShield policy: %s" % decision.reason))
        await writer.drain()
        return False
    if services.audit_blocked(conn, "connect", shown, started):
        writer.write(_refusal(503, "audit-failed", AUDIT_TEXT))
        await writer.drain()
        return False
    try:
        reader_u, writer_u = await open_upstream(host, port, services.config.connect_timeout, resolver=services.resolver,
                                                 permit=services.permit(target, check_port=services.ext))
    except UpstreamError as exc:
        if exc.kind == DENIED:
            services.count("connect_denied")
            services.audit_decision(conn, "connect", Decision(False, None, exc.message), shown,
                                    "denied", started)
            writer.write(_refusal(403, "blocked-by-policy", "Blocked by AgenShield policy: %s" % exc.message))
            await writer.drain()
            return False
        services.count("connect_failed")
        services.audit_decision(conn, "connect", decision, shown, "error", started, error=exc.kind, message=exc.message)
        status = 403 if exc.kind == DNS_FAILED else 502
        writer.write(_refusal(status, exc.kind, "Proxy error: %s" % exc.message))
        await writer.drain()
        return False
    services.upstreams.add(writer_u)
    try:
        try:
            services.audit_decision(conn, "connect", decision, shown, "success", started)
        except AuditError:
            writer.write(_refusal(503, "audit-failed", AUDIT_TEXT))
            await writer.drain()
            return False
        services.count("tunnels")
        writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        await writer.drain()
        await pipe(services, conn.stream, Stream(reader_u, writer_u), services.config.idle_timeout)
    finally:
        services.upstreams.discard(writer_u)
        writer_u.close()
    return False
