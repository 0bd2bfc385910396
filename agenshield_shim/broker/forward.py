"""Absolute-form forward proxying (``GET http://host/path HTTP/1.1``, any method), streamed.

The request head is rewritten only where a proxy must: origin-form request target, ``Host`` set
to the URL's authority (policy was checked on the URL, so the upstream must see the same host),
hop-by-hop headers (``Connection`` and the headers it names, ``Keep-Alive``, ``Proxy-*``) dropped.
Bodies are copied as they are framed, chunk sizes and trailers included, in both directions, one
read at a time with back-pressure; nothing is buffered whole. Redirects (3xx) are passed through.
The upstream connection is kept for the next request of the same client connection to the same
origin (keep-alive), which is what makes small requests cheap.

Refusals: ``403 Blocked by AgenShield URL policy`` and ``502 Proxy error``, as the daemon; with
extensions on they also carry ``X-Proxy-Error`` (``blocked-by-policy``, ``dns-resolution-failed``,
``connection-refused``, ``connection-timeout``, ``network-error``).

A ``101 Switching Protocols`` answer (WebSocket over plain HTTP) turns the exchange into a tunnel.
"""

import asyncio
import time
from typing import Callable, Dict, List, Optional, Tuple, Union
from urllib.parse import urlsplit

from .audit import AuditError
from .context import AUDIT_TEXT, Conn, Services
from .http1 import (
    Headers, HttpError, Sink, ProtocolError, RequestHead, ResponseHead, Stream, copy_chunked,
    abort, copy_length, copy_until_eof, header_tokens, parse_response_head, render_response,
    request_framing, response_framing, writer_sink,
)
from ..addr import Host, canonical_host, canonical_ip
from .policy import Decision, Target
from .tunnel import pipe
from .upstream import DENIED, NETWORK, Permit, UpstreamError, open_upstream

_HOP = frozenset(("connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate", "te",
                  "trailer", "upgrade"))
_HOP_RESPONSE = _HOP - {"trailer"}
_DEFAULT_PORT = {"http": 80, "https": 443}
MAX_RESPONSE_HEAD = 256 * 1024


def split_absolute(target: str) -> Tuple[str, Host, int, str, str]:
    """(scheme, canonical host, port, authority, origin-form) of an absolute URI; 400 when unusable.

    The authority (the upstream's ``Host``) is rebuilt from the canonical host, so the upstream,
    the policy and the socket all see one spelling."""
    try:
        parts = urlsplit(target)
        port = parts.port
    except ValueError:
        raise HttpError(400, "malformed absolute URL") from None
    scheme = parts.scheme.lower()
    if scheme in ("ws", "wss"):
        scheme = "http" if scheme == "ws" else "https"
    if scheme not in _DEFAULT_PORT or not parts.hostname:
        raise HttpError(400, "only http and https URLs can be forwarded")
    if not parts.hostname.isascii():  # a request target is ASCII (RFC 3986); no IDNA guesswork here
        raise HttpError(400, "non-ASCII host in request target")
    try:
        host = _canonical_host(parts.hostname)
    except ValueError as exc:
        raise HttpError(400, str(exc)) from None
    port = port or _DEFAULT_PORT[scheme]
    shown = host.authority_host
    authority = shown if port == _DEFAULT_PORT[scheme] else "%s:%d" % (shown, port)
    origin = parts.path or "/"
    if parts.query:
        origin += "?" + parts.query
    return scheme, host, port, authority, origin


_HOSTS: Dict[str, Host] = {}


def _canonical_host(name: str) -> Host:
    """``canonical_host``, remembered for up to 1,024 names: a client asks the same few hosts again
    and again, and the answer depends on the name alone (refusals are not remembered)."""
    host = _HOSTS.get(name)
    if host is None:
        host = canonical_host(name)
        if len(_HOSTS) >= 1024:
            _HOSTS.clear()
        _HOSTS[name] = host
    return host


def _refusal(services: Services, status: int, text: str, kind: str, reason: Optional[str] = None) -> bytes:
    headers: Headers = [("Content-Type", "text/plain")]
    if services.ext:
        headers.append(("X-Proxy-Error", kind))
        if reason:  # the body stays the daemon's fixed text; the policy's words go in a header
            printable = "".join(c if " " <= c <= "~" else "?" for c in reason)[:512]
            headers.append(("X-Proxy-Error-Reason", printable))
    return render_response(status, text.encode(), headers, close=True)


def _upstream_head(head: RequestHead, origin: str, authority: str, upgrade: bool, connection: List[str]) -> bytes:
    """``connection``: the request's ``Connection`` tokens (the headers they name are dropped too)."""
    drop = _HOP.union(connection) if connection else _HOP
    lines = ["%s %s HTTP/%d.%d" % (head.method, origin, head.version[0], head.version[1]), "Host: " + authority]
    for k, v in head.headers:
        lk = k.lower()
        if lk == "host" or (lk in drop and not (upgrade and lk == "upgrade")):
            continue
        lines.append(k + ": " + v)
    if upgrade:
        lines.append("Connection: Upgrade")
    elif head.version == (1, 0):
        lines.append("Connection: close")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


def _client_head(resp: ResponseHead, close: bool, upgrade: bool, connection: List[str]) -> bytes:
    """``connection``: the response's ``Connection`` tokens (the headers they name are dropped too)."""
    drop = _HOP_RESPONSE.union(connection) if connection else _HOP_RESPONSE
    lines = [resp.raw_status_line]
    for k, v in resp.headers:
        lk = k.lower()
        if lk in drop and not (upgrade and lk == "upgrade"):
            continue
        lines.append(k + ": " + v)
    if upgrade:
        lines.append("Connection: Upgrade")
    elif close:
        lines.append("Connection: close")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


def _clean(up: Stream) -> bool:
    """A kept upstream may be reused only if it is open and holds no byte we did not ask for: an
    early or extra response would be taken for the answer to the next request."""
    if up.buf or up.reader.at_eof() or up.writer.is_closing():
        return False
    return not getattr(up.reader, "_buffer", b"")  # CPython's StreamReader read-ahead (3.8-3.13)


async def _connect(services: Services, conn: Conn, key: Tuple[str, str, int], host: Host,
                   permit: Optional[Permit]) -> Tuple[Stream, bool]:
    """The kept upstream for ``key`` if alive and clean (second item ``True``), else a new connection."""
    if conn.upstream_key == key and conn.upstream is not None and _clean(conn.upstream):
        why = permit(conn.upstream_ip) if permit is not None and conn.upstream_ip else None
        if why is not None:  # this request's method or path meets a deny rule for that address
            raise UpstreamError(DENIED, why)
        return conn.upstream, True
    conn.drop_upstream(services)
    scheme, _text, port = key
    ctx = services.ssl_context if scheme == "https" else None
    r, w = await open_upstream(host, port, services.config.connect_timeout, ctx, resolver=services.resolver,
                               permit=permit)
    services.upstreams.add(w)
    conn.upstream, conn.upstream_key = Stream(r, w), key
    peer = w.get_extra_info("peername")
    conn.upstream_ip = str(canonical_ip(str(peer[0]))) if peer else None
    return conn.upstream, False


async def handle_forward(services: Services, conn: Conn, head: RequestHead) -> bool:
    """Serve one absolute-form request; returns whether the client connection stays usable."""
    started = time.monotonic()
    client = conn.stream
    cw = client.writer
    scheme, host, port, authority, origin = split_absolute(head.target)
    target = Target(host=host.text, port=port, scheme=scheme, method=head.method, path=origin)
    decision = services.policy.check(target)
    shown = head.target if len(head.target) <= 2048 else head.target[:2048] + "..."
    if not decision.allowed:
        services.count("forward_denied")
        services.audit_decision(conn, "forward", decision, shown, "denied", started, method=head.method)
        cw.write(_refusal(services, 403, "Blocked by AgenShield URL policy", "blocked-by-policy", decision.reason))
        await cw.drain()
        return False
    framing = request_framing(head)
    connection = header_tokens(head.headers, "connection")
    upgrade = "upgrade" in connection and head.get("upgrade") is not None
    key = (scheme, host.text, port)
    permit = services.permit(target, address=host.ip is not None)
    up_head = _upstream_head(head, origin, authority, upgrade, connection)
    if services.audit_blocked(conn, "forward", shown, started, method=head.method):
        cw.write(_refusal(services, 503, AUDIT_TEXT, "audit-failed"))
        await cw.drain()
        return False

    def record(status: int) -> None:
        """The decision's line, written before the client sees the response (fail closed)."""
        services.audit_decision(conn, "forward", decision, shown, "success", started,
                                method=head.method, status=status)

    for attempt in (0, 1):
        try:
            up, reused = await _connect(services, conn, key, host, permit)
        except UpstreamError as exc:
            if exc.kind == DENIED:
                services.count("forward_denied")
                services.audit_decision(conn, "forward", Decision(False, None, exc.message), shown, "denied",
                                        started, method=head.method)
                cw.write(_refusal(services, 403, "Blocked by AgenShield URL policy", "blocked-by-policy", exc.message))
                await cw.drain()
                return False
            services.count("forward_failed")
            services.audit_decision(conn, "forward", decision, shown, "error", started,
                                    method=head.method, error=exc.kind, message=exc.message)
            cw.write(_refusal(services, 502, "Proxy error", exc.kind))
            await cw.drain()
            return False
        result = await _exchange(services, conn, head, up, up_head, framing, upgrade, "close" in connection,
                                 reused and attempt == 0, record)
        if result == "retry":
            conn.drop_upstream(services)
            continue
        if isinstance(result, AuditError):
            cw.write(_refusal(services, 503, AUDIT_TEXT, "audit-failed"))
            try:
                await cw.drain()
            except ConnectionError:
                pass
            return False
        if isinstance(result, HttpError):
            services.count("bad_requests_%d" % result.status)
            services.audit_decision(conn, "forward", decision, shown, "error", started,
                                    method=head.method, error="bad-request-body", message=result.message)
            cw.write(render_response(result.status, (result.message + "\n").encode("latin-1", "replace"),
                                     [("Content-Type", "text/plain")], close=True))
            try:
                await cw.drain()
            except ConnectionError:
                pass
            return False
        if isinstance(result, UpstreamError):
            conn.drop_upstream(services)
            services.count("forward_failed")
            services.audit_decision(conn, "forward", decision, shown, "error", started,
                                    method=head.method, error=result.kind, message=result.message)
            cw.write(_refusal(services, 502, "Proxy error", result.kind))
            try:
                await cw.drain()
            except ConnectionError:
                pass
            return False
        assert isinstance(result, tuple)
        _status, keep = result
        services.count("forwards")
        return keep
    return False  # pragma: no cover - the loop always returns


async def _exchange(
    services: Services,
    conn: Conn,
    head: RequestHead,
    up: Stream,
    up_head: bytes,
    framing: Tuple[str, int],
    upgrade: bool,
    client_close: bool,
    may_retry: bool,
    record: Callable[[int], None],
) -> Union[Tuple[int, bool], str, UpstreamError, HttpError, AuditError]:
    """One request/response on ``up``: ``(status, keep_client)``, ``"retry"``, an UpstreamError, or
    an HttpError when the client's request body was malformed.

    Small exchanges take one send each way: a head goes out with the part of its body already
    read (up to its ``Content-Length``), not in a send of its own."""
    client = conn.stream
    cw, uw = client.writer, up.writer
    sent_head = False

    def on_idle() -> None:
        abort(uw)
        if sent_head:  # mid-body: nothing more can be said to the client
            abort(cw)

    timer = conn.timer
    timer.start(services.config.idle_timeout, on_idle)
    touch = timer.touch
    to_up = writer_sink(uw, touch)
    to_client = writer_sink(cw, touch)
    body_task: Optional["asyncio.Future[None]"] = None
    body = framing
    if framing[0] == "length" and client.buf:  # what the client sent with its head goes with ours
        n = min(framing[1], len(client.buf))
        up_head += client.buf[:n]
        del client.buf[:n]
        body = ("length", framing[1] - n)
    try:
        try:
            uw.write(up_head)
            await uw.drain()
        except (ConnectionError, OSError):
            return "retry" if may_retry and framing[0] == "none" else UpstreamError(NETWORK, "upstream closed")

        if body[0] == "chunked" or body[1] > 0:
            body_task = asyncio.ensure_future(_send_body(client, to_up, body))
        while True:
            raw = await _response_head(up, body_task)
            touch()
            if raw is None:
                if timer.fired:
                    return UpstreamError(NETWORK, "upstream idle timeout")
                if may_retry and framing[0] == "none":
                    return "retry"
                return UpstreamError(NETWORK, "upstream closed without a response")
            resp = parse_response_head(raw)
            if resp.status == 101 and upgrade:
                record(resp.status)
                cw.write(_client_head(resp, False, True, header_tokens(resp.headers, "connection")))
                sent_head = True
                await cw.drain()
                timer.stop()
                services.upstreams.discard(uw)
                conn.upstream, conn.upstream_key, conn.upstream_ip = None, None, None
                await pipe(services, client, up, services.config.idle_timeout)
                return resp.status, False
            if 100 <= resp.status < 200:
                cw.write(raw)  # interim (100 Continue): relay and keep reading
                await cw.drain()
                continue
            break
        rframing = response_framing(resp, head.method)
        body_done = body_task is None or body_task.done()
        keep_client = (
            head.version == (1, 1)
            and not client_close
            and rframing[0] != "close"
            and body_done
        )
        record(resp.status)
        resp_connection = header_tokens(resp.headers, "connection")
        out = _client_head(resp, not keep_client, False, resp_connection)
        kind, n = rframing
        if kind in ("length", "close") and up.buf:  # the body read with the head goes with it
            first = len(up.buf) if kind == "close" else min(n, len(up.buf))
            out += up.buf[:first]
            del up.buf[:first]
            n -= first
        cw.write(out)
        sent_head = True
        if kind == "length" and n > 0:
            await copy_length(up, to_client, n)
        elif kind == "chunked":
            await copy_chunked(up, to_client)
        elif kind == "close":
            await copy_until_eof(up, to_client)
        else:
            await cw.drain()
        if body_task is not None and not body_task.done():
            keep_client = False
            body_task.cancel()
        elif body_task is not None and body_task.exception() is not None:
            keep_client = False
        keep_up = keep_client and resp.version == (1, 1) and kind != "close" and "close" not in resp_connection
        if not keep_up:
            conn.drop_upstream(services)
        return resp.status, keep_client
    except AuditError as exc:
        conn.drop_upstream(services)
        return exc
    except _BodyFailed as failed:
        conn.drop_upstream(services)  # at once: an aborted upload must not hold its upstream
        if isinstance(failed.cause, ProtocolError) and not sent_head and not cw.is_closing():
            return HttpError(400, "malformed request body: %s" % failed.cause)
        return 0, False  # the client went away mid-body
    except (ConnectionError, ProtocolError, OSError, asyncio.IncompleteReadError) as exc:
        conn.drop_upstream(services)
        if sent_head or cw.is_closing():
            return 0, False  # mid-body failure: nothing sane to tell the client, just close
        if isinstance(exc, ProtocolError):
            return UpstreamError(NETWORK, str(exc))
        return UpstreamError(NETWORK, "upstream failed: %s" % (exc,))
    finally:
        timer.stop()
        if body_task is not None:
            if not body_task.done():
                body_task.cancel()
            await asyncio.gather(body_task, return_exceptions=True)  # its exception is retrieved here


class _BodyFailed(Exception):
    """The client's side of a forwarded request body failed: bad framing or the client left."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


async def _response_head(up: Stream, body_task: "Optional[asyncio.Future[None]]") -> Optional[bytes]:
    """The upstream's response head, unless the request body fails first (then :class:`_BodyFailed`
    at once, not after the upstream's or the idle timeout)."""
    if body_task is None or body_task.done():
        if body_task is not None and not body_task.cancelled() and body_task.exception() is not None:
            raise _BodyFailed(body_task.exception())  # type: ignore[arg-type]
        return await up.read_response_head(MAX_RESPONSE_HEAD)
    head_task = asyncio.ensure_future(up.read_response_head(MAX_RESPONSE_HEAD))
    try:
        await asyncio.wait((head_task, body_task), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        head_task.cancel()
        raise
    if not head_task.done():
        exc = body_task.exception() if not body_task.cancelled() else None
        if exc is not None:
            head_task.cancel()
            await asyncio.gather(head_task, return_exceptions=True)
            raise _BodyFailed(exc)
    return await head_task


class _UpstreamGone(Exception):
    """Writing the body to the upstream failed: its response (or EOF) tells the rest."""


async def _send_body(client: Stream, sink: Sink, framing: Tuple[str, int]) -> None:
    async def to_up(data: bytes) -> None:
        try:
            await sink(data)
        except (ConnectionError, OSError) as exc:
            raise _UpstreamGone() from exc

    kind, n = framing
    try:
        if kind == "length":
            await copy_length(client, to_up, n)
        elif kind == "chunked":
            await copy_chunked(client, to_up)
    except _UpstreamGone:
        return


__all__: List[str] = ["handle_forward", "split_absolute"]
