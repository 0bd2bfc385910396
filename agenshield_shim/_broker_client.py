"""A minimal client for the broker's own endpoints, shared by the library hooks.

The hooks need to ask the broker one thing outside the libraries they patch: *why* it refused a
destination (a refused ``CONNECT`` carries only a status and an ``X-Proxy-Error`` code, and the
libraries discard the body). One JSON-RPC ``policy_check`` call, made only on the refusal path,
answers it. This module knows the broker protocol and no HTTP library; it uses a plain socket (or
asyncio streams), which the guard lets through because the destination is the broker.
"""

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover - hooks load this module, and typing costs 3.3-4.3 ms
    from typing import Any, Optional

#: The bodies of the broker's forward-proxy refusals (403 policy, 502 upstream) when it sends no
#: ``X-Proxy-Error`` header (the AgenShield daemon does not, on forwards).
FORWARD_REFUSAL_BODIES = (b"Blocked by AgenShield URL policy", b"Proxy error")


def connect_unix(path: str, timeout: "Optional[float]", kind: "Any" = None) -> "Any":
    """A stream socket connected to the broker's Unix socket; ``kind`` is a ``socket.socket``
    subclass when the caller needs one. Closed again if the connect fails."""
    import socket

    sock = (kind or socket.socket)(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def policy_check_request(host: str, target: str) -> bytes:
    """The raw ``POST /rpc`` asking the broker why ``target`` is refused (ASCII JSON, one write)."""
    import json

    body = json.dumps({
        "jsonrpc": "2.0", "id": 1, "method": "policy_check",
        "params": {"operation": "connect" if "://" not in target else "http_request", "target": target},
    }).encode("ascii")
    head = "POST /rpc HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" \
        "Connection: close\r\n\r\n" % (host, len(body))
    return head.encode("ascii") + body


def policy_check_reason(raw: bytes) -> "Optional[str]":
    """The ``reason`` of a ``policy_check`` answer (a whole HTTP/1.1 response read to EOF, maybe
    chunked, read with the package's codec); None if there is none or the answer is not HTTP."""
    import json

    from . import http1

    end = http1.head_end(raw)
    try:
        if end < 0:
            return None
        head = http1.parse_response_head(raw[:end])
        kind, n = http1.response_framing(head, "POST")
        body = raw[end:]
        if kind == "chunked":
            decoder = http1.ChunkedDecoder()
            body = decoder.feed(body)
            decoder.feed_eof()
        elif kind == "length":
            if len(body) < n:
                return None
            body = body[:n]
        elif kind == "none":
            body = b""
    except http1.HttpError:
        return None
    try:
        result = json.loads(body.decode("utf-8"))["result"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(result, dict) or result.get("allowed"):
        return None
    reason = result.get("reason")
    return reason if isinstance(reason, str) and reason else None


async def ask_broker_reason(host: str, port: int, target: str, timeout: float = 1.0) -> "Optional[str]":
    """The broker's reason for refusing ``target`` (``host:port`` or a URL); None when unknown."""
    import asyncio

    async def ask() -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(policy_check_request(host, target))
            return await reader.read()
        finally:
            writer.close()

    try:
        return policy_check_reason(await asyncio.wait_for(ask(), timeout))
    except (OSError, asyncio.TimeoutError, ValueError):
        return None


def ask_broker_reason_sync(host: str, port: int, target: str, timeout: float = 1.0) -> "Optional[str]":
    """The broker's reason for refusing ``target``, asked with one ``policy_check`` (refusals only)."""
    import socket

    try:
        with socket.create_connection((host, port), timeout) as sock:
            sock.sendall(policy_check_request(host, target))
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
    except OSError:
        return None
    return policy_check_reason(b"".join(chunks))
