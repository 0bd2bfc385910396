"""``POST /rpc`` (JSON-RPC 2.0), its ``POST /api/proxy`` alias, ``GET /health``; aiohttp as upstream client.

Envelope rules (the daemon's): every answer is HTTP 200 with a JSON body, except 413 for a body over
the limit. A body that is not JSON is ``-32700`` (id 0); a batch (JSON array) or anything that is
not a JSON-RPC 2.0 request object is ``-32600``; the id is echoed when the request had a usable one
(string or number), else 0. Unknown methods are ``-32601``; the daemon's methods that it refuses
over HTTP (``exec``, ``file_read``...) are ``1008``; an unexpected failure is ``-32603``.

Methods:

- ``http_request {url, method?, headers?, body?, timeout?, followRedirects?}`` performs the request
  and answers ``{status, statusText, headers, body}`` (header names lower-case, repeats joined by
  ``", "``). Errors: 1003 no URL, 1001 denied or unusable URL, 1004 network error or timeout.
  Upstream 4xx/5xx are results. No User-Agent, Accept or Accept-Encoding is added, gzip is not
  decoded, the body is sent chunked unless the caller gave ``content-length``.
- ``ping`` answers ``{pong: true, version, timestamp}`` (+ ``extensions``).
- ``policy_check {operation, target, method?}`` answers ``{allowed, policyId?, reason?}``.

Extensions (listed in ``ping``'s and ``/health``'s ``extensions`` array; all off with ``--compat``):

- ``body-base64``: ``http_request`` accepts ``bodyEncoding: "base64"``; ``body`` is then base64
  (standard alphabet, padding required) and the result carries ``bodyEncoding: "base64"`` with a
  base64 ``body``. Without it (or with ``"utf-8"``), bodies are UTF-8 text decoded with
  replacement, as the daemon does. Other values are ``-32600``.
- ``redirect-policy``: each redirect hop the broker follows is checked by policy (and audited); a
  denied hop is error 1001. The daemon checks only the first URL.
- ``connect-port-policy``: ``CONNECT`` is checked on host *and* port (the daemon: host only).
- ``proxy-error-header``: forward-proxy refusals (403/502) also carry ``X-Proxy-Error``.

``/api/proxy`` (extension mode only; the daemon answers it 404, and so does ``--compat``) takes
``{url, method, headers, body, ...}`` (the same params as ``http_request``) and answers the plain
result object with HTTP 200, or ``{"error": {"code", "message"}}`` with HTTP 400 (-32700, -32600,
1003), 403 (1001), 502 (1004) or 500 (-32603).
"""

import asyncio
import base64
import binascii
import datetime
import json
import math
import time
from typing import Any, Dict, List, NamedTuple, Optional, Tuple
from urllib.parse import urljoin, urlsplit

import aiohttp
import yarl

from .. import __version__
from ..addr import Host, IPAddress, canonical_host
from ..authority import bracketed
from .audit import AuditError
from .context import AUDIT_TEXT, Conn, Services
from .policy import Decision, Target
from .upstream import UpstreamError, resolve

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INTERNAL_ERROR = -32603
POLICY_DENIED = 1001
URL_REQUIRED = 1003
NETWORK_ERROR = 1004
NOT_ALLOWED_OVER_HTTP = 1008

#: The daemon's methods that exist but are refused over its HTTP fallback (error 1008).
DAEMON_ONLY_METHODS = frozenset({
    "exec", "file_read", "file_write", "file_list", "open_url", "secret_inject",
    "skill_install", "skill_uninstall", "events_batch",
})
NETWORK_OPERATIONS = frozenset({"http_request", "http", "network", "fetch", "forward", "connect", "tunnel"})
MAX_REDIRECTS = 20
_SENSITIVE = ("authorization", "cookie", "proxy-authorization")
_TOKEN_CHARS = set("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class RpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def error_envelope(req_id: Any, code: int, message: str) -> Dict[str, Any]:
    return {"jsonrpc": "2.0", "id": req_id, "error": {"code": code, "message": message}}


def _usable_id(obj: Any) -> Any:
    if isinstance(obj, dict):
        rid = obj.get("id")
        if isinstance(rid, float) and not math.isfinite(rid):
            return 0  # never reached from parse_json; kept so no answer can carry NaN
        if isinstance(rid, (str, int, float)) and not isinstance(rid, bool):
            return rid
    return 0


def _no_constant(name: str) -> Any:
    raise ValueError("%s is not JSON" % name)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: a float Python would write back as Infinity
        raise ValueError("number out of range")
    return value


def parse_json(body: bytes, errors: str = "strict") -> Any:
    """Strict JSON (RFC 8259): ``ValueError`` for what is not, including ``NaN``/``Infinity`` and
    numbers past a double's range (Python's json accepts them and would echo them as non-JSON:
    ``NaN``), and nesting too deep to parse
    (100,000 ``[`` is a RecursionError in json, here a parse error)."""
    try:
        return json.loads(body.decode("utf-8", errors), parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise ValueError("nesting too deep") from None


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def _trace_metadata(context: Any) -> Dict[str, Any]:
    """The caller's ``context`` param (``AGENSHIELD_TRACE_ID``/``AGENSHIELD_DEPTH``) for the audit's metadata."""
    if not isinstance(context, dict):
        return {}
    out: Dict[str, Any] = {}
    trace = context.get("parentTraceId")
    if isinstance(trace, str) and trace:
        out["parentTraceId"] = trace[:200]
    depth = context.get("depth")
    if isinstance(depth, int) and not isinstance(depth, bool):
        out["depth"] = depth
    return out


class _Url(NamedTuple):
    """An http(s) URL read once: its policy target, canonical host, and what the request is sent with."""

    target: Target
    host: Host
    userinfo: str
    origin: str  # path and query

    def request_url(self, ip: IPAddress) -> yarl.URL:
        """The URL aiohttp is given: the chosen address itself, so aiohttp resolves nothing."""
        shown = bracketed(str(ip))
        return yarl.URL("%s://%s%s:%d%s" % (self.target.scheme, self.userinfo, shown, self.target.port or 0,
                                            self.origin), encoded=True)

    def host_header(self) -> str:
        t = self.target
        default = 443 if t.scheme == "https" else 80
        return self.host.authority_host if t.port == default else "%s:%d" % (self.host.authority_host, t.port or 0)


def split_url(url: str, method: Optional[str]) -> _Url:
    """Read an http(s) URL; :class:`RpcError` 1001 when it cannot be a policy target."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise RpcError(POLICY_DENIED, "Invalid URL: %s" % url[:200]) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise RpcError(POLICY_DENIED, "Invalid URL: %s" % url[:200])
    try:
        host = canonical_host(parts.hostname)
    except ValueError as exc:
        raise RpcError(POLICY_DENIED, "Invalid URL: %s (%s)" % (url[:200], exc)) from None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    userinfo = parts.netloc.rpartition("@")[0]
    target = Target(host=host.text, port=port or (443 if scheme == "https" else 80),
                    scheme=scheme, method=method, path=path)
    return _Url(target, host, userinfo + "@" if userinfo else "", path)


def url_target(url: str, method: Optional[str]) -> Target:
    """The policy target of an http(s) URL; :class:`RpcError` 1001 when it cannot be one."""
    return split_url(url, method).target


class RpcService:
    """Owns the upstream aiohttp session; created in ``Broker.start`` (it needs the running loop)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.session: Optional[aiohttp.ClientSession] = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(ssl=self.services.ssl_context, limit=0, enable_cleanup_closed=False)
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    # -- front-door entry points -------------------------------------------------------------

    def health(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"status": "ok", "version": __version__}
        if self.services.ext:
            out["extensions"] = list(self.services.config.extensions)
        return out

    async def handle_rpc(self, conn: Conn, body: bytes) -> Dict[str, Any]:
        """One JSON-RPC request body -> one response envelope (never raises)."""
        try:
            obj = parse_json(body)
        except ValueError:  # UnicodeDecodeError is one
            return error_envelope(0, PARSE_ERROR, "Parse error")
        req_id = _usable_id(obj)
        if isinstance(obj, list):
            return error_envelope(0, INVALID_REQUEST, "Invalid Request: batch requests are not supported")
        if not isinstance(obj, dict) or obj.get("jsonrpc") != "2.0" or not isinstance(obj.get("method"), str):
            return error_envelope(req_id, INVALID_REQUEST, "Invalid Request")
        params = obj.get("params")
        if not isinstance(params, dict):
            params = {}
        try:
            result = await self.dispatch(conn, obj["method"], params)
        except RpcError as exc:
            return error_envelope(req_id, exc.code, exc.message)
        except AuditError:
            return error_envelope(req_id, INTERNAL_ERROR, "Internal error: %s" % AUDIT_TEXT)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the envelope promise: an answer, whatever happened
            return error_envelope(req_id, INTERNAL_ERROR, "Internal error: %s" % type(exc).__name__)
        return {"jsonrpc": "2.0", "id": req_id, "result": result}

    async def handle_api_proxy(self, conn: Conn, body: bytes) -> Tuple[int, Dict[str, Any]]:
        """The README's ``POST /api/proxy {url, method, headers, body}`` -> (HTTP status, JSON)."""
        try:
            params = parse_json(body)
        except ValueError:
            return 400, {"error": {"code": PARSE_ERROR, "message": "Parse error"}}
        if not isinstance(params, dict):
            return 400, {"error": {"code": INVALID_REQUEST, "message": "Invalid Request: expected a JSON object"}}
        try:
            return 200, await self.http_request(conn, params)
        except RpcError as exc:
            status = {POLICY_DENIED: 403, NETWORK_ERROR: 502, URL_REQUIRED: 400, INVALID_REQUEST: 400}.get(exc.code, 500)
            return status, {"error": {"code": exc.code, "message": exc.message}}
        except AuditError:
            return 503, {"error": {"code": INTERNAL_ERROR, "message": "Internal error: %s" % AUDIT_TEXT}}
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return 500, {"error": {"code": INTERNAL_ERROR, "message": "Internal error: %s" % type(exc).__name__}}

    async def dispatch(self, conn: Conn, method: str, params: Dict[str, Any]) -> Any:
        if method == "http_request":
            return await self.http_request(conn, params)
        if method == "ping":
            return self.ping()
        if method == "policy_check":
            return self.policy_check(conn, params)
        if method in DAEMON_ONLY_METHODS:
            raise RpcError(NOT_ALLOWED_OVER_HTTP, "Operation '%s' is not allowed over HTTP" % method)
        raise RpcError(METHOD_NOT_FOUND, "Method not found: %s" % method[:100])

    # -- methods ---------------------------------------------------------------------------

    def ping(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"pong": True, "version": __version__, "timestamp": _now_iso()}
        if self.services.ext:
            out["extensions"] = list(self.services.config.extensions)
        return out

    def policy_check(self, conn: Conn, params: Dict[str, Any]) -> Dict[str, Any]:
        """Always a result: a question the broker cannot answer is answered ``allowed: false``."""
        started = time.monotonic()
        operation = params.get("operation")
        target = params.get("target")
        method = params.get("method") if isinstance(params.get("method"), str) else None
        op = operation if isinstance(operation, str) and operation else "http_request"
        if not isinstance(target, str) or not target:
            decision = Decision(False, None, "target is required")
        elif op not in NETWORK_OPERATIONS:
            decision = Decision(False, None, "Operation '%s' is not governed by this broker" % op[:100])
        elif "://" in target:
            try:
                decision = self.services.policy.check(url_target(target, method.upper() if method else None))
            except RpcError as exc:
                decision = Decision(False, None, exc.message)
        else:
            from .tunnel import parse_authority

            auth = parse_authority(target, default_port=443)
            host: Optional[Host] = None
            if auth is not None:
                try:
                    host = canonical_host(auth[0])  # the form CONNECT decides on
                except ValueError:
                    host = None
            if auth is None or host is None:
                decision = Decision(False, None, "Invalid target: %s" % target[:200])
            else:
                t = Target(host=host.text, port=auth[1], tunnel=True)
                decision = self.services.policy.check(t, check_port=self.services.ext)
        self.services.audit_decision(
            conn, "policy_check", decision, str(target)[:2048], "success" if decision.allowed else "denied",
            started, checkedOperation=op,
        )
        return decision.as_result()

    async def http_request(self, conn: Conn, params: Dict[str, Any], raw_body: bool = False) -> Dict[str, Any]:
        """``raw_body``: the result's ``body`` is the response bytes, for ``legacy.py`` to decode as 0.7.2 does."""
        services = self.services
        url = params.get("url")
        if not isinstance(url, str) or not url:
            raise RpcError(URL_REQUIRED, "URL is required")
        method = params.get("method") or "GET"
        if not isinstance(method, str) or not set(method) <= _TOKEN_CHARS:
            raise RpcError(INVALID_REQUEST, "Invalid Request: bad method")
        method = method.upper()
        base64_mode = False
        if services.ext and params.get("bodyEncoding") not in (None, "utf-8", "utf8"):
            if params.get("bodyEncoding") != "base64":
                raise RpcError(INVALID_REQUEST, "Invalid Request: unsupported bodyEncoding %r" % (params.get("bodyEncoding"),))
            base64_mode = True
        body = self._request_body(params.get("body"), base64_mode)
        headers = self._request_headers(params.get("headers"))
        timeout_ms = params.get("timeout")
        idle = 30.0
        if isinstance(timeout_ms, (int, float)) and not isinstance(timeout_ms, bool) and timeout_ms > 0:
            idle = float(timeout_ms) / 1000.0
        follow = params.get("followRedirects", True) is not False
        trace = _trace_metadata(params.get("context"))

        first_origin: Optional[Tuple[str, str, int]] = None
        for hop in range(MAX_REDIRECTS + 1):
            started = time.monotonic()
            dest = split_url(url, method)
            target = dest.target
            origin = (target.scheme or "", target.host, target.port or 0)
            if first_origin is None:
                first_origin = origin
            checked = hop == 0 or services.ext
            if checked:
                decision = services.policy.check(target)
                if not decision.allowed:
                    services.audit_decision(conn, "http_request", decision, url, "denied", started,
                                            method=method, redirectHop=hop or None, **trace)
                    message = decision.reason or "Denied by policy"
                    if hop:
                        message = "Redirect to %s denied: %s" % (url[:200], message)
                    raise RpcError(POLICY_DENIED, message)
            else:
                decision = Decision(True, None, None)
            if services.audit_blocked(conn, "http_request", url, started, method=method, redirectHop=hop or None):
                raise AuditError(AUDIT_TEXT)
            addresses = await self._addresses(conn, decision, dest, url, started, hop, trace, checked)
            status, reason, resp_headers, data, location = await self._one_hop(
                conn, decision, url, dest, addresses, method, headers, body, idle, started, hop, trace)
            if follow and status in (301, 302, 303, 307, 308) and location:
                next_url = urljoin(url, location)
                if urlsplit(next_url).scheme.lower() not in ("http", "https"):
                    break
                if status == 303 or (status in (301, 302) and method == "POST"):
                    if method != "HEAD":
                        method = "GET"
                    body = None
                    headers = [(k, v) for k, v in headers if k.lower() not in ("content-length", "content-type")]
                nt = url_target(next_url, method)
                if (nt.scheme, nt.host, nt.port) != first_origin:
                    headers = [(k, v) for k, v in headers if k.lower() not in _SENSITIVE]
                url = next_url
                continue
            break
        else:
            raise RpcError(NETWORK_ERROR, "Network error: too many redirects")
        result: Dict[str, Any] = {"status": status, "statusText": reason, "headers": resp_headers}
        if base64_mode:
            result["body"] = base64.b64encode(data).decode("ascii")
            result["bodyEncoding"] = "base64"
        elif raw_body:
            result["body"] = data
        else:
            result["body"] = data.decode("utf-8", "replace")
        return result

    async def _addresses(
        self, conn: Conn, decision: Decision, dest: _Url, url: str, started: float, hop: int,
        trace: Dict[str, Any], checked: bool,
    ) -> List[IPAddress]:
        """The addresses this hop may connect to: resolved here (never by aiohttp), and for a name
        every address a deny rule refuses left out; 1001 when none is left, 1004 when none exists."""
        services = self.services
        method = dest.target.method
        try:
            addresses = await resolve(dest.host, dest.target.port or 0, services.config.connect_timeout,
                                      services.resolver)
        except UpstreamError as exc:
            services.audit_decision(conn, "http_request", decision, url, "error", started,
                                    method=method, error=exc.message[:300], redirectHop=hop or None, **trace)
            raise RpcError(NETWORK_ERROR, "Network error: %s" % exc.message) from None
        permit = services.permit(dest.target) if checked else None
        if permit is None:
            return addresses
        refusals = [permit(str(ip)) for ip in addresses]
        allowed = [ip for ip, why in zip(addresses, refusals) if why is None]
        if not allowed:
            why = next(w for w in refusals if w is not None)
            services.audit_decision(conn, "http_request", Decision(False, None, why), url, "denied", started,
                                    method=method, redirectHop=hop or None, **trace)
            raise RpcError(POLICY_DENIED, why if not hop else "Redirect to %s denied: %s" % (url[:200], why))
        return allowed

    async def _one_hop(
        self, conn: Conn, decision: Decision, url: str, dest: _Url, addresses: List[IPAddress], method: str,
        headers: List[Tuple[str, str]], body: Optional[bytes], idle: float, started: float, hop: int,
        trace: Dict[str, Any],
    ) -> Tuple[int, str, Dict[str, str], bytes, Optional[str]]:
        services = self.services
        assert self.session is not None, "RpcService.start() was not awaited"
        send_headers = [("Host", dest.host_header())] + list(headers)
        has_length = any(k.lower() == "content-length" for k, _ in send_headers)
        if has_length:  # keep the caller's choice of a length, but never a wrong one
            send_headers = [(k, v) for k, v in send_headers if k.lower() != "content-length"]
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=services.config.connect_timeout, sock_read=idle)
        limit = services.config.max_rpc_response
        server_hostname = dest.host.text if dest.target.scheme == "https" and dest.host.ip is None else None
        try:
            first: Optional[BaseException] = None
            for attempt, ip in enumerate(addresses):
                try:
                    resp = await self.session.request(
                        method, dest.request_url(ip), headers=send_headers, data=body,
                        chunked=True if (body and not has_length) else None,
                        allow_redirects=False, timeout=timeout, server_hostname=server_hostname,
                    )
                    break
                except aiohttp.ClientSSLError:
                    raise  # the address answered: its TLS failure is the answer, not a reason to try another
                except aiohttp.ClientConnectorError as exc:
                    first = first or exc
                    if attempt == len(addresses) - 1:
                        raise first from None
            async with resp:
                buf = bytearray()
                async for chunk in resp.content.iter_chunked(256 * 1024):
                    buf += chunk
                    if len(buf) > limit:
                        raise RpcError(NETWORK_ERROR, "Network error: response body larger than %d bytes" % limit)
                out_headers: Dict[str, str] = {}
                # 0.7.2 copies fetch's headers one by one: of several Set-Cookie, the last one is kept
                last_cookie_only = services.config.rpc_only
                for k, v in resp.raw_headers:
                    name = k.decode("latin-1").lower()
                    value = v.decode("latin-1")
                    if name in out_headers and not (last_cookie_only and name == "set-cookie"):
                        value = out_headers[name] + ", " + value
                    out_headers[name] = value
                status, reason = resp.status, resp.reason or ""
                location = resp.headers.get("Location")
        except RpcError as exc:
            services.audit_decision(conn, "http_request", decision, url, "error", started,
                                    method=method, error=exc.message, redirectHop=hop or None, **trace)
            raise
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
            services.audit_decision(conn, "http_request", decision, url, "error", started,
                                    method=method, error="timeout", redirectHop=hop or None, **trace)
            raise RpcError(NETWORK_ERROR, "Request timeout") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            services.audit_decision(conn, "http_request", decision, url, "error", started,
                                    method=method, error=str(exc)[:300], redirectHop=hop or None, **trace)
            raise RpcError(NETWORK_ERROR, "Network error: %s" % (str(exc) or type(exc).__name__)) from None
        services.audit_decision(conn, "http_request", decision, url, "success", started,
                                method=method, status=status, redirectHop=hop or None, **trace)
        return status, reason, out_headers, bytes(buf), location

    @staticmethod
    def _request_body(raw: Any, base64_mode: bool) -> Optional[bytes]:
        if raw is None:
            return None
        if base64_mode:
            if not isinstance(raw, str):
                raise RpcError(INVALID_REQUEST, "Invalid Request: base64 body must be a string")
            try:
                data = base64.b64decode(raw.encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError):
                raise RpcError(INVALID_REQUEST, "Invalid Request: body is not valid base64") from None
            return data or None
        text = raw if isinstance(raw, str) else json.dumps(raw, separators=(",", ":"))
        return text.encode("utf-8") or None

    @staticmethod
    def _request_headers(raw: Any) -> List[Tuple[str, str]]:
        out: List[Tuple[str, str]] = []
        if not isinstance(raw, dict):
            return out
        for k, v in raw.items():
            name = str(k)
            if not name or not set(name) <= _TOKEN_CHARS:
                raise RpcError(INVALID_REQUEST, "Invalid Request: bad header name %r" % name[:100])
            if name.lower() in ("host", "connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"):
                continue
            values = v if isinstance(v, list) else [v]
            for item in values:
                text = item if isinstance(item, str) else json.dumps(item)
                if any(c in text for c in "\r\n\x00"):
                    raise RpcError(INVALID_REQUEST, "Invalid Request: bad value for header %r" % name[:100])
                out.append((name, text))
        return out
