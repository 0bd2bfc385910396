"""The rpc transport's core: one ``http_request`` JSON-RPC call to the broker, sync or asyncio.

Why this module exists: with ``AGENSHIELD_TRANSPORT=rpc`` every hooked library (http.client,
urllib, urllib3, requests, aiohttp, httpx) turns a request into one ``POST /rpc`` call, method
``http_request`` (see ``agenshield_shim/broker/PROTOCOL.md`` and the design brief). The per-library
hooks only translate their request and response objects; everything about the broker's protocol
lives here, once:

- :func:`capabilities` asks the broker once (``ping``) whether it carries binary bodies
  (``body-base64``); a broker that lists no ``extensions`` is the daemon: text bodies only.
- :func:`build_params` turns a request into ``http_request`` params, refusing *before anything is
  sent* a body the broker would corrupt.
- :func:`call` / :func:`call_async` send one JSON-RPC call over a plain socket (or the broker's
  Unix socket) and map every failure to the :class:`RpcError` hierarchy.
- :func:`parse_result` turns the result into an :class:`RpcResponse` (``Set-Cookie`` split back,
  body bytes exact or a clear :class:`RpcBodyError`, never silently corrupted bytes).
- :func:`http_request` / :func:`http_request_async` do all of the above.

It knows no HTTP library on purpose: it must not import http.client, urllib, requests, aiohttp or
httpx, which are the libraries being hooked (a hook calling back into its own patched library
would recurse, and the core must work whichever of them is installed). ``socket`` and ``asyncio``
are imported on first use, like ``_broker_client``.
"""

import base64
import binascii
import itertools
import json
import os
import re
import threading
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from . import NetworkBlockedError
from ._broker_client import connect_unix
from ._config import Config
from .authority import authority
from .errors import TunnelOnlyError

RPC_PATH = "/rpc"
EXT_BODY_BASE64 = "body-base64"
EXT_REDIRECT_POLICY = "redirect-policy"
ENV_TRACE_ID = "AGENSHIELD_TRACE_ID"
ENV_DEPTH = "AGENSHIELD_DEPTH"
#: How long connecting to the broker may take (it is local: longer means it is not there).
BROKER_CONNECT_TIMEOUT_S = 5.0
#: The local deadline of :func:`http_request` is the caller's timeout plus this, so that the broker's
#: own timeout (error 1004 ``Request timeout``, with its clearer message) normally fires first.
LOCAL_GRACE_S = 1.0
#: Largest response head accepted from the broker.
MAX_HEAD = 64 * 1024
#: Largest answer line from the broker's Unix socket (a 10 MiB body, base64, with its envelope).
MAX_LINE = 64 * 1024 * 1024
TUNNEL_HINT = ("set AGENSHIELD_TRANSPORT=tunnel (or auto, the default) with a broker that tunnels, such as the "
               "reference broker, to carry binary bodies")

HeadersIn = Union[Mapping[Any, Any], Iterable[Tuple[Any, Any]], None]
BodyIn = Union[bytes, bytearray, memoryview, str, None]

_ids = itertools.count(1)


# -- errors ---------------------------------------------------------------------------------------


class RpcError(OSError):
    """A failed rpc-transport request. An ``OSError``, so code tolerating network errors keeps working.

    ``code`` is the broker's JSON-RPC error code (``None`` for failures found locally),
    ``broker_message`` its message, ``broker`` its address and ``url`` the request's URL; hooks map
    the subclasses to their library's own exception types.
    """

    def __init__(self, message: str, code: Optional[int] = None, broker_message: Optional[str] = None,
                 broker: str = "", url: Optional[str] = None) -> None:
        super().__init__(message)
        self.code = code
        self.broker_message = broker_message
        self.broker = broker
        self.url = url

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RpcDenied(RpcError, NetworkBlockedError):  # type: ignore[misc]  # broker: str here, Optional there
    """1001: the broker's policy refused the URL (or could not use it).

    Also a :class:`~agenshield_shim.NetworkBlockedError`, like the guard's and the tunnel's refusals,
    so one ``except`` catches a refusal whichever transport is configured.
    """


class RpcNetworkError(RpcError):
    """1004: the broker could not complete the request upstream (refused, DNS, reset, too large)."""


class RpcTimeout(RpcNetworkError, TimeoutError):
    """A timeout: the broker's 1004 ``Request timeout``, or no answer within the local deadline."""


class RpcProtocolError(RpcError):
    """The broker answered something unusable: a JSON-RPC protocol error, a 413, garbage."""


class RpcBrokerUnavailable(RpcError, ConnectionError):
    """The broker itself cannot be reached (refused, no socket file, connect timeout)."""


class RpcBrokerConnectTimeout(RpcBrokerUnavailable, TimeoutError):
    """Connecting to the broker took longer than the connect timeout."""


class RpcTunnelOnly(RpcError, TunnelOnlyError):
    """What only the tunnel transport can carry (an upgrade, ``CONNECT``, a pinned certificate, a body);
    also the shared :class:`~agenshield_shim.errors.TunnelOnlyError`."""


class RpcBodyError(RpcTunnelOnly):
    """A body the broker cannot carry intact (no ``body-base64``); the message names the tunnel."""


_CODE_CLASSES = {1001: RpcDenied, 1004: RpcNetworkError}


def error_for_code(code: Any, message: str, broker: str, url: Optional[str], method: str = "") -> RpcError:
    """The :class:`RpcError` for one broker error object: its class from the code, a clear message."""
    what = ("%s %s" % (method, url)).strip() if url else "the call"
    if code == 1001:
        text = "AgenShield: the broker at %s denied %s: %s (error 1001)" % (broker, what, message)
    elif code == 1004:
        text = "AgenShield: the broker at %s could not complete %s: %s (error 1004)" % (broker, what, message)
    else:
        text = "AgenShield: the broker at %s answered %s with error %s: %s" % (broker, what, code, message)
    cls = _CODE_CLASSES.get(code, RpcProtocolError) if isinstance(code, int) else RpcProtocolError
    if cls is RpcNetworkError and _looks_like_timeout(message):
        cls = RpcTimeout
    return cls(text, code if isinstance(code, int) else None, message, broker, url)


def _looks_like_timeout(message: str) -> bool:
    """The broker's timeouts are 1004 like other network errors; only the message tells them apart."""
    low = message.lower()
    return "timeout" in low or "timed out" in low or "etimedout" in low


# -- broker address and capabilities ---------------------------------------------------------------


def broker_name(config: Config) -> str:
    """The broker's address as messages show it (``unix:PATH`` when the Unix socket is used)."""
    if config.broker_socket:
        return "unix:%s" % config.broker_socket
    return config.broker


def broker_key(config: Config) -> Tuple[Any, ...]:
    """What identifies one broker in this process's caches (its Unix socket, else its address)."""
    return ("unix", config.broker_socket) if config.broker_socket else ("tcp", config.broker_host, config.broker_port)


class Capabilities:
    """What the broker advertises in ``ping``'s ``extensions`` (none: the daemon's behaviour)."""

    __slots__ = ("extensions", "version")

    def __init__(self, extensions: Sequence[str] = (), version: Optional[str] = None) -> None:
        self.extensions = frozenset(extensions)
        self.version = version

    @property
    def body_base64(self) -> bool:
        """Bodies travel as base64, exactly; without it they are UTF-8 text only."""
        return EXT_BODY_BASE64 in self.extensions

    @property
    def redirect_policy(self) -> bool:
        """The broker checks every redirect hop it follows (the daemon checks only the first URL)."""
        return EXT_REDIRECT_POLICY in self.extensions

    @classmethod
    def from_ping(cls, result: Any) -> "Capabilities":
        """A missing or malformed ``extensions`` key is the daemon: no extensions (the safe reading)."""
        if not isinstance(result, dict):
            return cls()
        exts = result.get("extensions")
        names = [e for e in exts if isinstance(e, str)] if isinstance(exts, list) else []
        version = result.get("version") if isinstance(result.get("version"), str) else None
        return cls(names, version)

    def __repr__(self) -> str:
        return "Capabilities(%r, version=%r)" % (sorted(self.extensions), self.version)


#: The daemon's capabilities: no extensions.
DAEMON = Capabilities()
_caps_cache: Dict[Tuple[Any, ...], Capabilities] = {}
_caps_lock = threading.Lock()


def capabilities(config: Config, deadline_s: Optional[float] = BROKER_CONNECT_TIMEOUT_S,
                 url: Optional[str] = None) -> Capabilities:
    """The broker's capabilities, asked with one ``ping`` per broker address and process.

    A ping answered with an error or garbage means no extensions (the daemon 0.7.2 answers a ping
    without ``params`` with -32603): the broker may still serve ``http_request``. A broker that
    cannot be reached or does not answer in time is an error. Those failures are not cached (a
    broker that is down now may be up for the next request); ``url`` (the request that needed
    them) only names it in error messages.
    """
    key = broker_key(config)
    caps = _caps_cache.get(key)
    if caps is None:
        try:
            result = ping(config, deadline_s, url)
        except (RpcBrokerUnavailable, RpcTimeout):
            raise
        except RpcError:  # an odd ping: no extensions, never no routing
            result = None
        caps = _remember(key, Capabilities.from_ping(result))
    return caps


async def capabilities_async(config: Config, deadline_s: Optional[float] = BROKER_CONNECT_TIMEOUT_S,
                             url: Optional[str] = None) -> Capabilities:
    """:func:`capabilities` for asyncio code (shares the cache)."""
    key = broker_key(config)
    caps = _caps_cache.get(key)
    if caps is None:
        try:
            result = await ping_async(config, deadline_s, url)
        except (RpcBrokerUnavailable, RpcTimeout):
            raise
        except RpcError:
            result = None
        caps = _remember(key, Capabilities.from_ping(result))
    return caps


def _remember(key: Tuple[Any, ...], caps: Capabilities) -> Capabilities:
    with _caps_lock:
        _caps_cache[key] = caps
    return caps


def forget_capabilities(config: Optional[Config] = None) -> None:
    """Drop the cached capabilities (of one broker, or all): the broker was replaced, or tests."""
    with _caps_lock:
        if config is None:
            _caps_cache.clear()
        else:
            _caps_cache.pop(broker_key(config), None)


# -- building the request -------------------------------------------------------------------------


def _text(value: Any) -> str:
    """A header name or value as text: bytes are UTF-8 when they are, else Latin-1 (as sent)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("latin-1")
    return value if isinstance(value, str) else str(value)


def join_headers(headers: HeadersIn) -> Dict[str, str]:
    """Request headers as the JSON object the broker takes: repeats joined, first spelling kept.

    A JSON object cannot repeat a name, so repeated headers are joined the way HTTP allows: by
    ``", "``, except ``Cookie``, whose pairs are separated by ``"; "`` (RFC 6265 5.4).
    """
    out: Dict[str, str] = {}
    spelled: Dict[str, str] = {}
    items = headers.items() if isinstance(headers, Mapping) else (headers or ())
    for raw_name, raw_value in items:
        name = _text(raw_name).strip()
        value = _text(raw_value).strip()
        low = name.lower()
        if low in spelled:
            first = spelled[low]
            out[first] = out[first] + ("; " if low == "cookie" else ", ") + value
        else:
            spelled[low] = name
            out[name] = value
    return out


def trace_context(environ: Optional[Mapping[str, str]] = None) -> Optional[Dict[str, Any]]:
    """``{parentTraceId, depth}`` from ``AGENSHIELD_TRACE_ID`` / ``AGENSHIELD_DEPTH``, for the audit.

    Informational only (the broker ignores unknown params), so a malformed depth is left out
    rather than failing the request.
    """
    env = os.environ if environ is None else environ
    context: Dict[str, Any] = {}
    trace = env.get(ENV_TRACE_ID, "").strip()
    if trace:
        context["parentTraceId"] = trace
    depth = env.get(ENV_DEPTH, "").strip()
    if depth.isdigit() and depth.isascii():
        context["depth"] = int(depth)
    return context or None


def _body_bytes(body: BodyIn) -> Optional[bytes]:
    if body is None:
        return None
    if isinstance(body, str):
        return body.encode("utf-8")
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body)
    raise TypeError("the rpc transport sends buffered bodies: bytes or str, not %s" % type(body).__name__)


def build_params(
    method: str, url: str, headers: HeadersIn = None, body: BodyIn = None, timeout_s: Optional[float] = None,
    follow_redirects: bool = False, *, caps: Capabilities, environ: Optional[Mapping[str, str]] = None,
    broker: str = "",
) -> Dict[str, Any]:
    """The ``http_request`` params for one request, or :class:`RpcBodyError` before anything is sent.

    - ``followRedirects`` is false: the library follows redirects itself, so that the broker's
      policy sees every hop (the daemon does not check the hops it follows). ``True`` is accepted
      only from a broker with ``redirect-policy``.
    - ``timeout`` is in milliseconds (the broker's idle timeout per hop); ``None`` leaves its default.
    - With ``body-base64`` the body always travels as base64 (and so does the answer); without it
      a body must be UTF-8 text, else :class:`RpcBodyError` names the tunnel transport.
    - A body with neither ``Content-Length`` nor ``Transfer-Encoding`` gets a ``Content-Length``:
      the broker would otherwise send it chunked, which many servers refuse, and a buffered body's
      length is known.
    - ``context`` carries ``AGENSHIELD_TRACE_ID`` / ``AGENSHIELD_DEPTH`` for the audit.
    - Without ``body-base64`` the request asks for ``Accept-Encoding: identity``: libraries offer
      gzip by default, and a gzipped answer could not come back through a text-only broker.
    """
    if follow_redirects and not caps.redirect_policy:
        raise ValueError("followRedirects would let the broker follow redirects without a policy check on each hop")
    data = _body_bytes(body)
    joined = join_headers(headers)
    if not caps.body_base64:  # a compressed answer could not come back intact: ask the upstream for none
        joined = {k: v for k, v in joined.items() if k.lower() != "accept-encoding"}
        joined["Accept-Encoding"] = "identity"
    params: Dict[str, Any] = {"url": url, "method": method.upper(), "followRedirects": bool(follow_redirects)}
    if data:
        lows = {k.lower() for k in joined}
        if "content-length" not in lows and "transfer-encoding" not in lows:
            joined["Content-Length"] = str(len(data))
    params["headers"] = joined
    if caps.body_base64:
        params["bodyEncoding"] = "base64"
        if data is not None:
            params["body"] = base64.b64encode(data).decode("ascii")
    elif data is not None:
        try:
            params["body"] = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RpcBodyError(
                "AgenShield: cannot send the %d-byte body of %s %s through the broker at %s: it is not UTF-8 "
                "text (byte %d), and the broker carries bodies as UTF-8 text only (it does not advertise the "
                "body-base64 extension); %s" % (len(data), params["method"], url, broker, exc.start, TUNNEL_HINT),
                None, None, broker, url,
            ) from None
    if timeout_s is not None:
        params["timeout"] = max(1, int(-(-float(timeout_s) * 1000 // 1)))  # ceil, at least 1 ms
    context = trace_context(environ)
    if context:
        params["context"] = context
    return params


def encode_call(rpc_method: str, params: Optional[Dict[str, Any]], host_header: str, req_id: int,
                unix: bool = False) -> bytes:
    """The raw bytes of one call: ASCII-only JSON (the daemon corrupts multi-byte characters split
    across TCP chunks), ``params`` always present (the daemon's ``ping`` handler crashes without).

    Over TCP a ``POST /rpc`` with ``Content-Length`` and ``Connection: close`` (one call per
    connection); over the broker's Unix socket one line of JSON (``unix``): the daemon's socket
    speaks newline-delimited JSON-RPC, not HTTP, and so does the reference broker's.
    """
    payload: Dict[str, Any] = {"jsonrpc": "2.0", "id": req_id, "method": rpc_method,
                               "params": {} if params is None else params}
    body = json.dumps(payload, separators=(",", ":")).encode("ascii")
    if unix:
        return body + b"\n"
    head = ("POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nAccept: application/json\r\n"
            "Content-Length: %d\r\nConnection: close\r\n\r\n" % (RPC_PATH, host_header, len(body)))
    return head.encode("ascii") + body


def _host_header(config: Config) -> str:
    if config.broker_socket:
        return "localhost"
    return authority(config.broker_host, config.broker_port)


# -- reading the broker's HTTP answer -------------------------------------------------------------


class _Garbage(Exception):
    """The broker's bytes are not an HTTP/1.1 response we can read."""


class ResponseParser:
    """An incremental reader of the broker's HTTP/1.1 answer (``Content-Length``, chunked, or until
    close), on the package's one codec (:mod:`agenshield_shim.http1`): the rules the broker reads
    requests with are the rules its answers are read with.

    Sans-IO so that the socket and the asyncio paths share it; ``feed`` bytes, then ``feed_eof``.
    ``headers`` are (lower-case name, value) pairs.
    """

    def __init__(self) -> None:
        from . import http1

        self._codec = http1
        self.status = 0
        self.reason = ""
        self.headers: List[Tuple[str, str]] = []
        self.body = bytearray()
        self.done = False
        self._buf = bytearray()
        self._state = "head"
        self._left = 0
        self._chunks: Any = None

    def feed(self, data: bytes) -> None:
        try:
            self._feed(data)
        except self._codec.HttpError as exc:
            raise _Garbage("sent %s" % exc.message) from None

    def feed_eof(self) -> None:
        """The broker closed: fine for a close-delimited body, else an incomplete answer."""
        if self._state == "close":
            self.done = True
        elif not self.done:
            if self._state == "head" and not self._buf:
                raise _Garbage("closed the connection without answering")
            raise _Garbage("closed the connection in the middle of its answer")

    def _feed(self, data: bytes) -> None:
        if self.done:
            return
        state = self._state
        if state == "head":
            self._buf += data
            while self._state == "head":
                end = self._codec.head_end(self._buf)
                if end < 0:
                    if len(self._buf) > MAX_HEAD:
                        raise _Garbage("sent a response head over %d bytes" % MAX_HEAD)
                    if len(self._buf) >= 5 and not self._buf.startswith(b"HTTP/"):
                        raise _Garbage("answered something that is not HTTP: %r" % bytes(self._buf[:60]))
                    return
                head = bytes(self._buf[:end])
                del self._buf[:end]
                self._head(head)
            data, self._buf = bytes(self._buf), bytearray()
            state = self._state
        if state == "length":
            take = data[:self._left]
            self.body += take
            self._left -= len(take)
            self.done = self._left == 0
        elif state == "close":
            self.body += data
        elif state == "chunked":
            self.body += self._chunks.feed(data)
            self.done = self._chunks.done

    def _head(self, raw: bytes) -> None:
        codec = self._codec
        if not raw.startswith(b"HTTP/"):
            raise _Garbage("answered something that is not HTTP: %r" % raw[:60])
        head = codec.parse_response_head(raw, codec.Limits(max_head=MAX_HEAD))
        if head.status < 200:  # an interim answer (we send no Expect, but be tolerant): read on
            return
        self.status, self.reason = head.status, head.reason
        self.headers = [(k.lower(), v) for k, v in head.headers]
        kind, n = codec.response_framing(head, "POST")
        te = head.tokens("transfer-encoding")
        if te and te != ["chunked"]:
            raise _Garbage("used a transfer coding other than chunked: %r" % ", ".join(te))
        if kind == "chunked":
            self._state, self._chunks = "chunked", codec.ChunkedDecoder()
        elif kind == "length":
            self._state, self._left = "length", n
            self.done = n == 0
        else:
            self._state = "close"
            self.done = kind == "none"


class LineParser:
    """One newline-terminated JSON-RPC answer: the framing of the broker's Unix socket (NDJSON).

    The same face as :class:`ResponseParser` (``status`` is 200 once a line is complete, ``body``
    the line), so :func:`decode_envelope` reads either.
    """

    def __init__(self) -> None:
        self.status = 0
        self.reason = ""
        self.headers: List[Tuple[str, str]] = []
        self.body = bytearray()
        self.done = False

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        end = data.find(b"\n")
        self.body += data if end < 0 else data[:end]
        if end >= 0:
            self.done, self.status = True, 200
        elif len(self.body) > MAX_LINE:
            raise _Garbage("sent an answer line over %d bytes" % MAX_LINE)

    def feed_eof(self) -> None:
        if self.done:
            return
        if not self.body.strip():
            raise _Garbage("closed the connection without answering")
        raise _Garbage("closed the connection in the middle of its answer")


def _parser(config: Config) -> "Union[ResponseParser, LineParser]":
    return LineParser() if config.broker_socket else ResponseParser()


def decode_envelope(parser: "Union[ResponseParser, LineParser]", req_id: int, broker: str, url: Optional[str], method: str = "") -> Any:
    """The ``result`` of the broker's answer, or the :class:`RpcError` its answer stands for."""
    what = ("%s %s" % (method, url)).strip() if url else "the call"
    if parser.status == 413:
        raise RpcProtocolError(
            "AgenShield: the broker at %s refused %s with HTTP 413: the request is over its size limit "
            "(10 MiB by default; base64 bodies count a third more); use AGENSHIELD_TRANSPORT=tunnel for large "
            "uploads" % (broker, what), None, None, broker, url)
    snippet = bytes(parser.body[:200]).decode("utf-8", "replace")
    if parser.status != 200:
        raise RpcProtocolError("AgenShield: the broker at %s answered %s with HTTP %d %s: %s"
                               % (broker, what, parser.status, parser.reason, snippet), None, None, broker, url)
    try:
        envelope = json.loads(bytes(parser.body).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise RpcProtocolError("AgenShield: the broker at %s answered %s with something that is not JSON: %r"
                               % (broker, what, snippet), None, None, broker, url) from None
    if not isinstance(envelope, dict) or envelope.get("jsonrpc") != "2.0":
        raise RpcProtocolError("AgenShield: the broker at %s answered %s with something that is not a JSON-RPC "
                               "2.0 answer: %r" % (broker, what, snippet), None, None, broker, url)
    if "error" in envelope:
        err = envelope["error"]
        if not isinstance(err, dict):
            err = {}
        raw_message = err.get("message")
        message = raw_message if isinstance(raw_message, str) else "(no message)"
        raise error_for_code(err.get("code"), message, broker, url, method)
    if "result" not in envelope or envelope.get("id") != req_id:
        raise RpcProtocolError("AgenShield: the broker at %s answered %s with a JSON-RPC answer that has no result "
                               "for call %d: %r" % (broker, what, req_id, snippet), None, None, broker, url)
    return envelope["result"]


# -- sending --------------------------------------------------------------------------------------


def _unavailable(config: Config, url: Optional[str], why: str,
                 cls: "type[RpcBrokerUnavailable]" = RpcBrokerUnavailable) -> RpcBrokerUnavailable:
    broker = broker_name(config)
    target = " for %s" % url if url else ""
    return cls("AgenShield: cannot reach the broker at %s%s (%s); is it running?" % (broker, target, why),
               None, None, broker, url)


def _local_timeout(config: Config, url: Optional[str], deadline_s: Optional[float]) -> RpcTimeout:
    broker = broker_name(config)
    target = url or "the call"
    return RpcTimeout("AgenShield: no answer from the broker at %s for %s within %.3g s (the request's timeout)"
                      % (broker, target, deadline_s or 0), None, None, broker, url)


def _connect_sync(config: Config, timeout: float, url: Optional[str]) -> Any:
    import socket

    try:
        if config.broker_socket:
            return connect_unix(config.broker_socket, timeout)
        return socket.create_connection((config.broker_host, config.broker_port), timeout)
    except socket.timeout:
        raise _unavailable(config, url, "connect timed out after %.3g s" % timeout, RpcBrokerConnectTimeout) from None
    except OSError as exc:
        raise _unavailable(config, url, exc.strerror or str(exc) or type(exc).__name__) from None


def call(config: Config, rpc_method: str, params: Optional[Dict[str, Any]] = None, *,
         deadline_s: Optional[float] = None, url: Optional[str] = None, http_method: str = "") -> Any:
    """Send one JSON-RPC call and return its ``result``; every failure is an :class:`RpcError`.

    ``deadline_s`` bounds the whole exchange locally (``None``: wait as long as the broker takes;
    it has its own timeouts). ``url``/``http_method`` only name the request in messages.
    """
    import socket
    import time

    broker = broker_name(config)
    req_id = next(_ids)
    data = encode_call(rpc_method, params, _host_header(config), req_id, bool(config.broker_socket))
    start = time.monotonic()

    def remaining() -> Optional[float]:
        if deadline_s is None:
            return None
        left = deadline_s - (time.monotonic() - start)
        if left <= 0:
            raise _local_timeout(config, url, deadline_s)
        return left

    connect_timeout = BROKER_CONNECT_TIMEOUT_S if deadline_s is None else min(BROKER_CONNECT_TIMEOUT_S, deadline_s)
    sock = _connect_sync(config, connect_timeout, url)
    parser = _parser(config)
    try:
        try:
            sock.settimeout(remaining())
            sock.sendall(data)
        except RpcError:
            raise
        except socket.timeout:
            raise _local_timeout(config, url, deadline_s) from None
        except OSError:
            pass  # the broker may have answered (413) and closed: read what it said
        try:
            while not parser.done:
                sock.settimeout(remaining())
                chunk = sock.recv(262144)
                if not chunk:
                    parser.feed_eof()
                    break
                parser.feed(chunk)
        except RpcError:
            raise
        except socket.timeout:
            raise _local_timeout(config, url, deadline_s) from None
        except OSError as exc:
            if parser.status:  # e.g. reset after a 413 head: judge what arrived
                return decode_envelope(parser, req_id, broker, url, http_method)
            raise RpcProtocolError("AgenShield: the connection to the broker at %s broke during %s: %s"
                                   % (broker, url or rpc_method, exc), None, None, broker, url) from None
        except _Garbage as exc:
            if parser.status == 413:
                return decode_envelope(parser, req_id, broker, url, http_method)
            raise RpcProtocolError("AgenShield: the broker at %s %s (during %s)" % (broker, exc, url or rpc_method),
                                   None, None, broker, url) from None
    finally:
        sock.close()
    return decode_envelope(parser, req_id, broker, url, http_method)


async def call_async(config: Config, rpc_method: str, params: Optional[Dict[str, Any]] = None, *,
                     deadline_s: Optional[float] = None, url: Optional[str] = None, http_method: str = "") -> Any:
    """:func:`call` for asyncio (aiohttp, httpx): the same bytes over ``asyncio`` streams."""
    import asyncio

    broker = broker_name(config)
    req_id = next(_ids)
    data = encode_call(rpc_method, params, _host_header(config), req_id, bool(config.broker_socket))
    loop = asyncio.get_running_loop()
    start = loop.time()
    connect_timeout = BROKER_CONNECT_TIMEOUT_S if deadline_s is None else min(BROKER_CONNECT_TIMEOUT_S, deadline_s)
    try:
        if config.broker_socket:
            opening = asyncio.open_unix_connection(config.broker_socket, limit=262144)
        else:
            opening = asyncio.open_connection(config.broker_host, config.broker_port, limit=262144)
        reader, writer = await asyncio.wait_for(opening, connect_timeout)
    except asyncio.TimeoutError:
        raise _unavailable(config, url, "connect timed out after %.3g s" % connect_timeout,
                           RpcBrokerConnectTimeout) from None
    except OSError as exc:
        raise _unavailable(config, url, exc.strerror or str(exc) or type(exc).__name__) from None
    parser = _parser(config)

    async def talk() -> None:
        try:
            writer.write(data)
            await writer.drain()
        except OSError:
            pass  # the broker may have answered (413) and closed: read what it said
        while not parser.done:
            chunk = await reader.read(262144)
            if not chunk:
                parser.feed_eof()
                break
            parser.feed(chunk)

    try:
        left = None if deadline_s is None else deadline_s - (loop.time() - start)
        if left is not None and left <= 0:
            raise _local_timeout(config, url, deadline_s)
        await asyncio.wait_for(talk(), left)
    except RpcError:
        raise
    except asyncio.TimeoutError:
        raise _local_timeout(config, url, deadline_s) from None
    except _Garbage as exc:
        if parser.status != 413:
            raise RpcProtocolError("AgenShield: the broker at %s %s (during %s)" % (broker, exc, url or rpc_method),
                                   None, None, broker, url) from None
    except OSError as exc:
        if not parser.status:
            # A broker refusing an oversized body answers 413 and closes while we still send; asyncio
            # then raises the reset before handing out the answer it already buffered: read it there.
            buffered = getattr(reader, "_buffer", None)
            if buffered:
                try:
                    parser.feed(bytes(buffered))
                except _Garbage:
                    pass
        if not parser.status:  # else e.g. reset after a 413 head: judge what arrived
            raise RpcProtocolError("AgenShield: the connection to the broker at %s broke during %s: %s"
                                   % (broker, url or rpc_method, exc), None, None, broker, url) from None
    finally:
        writer.close()
    return decode_envelope(parser, req_id, broker, url, http_method)


def ping(config: Config, deadline_s: Optional[float] = BROKER_CONNECT_TIMEOUT_S, url: Optional[str] = None) -> Any:
    """The broker's ``ping`` result (``{pong, version, extensions?}``)."""
    return call(config, "ping", {}, deadline_s=deadline_s, url=url)


async def ping_async(config: Config, deadline_s: Optional[float] = BROKER_CONNECT_TIMEOUT_S,
                     url: Optional[str] = None) -> Any:
    """:func:`ping` for asyncio code."""
    return await call_async(config, "ping", {}, deadline_s=deadline_s, url=url)


# -- the answer -------------------------------------------------------------------------------------


class RpcResponse:
    """One upstream response as the broker reported it.

    ``headers`` are (lower-case name, value) pairs in the broker's order, ``Set-Cookie`` split back
    into one pair per cookie, other repeated headers left joined by ``", "`` (equivalent in HTTP).
    They are the upstream's headers as sent, ``Content-Length``/``Transfer-Encoding``/
    ``Content-Encoding`` included: ``body`` is the whole entity body, de-chunked but not decoded.
    """

    __slots__ = ("status", "reason", "headers", "body", "url")

    def __init__(self, status: int, reason: str, headers: List[Tuple[str, str]], body: bytes, url: str = "") -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.url = url

    def get(self, name: str, default: Optional[str] = None) -> Optional[str]:
        """The first value of a header (case-insensitive)."""
        low = name.lower()
        return next((v for k, v in self.headers if k == low), default)

    def get_all(self, name: str) -> List[str]:
        """Every value of a header (one per cookie for ``set-cookie``)."""
        low = name.lower()
        return [v for k, v in self.headers if k == low]

    def __repr__(self) -> str:
        return "RpcResponse(%d %r, %d headers, %d bytes)" % (self.status, self.reason, len(self.headers), len(self.body))


_COOKIE_START = re.compile(r", (?=[!#$%&'*+\-.^_`|~0-9A-Za-z]+=)")


def split_set_cookie(joined: str) -> List[str]:
    """Undo the broker's ``", "`` join of ``Set-Cookie`` headers.

    A comma is a separator only when ``name=`` follows it (RFC 6265: a cookie starts with a token
    and ``=``). The comma of an ``Expires=Wed, 21 Oct 2026 07:28:00 GMT`` date is followed by a
    day number and a space, never by ``token=``, so it stays. (Ambiguous by construction and not
    split correctly: a cookie value or ``Path`` that itself contains ``", name="``.)
    """
    return [part for part in _COOKIE_START.split(joined) if part.strip()]


_TEXT_TYPES = frozenset({
    "application/json", "application/xml", "application/javascript", "application/x-javascript",
    "application/ecmascript", "application/x-www-form-urlencoded", "application/x-ndjson",
    "application/yaml", "application/x-yaml", "application/graphql",
})


def is_text_content_type(content_type: Optional[str]) -> bool:
    """Content types whose bodies are text: ``text/*``, JSON, XML, JavaScript, forms (and ``+json``/``+xml``).

    Only such bodies may come back through a broker without ``body-base64``; a missing content type
    counts as text here (the caller then checks that the bytes decoded cleanly).
    """
    if content_type is None:
        return True
    mime = content_type.split(";", 1)[0].strip().lower()
    if not mime:
        return True
    return (mime.startswith("text/") or mime in _TEXT_TYPES or mime.endswith("+json") or mime.endswith("+xml"))


def _decode_text_body(text: str, headers: Mapping[str, str], broker: str, url: str) -> bytes:
    """The bytes of a body the broker decoded as UTF-8 with replacement, if they surely survived."""
    if not text:
        return b""
    encoding = headers.get("content-encoding", "").strip().lower()
    content_type = headers.get("content-type")
    problem = None
    if encoding not in ("", "identity"):
        problem = "it is %s-encoded (Content-Encoding: %s)" % (encoding, encoding)
    elif not is_text_content_type(content_type):
        problem = "its content type %r is not text" % content_type
    elif "\ufffd" in text:
        problem = "it is not valid UTF-8 (the broker replaced bytes by U+FFFD)"
    if problem:
        raise RpcBodyError(
            "AgenShield: the response body from %s cannot be delivered intact through the broker at %s: %s, and "
            "the broker carries bodies as UTF-8 text only (it does not advertise the body-base64 extension); %s"
            % (url, broker, problem, TUNNEL_HINT), None, None, broker, url)
    return text.encode("utf-8")


def parse_result(result: Any, *, url: str, broker: str = "", sent_base64: bool = False) -> RpcResponse:
    """An ``http_request`` result -> :class:`RpcResponse`, or the :class:`RpcError` it stands for.

    ``sent_base64`` says the call asked for ``bodyEncoding: "base64"``: an answer without it means
    the broker ignored the extension it advertised (replaced by a daemon?): a protocol error.
    """
    def bad(why: str) -> RpcProtocolError:
        return RpcProtocolError("AgenShield: the broker at %s answered the request to %s with an unusable result: %s"
                                % (broker, url, why), None, None, broker, url)

    if not isinstance(result, dict):
        raise bad("not an object")
    status, reason, raw_headers, body = (result.get(k) for k in ("status", "statusText", "headers", "body"))
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 999:
        raise bad("status %r" % (status,))
    if reason is None:
        reason = ""
    if raw_headers is None:
        raw_headers = {}
    if not isinstance(reason, str) or not isinstance(raw_headers, dict):
        raise bad("statusText or headers of the wrong type")
    if body is None:
        body = ""
    if not isinstance(body, str):
        raise bad("body of type %s" % type(body).__name__)
    headers: List[Tuple[str, str]] = []
    lowered: Dict[str, str] = {}
    for name, value in raw_headers.items():
        if not isinstance(value, str):
            value = ", ".join(str(v) for v in value) if isinstance(value, list) else str(value)
        low = str(name).lower()
        lowered[low] = value
        if low == "set-cookie":
            headers.extend((low, cookie) for cookie in split_set_cookie(value))
        else:
            headers.append((low, value))
    encoding = result.get("bodyEncoding")
    if encoding == "base64":
        try:
            data = base64.b64decode(body.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise bad("body is not valid base64") from None
    elif encoding not in (None, "utf-8", "utf8"):
        raise bad("unknown bodyEncoding %r" % (encoding,))
    elif sent_base64:
        raise bad("it ignored bodyEncoding base64 although it advertises body-base64 (was the broker replaced?)")
    else:
        data = _decode_text_body(body, lowered, broker, url)
    return RpcResponse(status, reason, headers, data, url)


# -- all together -------------------------------------------------------------------------------------


def _deadline(timeout_s: Optional[float], deadline_s: Any) -> Optional[float]:
    if deadline_s is not _DEFAULT:
        return None if deadline_s is None else float(deadline_s)
    return None if timeout_s is None else float(timeout_s) + LOCAL_GRACE_S


_DEFAULT: Any = object()


def _ping_deadline(deadline: Optional[float]) -> float:
    """The first request's capabilities ``ping`` also honours a short local deadline."""
    return BROKER_CONNECT_TIMEOUT_S if deadline is None else min(BROKER_CONNECT_TIMEOUT_S, deadline)


def http_request(
    config: Config, method: str, url: str, headers: HeadersIn = None, body: BodyIn = None,
    timeout_s: Optional[float] = None, *, deadline_s: Optional[float] = _DEFAULT,
    environ: Optional[Mapping[str, str]] = None,
) -> RpcResponse:
    """One request through the broker: capabilities, params, call, result; redirects not followed.

    ``timeout_s`` becomes the broker's ``timeout``; the whole call is also bounded locally by
    ``deadline_s`` (default: ``timeout_s`` plus :data:`LOCAL_GRACE_S`; ``None``: no local bound).
    """
    deadline = _deadline(timeout_s, deadline_s)
    broker = broker_name(config)
    caps = capabilities(config, _ping_deadline(deadline), url)
    params = build_params(method, url, headers, body, timeout_s, caps=caps, environ=environ, broker=broker)
    sent_base64 = params.get("bodyEncoding") == "base64"
    result = call(config, "http_request", params, deadline_s=deadline, url=url, http_method=params["method"])
    try:
        return parse_result(result, url=url, broker=broker, sent_base64=sent_base64)
    except RpcProtocolError:
        if sent_base64:
            forget_capabilities(config)
        raise


async def http_request_async(
    config: Config, method: str, url: str, headers: HeadersIn = None, body: BodyIn = None,
    timeout_s: Optional[float] = None, *, deadline_s: Optional[float] = _DEFAULT,
    environ: Optional[Mapping[str, str]] = None,
) -> RpcResponse:
    """:func:`http_request` for asyncio code (aiohttp, httpx)."""
    deadline = _deadline(timeout_s, deadline_s)
    broker = broker_name(config)
    caps = await capabilities_async(config, _ping_deadline(deadline), url)
    params = build_params(method, url, headers, body, timeout_s, caps=caps, environ=environ, broker=broker)
    sent_base64 = params.get("bodyEncoding") == "base64"
    result = await call_async(config, "http_request", params, deadline_s=deadline, url=url,
                              http_method=params["method"])
    try:
        return parse_result(result, url=url, broker=broker, sent_base64=sent_base64)
    except RpcProtocolError:
        if sent_base64:
            forget_capabilities(config)
        raise
