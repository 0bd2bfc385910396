"""The published AgenShield daemon 0.7.2 as its clients see it: ``broker --compat 0.7.2``.

Why a module of its own: 0.7.2 (``@agenshield/broker`` on the npm registry) is a different front
door, not a switch on the reference broker's routes. Its HTTP fallback is Node's ``http`` server
with two routes, its JSON-RPC envelope rules are its own, and its Unix socket speaks only
newline-delimited JSON. Everything here was measured on the daemon itself
(``tests/broker/test_daemon_differential.py`` keeps it so):

- ``GET /health`` (exact target) and ``POST /rpc`` only. Every other request, ``HEAD /health``,
  ``GET /rpc`` and absolute-form targets included, is ``404 {"error":"Not found"}``; ``CONNECT``
  closes the connection without a byte (Node without a ``connect`` listener).
- Node's framing: ``Date``, ``Connection: keep-alive`` + ``Keep-Alive: timeout=5`` (idle
  connections closed after 5 s) or ``Connection: close``; bodies chunked for HTTP/1.1,
  close-delimited for HTTP/1.0, none for ``HEAD``. A head Node cannot parse is a bare
  ``400 Bad Request`` (``431``, ``408``) with ``Connection: close`` and nothing else; an HTTP/1.1
  request without ``Host`` is ``400`` with an empty chunked body; several ``Host`` fields are
  served (Node keeps the first), so the front door's RFC 9112 3.2 rule is not applied here.
- JSON is compact and not ASCII-escaped (``JSON.stringify``); ``/health`` says version ``0.1.0``.
- JSON-RPC: ``-32700`` (id 0) for what is not JSON; ``-32600 Invalid Request`` for a non-object,
  a batch, ``jsonrpc`` other than ``"2.0"``, a falsy ``method`` or a missing ``id``; the id is
  echoed whatever its JSON type (``null`` too), and ``null`` becomes 0 in errors. The literal
  ``null`` request, and ``ping``/``policy_check`` without ``params``, crash the daemon's handler:
  ``-32603 Internal error`` with id 0. Over HTTP, ``exec``, ``file_write`` and ``secret_inject``
  are ``1008``; a method outside its HTTP list is ``-32601 Method not found``. Over the socket
  every method goes through the policy first, so an unknown one is ``1001``.
- ``ping`` → ``{pong, echo?, timestamp, version}`` (``echo`` is ``params.echo``, when given).
- ``policy_check``: ``-32602`` without ``operation``; only ``http_request`` targets (URLs) are
  evaluated, any other operation is ``{allowed: false, reason: "No matching allow policy"}``.
- ``http_request`` is Node's ``fetch``: ``accept: */*``, ``accept-language: *``,
  ``sec-fetch-mode: cors``, ``user-agent: node``, ``accept-encoding: gzip, deflate`` are added
  where the caller gave none; a body is ``String(body)`` sent with a ``Content-Length`` (and
  ``content-type: text/plain;charset=UTF-8`` where none was given). No
  ``params`` is ``1001 Policy check failed``; an unparseable URL is
  ``1001 Invalid URL``; any network failure is ``1004 Network error: fetch failed`` (Node's
  ``fetch``); result headers come sorted by name, of several ``Set-Cookie`` only the last, and
  gzip/deflate bodies decoded (``content-encoding`` still says gzip).

The daemon's other methods (files, exec, secrets, skills, events) are not implemented by the
reference broker: its policy governs none of them, so they are refused as the daemon's default
policy refuses what no rule allows (``1001 No matching allow policy``). The policy decisions
themselves are the reference broker's (its rules, its ``policyId``), not the daemon's rule engine.
"""

import asyncio
import datetime
import email.utils
import json
import time
import zlib
from typing import Any, Dict

from .context import Conn, Services
from .http1 import HttpError, RequestHead, read_body, request_framing
from .policy import Decision
from .rpc import (
    INTERNAL_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, NETWORK_ERROR, NOT_ALLOWED_OVER_HTTP, PARSE_ERROR,
    POLICY_DENIED, URL_REQUIRED, RpcError, RpcService, url_target, error_envelope, parse_json,
)

#: The version string 0.7.2 reports in ``/health`` and ``ping`` (hard-coded in the daemon).
REPORTED_VERSION = "0.1.0"
#: Node's ``server.keepAliveTimeout``: an idle kept-alive connection is closed after it.
KEEPALIVE_S = 5.0
INVALID_PARAMS = -32602
NO_RULE = "No matching allow policy"
#: Refused over the HTTP fallback with 1008; the rest of the daemon's methods outside
#: ``HTTP_METHODS`` are ``-32601`` there.
HTTP_DENIED = frozenset({"exec", "file_write", "secret_inject"})
HTTP_METHODS = frozenset({"http_request", "file_read", "file_list", "open_url", "ping", "policy_check", "events_batch"})
#: What this broker implements; any other method reaching the policy is refused by it.
SERVED = frozenset({"http_request", "ping", "policy_check"})
#: What Node's ``fetch`` adds to every request (measured at the upstream), unless the caller set it.
FETCH_HEADERS = (("accept", "*/*"), ("accept-language", "*"), ("sec-fetch-mode", "cors"), ("user-agent", "node"),
                 ("accept-encoding", "gzip, deflate"))
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 408: "Request Timeout", 413: "Payload Too Large",
            431: "Request Header Fields Too Large"}


def dumps(obj: Any) -> bytes:
    """``JSON.stringify``: compact, non-ASCII characters as UTF-8 (escaped only where they cannot be)."""
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: JSON.stringify escapes it, so does ensure_ascii
        return json.dumps(obj, separators=(",", ":")).encode("ascii")


def keepalive_timeout(configured: float) -> float:
    return min(configured, KEEPALIVE_S)


def _http_date() -> str:
    return email.utils.formatdate(usegmt=True)


def node_response(status: int, body: bytes, keep: bool, http10: bool = False, head_only: bool = False) -> bytes:
    """One answer of the daemon's HTTP fallback, framed as Node frames it."""
    lines = ["HTTP/1.1 %d %s" % (status, _REASONS[status]), "Content-Type: application/json", "Date: " + _http_date()]
    lines += ["Connection: keep-alive", "Keep-Alive: timeout=%d" % KEEPALIVE_S] if keep else ["Connection: close"]
    chunked = not http10 and not head_only
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    out = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if head_only:
        return out
    if chunked:
        return out + (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    return out + body


def node_error(status: int) -> bytes:
    """Node's answer to a request head it cannot take (then it closes): status line and nothing else."""
    status = status if status in (400, 408, 431) else 400
    return b"HTTP/1.1 %d %s\r\nConnection: close\r\n\r\n" % (status, _REASONS[status].encode())


def _no_host() -> bytes:
    return ("HTTP/1.1 400 Bad Request\r\nConnection: close\r\nDate: %s\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            % _http_date()).encode("latin-1")


async def serve(services: Services, rpc: RpcService, conn: Conn, head: RequestHead) -> bool:
    """One request on the HTTP fallback; True to keep the connection for another."""
    cfg = services.config
    w = conn.stream.writer
    if head.method == "CONNECT":
        return False  # Node, no "connect" listener: the socket is destroyed unanswered
    if head.version == (1, 1) and head.get("host") is None:
        w.write(_no_host())
        await w.drain()
        return False
    http10 = head.version != (1, 1)
    keep = not http10 and (head.get("connection") or "").lower() != "close"
    framing = request_framing(head)
    if head.method == "POST" and head.target == "/rpc":
        if (head.get("expect") or "").lower() == "100-continue":
            w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            body = await read_body(conn.stream, framing, cfg.max_body_size, cfg.body_timeout)
        except HttpError as exc:
            if exc.status != 413:
                raise
            # the daemon answers and reads on; this broker does not read an oversized body: close
            w.write(node_response(413, b'{"error":"Request too large"}', False, http10))
            await w.drain()
            return False
        w.write(node_response(200, dumps(await handle_rpc(rpc, conn, body)), keep, http10))
        await w.drain()
        return keep
    if framing[0] != "none":
        await read_body(conn.stream, framing, cfg.max_body_size, cfg.body_timeout)
    if head.method == "GET" and head.target == "/health":
        status, payload = 200, dumps({"status": "ok", "version": REPORTED_VERSION})
    else:
        status, payload = 404, b'{"error":"Not found"}'
    w.write(node_response(status, payload, keep, http10, head_only=head.method == "HEAD"))
    await w.drain()
    return keep


def _truthy(value: Any) -> bool:
    """JavaScript truthiness of a JSON value (``[]`` and ``{}`` are true there)."""
    if value is None or value is False or value == "":
        return False
    return not (isinstance(value, (int, float)) and value == 0)


class _Crash(Exception):
    """Where the daemon's handler throws (``const {echo} = undefined``): ``-32603``, id 0."""


async def handle_rpc(rpc: RpcService, conn: Conn, body: bytes) -> Dict[str, Any]:
    """One request (an HTTP body or one socket line) -> the daemon's envelope (never raises)."""
    try:
        obj = parse_json(body, "replace")  # Node's JSON.parse: no NaN, and deep nesting parses or fails
    except ValueError:
        return error_envelope(0, PARSE_ERROR, "Parse error")
    if obj is None:
        return error_envelope(0, INTERNAL_ERROR, "Internal error")
    if not isinstance(obj, dict):
        return error_envelope(0, INVALID_REQUEST, "Invalid Request")
    req_id = obj.get("id")
    err_id = 0 if req_id is None else req_id
    method = obj.get("method")
    if obj.get("jsonrpc") != "2.0" or not _truthy(method) or "id" not in obj:
        return error_envelope(err_id, INVALID_REQUEST, "Invalid Request")
    name = method if isinstance(method, str) else None
    if conn.channel != "socket":
        if name in HTTP_DENIED:
            _audit_refusal(rpc.services, conn, name, "Operation not allowed over HTTP fallback")
            return error_envelope(err_id, NOT_ALLOWED_OVER_HTTP, "Operation '%s' not allowed over HTTP. Use Unix socket." % name)
        if name not in HTTP_METHODS:
            return error_envelope(err_id, METHOD_NOT_FOUND, "Method not found")
    if name not in SERVED:
        _audit_refusal(rpc.services, conn, name or json.dumps(method)[:100], NO_RULE)
        return error_envelope(err_id, POLICY_DENIED, NO_RULE)
    params = obj.get("params")
    try:
        if name == "ping":
            result = ping(params)
        elif name == "policy_check":
            result = policy_check(rpc, conn, params)
        else:
            result = await http_request(rpc, conn, params)
    except RpcError as exc:
        return error_envelope(err_id, exc.code, exc.message)
    except asyncio.CancelledError:
        raise
    except Exception:  # _Crash, and anything unexpected: the daemon's catch-all
        return error_envelope(0, INTERNAL_ERROR, "Internal error")
    return {"jsonrpc": "2.0", "id": req_id, "result": result}


def _audit_refusal(services: Services, conn: Conn, operation: str, reason: str) -> None:
    services.audit_decision(conn, operation, Decision(False, None, reason), operation, "denied", time.monotonic())


def ping(params: Any) -> Dict[str, Any]:
    if params is None:
        raise _Crash("ping without params")
    out: Dict[str, Any] = {"pong": True}
    if isinstance(params, dict) and "echo" in params:
        out["echo"] = params["echo"]
    now = datetime.datetime.now(datetime.timezone.utc)
    out["timestamp"] = now.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (now.microsecond // 1000)
    out["version"] = REPORTED_VERSION
    return out


def _url_decision(rpc: RpcService, url: Any) -> Decision:
    if not isinstance(url, str):
        return Decision(False, None, "Invalid URL")
    try:
        return rpc.services.policy.check(url_target(url, None))
    except RpcError:
        return Decision(False, None, "Invalid URL")


def policy_check(rpc: RpcService, conn: Conn, params: Any) -> Dict[str, Any]:
    if params is None:
        raise _Crash("policy_check without params")
    p = params if isinstance(params, dict) else {}
    operation = p.get("operation")
    if not _truthy(operation):
        raise RpcError(INVALID_PARAMS, "Missing required parameter: operation")
    target = p.get("target")
    started = time.monotonic()
    if operation != "http_request":
        decision = Decision(False, None, NO_RULE)
    elif not _truthy(target):
        # the daemon answers allowed (its network constraints skip an empty URL): a difference kept
        decision = Decision(False, None, "URL is required")
    else:
        decision = _url_decision(rpc, target)
    rpc.services.audit_decision(conn, "policy_check", decision, str(target)[:2048],
                                "success" if decision.allowed else "denied", started,
                                checkedOperation=str(operation)[:100])
    return decision.as_result()


async def http_request(rpc: RpcService, conn: Conn, params: Any) -> Dict[str, Any]:
    services = rpc.services
    if params is None:  # the daemon's policy check throws on it and fails closed
        _audit_refusal(services, conn, "http_request", "Policy check failed")
        raise RpcError(POLICY_DENIED, "Policy check failed")
    p: Dict[str, Any] = params if isinstance(params, dict) else {}
    url = p.get("url")
    if not _truthy(url):
        raise RpcError(URL_REQUIRED, "URL is required")
    if not isinstance(url, str):
        raise RpcError(POLICY_DENIED, "Invalid URL")
    request = fetch_params(p)
    try:
        result = await rpc.http_request(conn, request, raw_body=True)
    except RpcError as exc:
        if exc.code == POLICY_DENIED and exc.message.startswith("Invalid URL"):
            raise RpcError(POLICY_DENIED, "Invalid URL") from None
        if exc.code == NETWORK_ERROR and exc.message.startswith("Network error:"):
            raise RpcError(NETWORK_ERROR, "Network error: fetch failed") from None
        raise
    headers = dict(sorted(result["headers"].items()))
    result["headers"] = headers
    result["body"] = fetch_decode(result["body"], headers.get("content-encoding")).decode("utf-8", "replace")
    return result


def _js_string(value: Any) -> str:
    """``String(value)`` for a JSON value (how 0.7.2 turns a non-string ``body`` into text)."""
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return ",".join("" if v is None else _js_string(v) for v in value)
    return "[object Object]"


def fetch_params(params: Dict[str, Any]) -> Dict[str, Any]:
    """``http_request`` params as 0.7.2's ``fetch`` sends them: its default request headers where the
    caller gave none of that name, a falsy ``body`` dropped, any other made a string and sent with a
    ``Content-Length`` (never chunked)."""
    out = dict(params)
    raw = params.get("headers")
    given: Dict[Any, Any] = raw if isinstance(raw, dict) else {}
    headers = dict(given)
    names = {str(k).lower() for k in given}
    for name, value in FETCH_HEADERS:
        if name not in names:
            headers[name] = value
    body = params.get("body")
    out.pop("body", None)
    if _truthy(body):
        method = params.get("method") or "GET"
        if isinstance(method, str) and method.upper() in ("GET", "HEAD"):
            raise RpcError(NETWORK_ERROR, "Network error: Request with GET/HEAD method cannot have body.")
        out["body"] = _js_string(body)
        if "content-type" not in names:
            headers["content-type"] = "text/plain;charset=UTF-8"  # fetch's type for a string body
        if "content-length" not in names:
            headers["content-length"] = str(len(out["body"].encode("utf-8")))
    out["headers"] = headers
    return out


def fetch_decode(data: bytes, encoding: Any) -> bytes:
    """The body as ``fetch`` hands it to ``response.text()``: gzip and deflate undone (the
    ``content-encoding`` header is left as it came). Codings it does not know (br here, which
    needs a module the standard library lacks) are left encoded."""
    if not data or not isinstance(encoding, str):
        return data
    for coding in reversed([c.strip().lower() for c in encoding.split(",") if c.strip()]):
        try:
            if coding in ("gzip", "x-gzip"):
                data = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
            elif coding == "deflate":
                try:
                    data = zlib.decompress(data)
                except zlib.error:
                    data = zlib.decompress(data, -zlib.MAX_WBITS)
            else:
                return data
        except zlib.error:  # fetch fails reading such a body (message not measured)
            raise RpcError(NETWORK_ERROR, "Network error: fetch failed") from None
    return data
