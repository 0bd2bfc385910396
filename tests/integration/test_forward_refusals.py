"""A forward-proxy refusal is recognised whatever its framing, with or without ``X-Proxy-Error``.

aiohttp and httpx send plain ``http://`` requests to the broker in absolute form; the broker's
refusal comes back as a response. The reference broker marks it with ``X-Proxy-Error``; the
daemon's later source sends ``403 Blocked by AgenShield URL policy`` chunked and without it. A
stand-in broker on loopback answers every forwarded request with a 403 in one framing
(``Content-Length``, chunked, close-delimited), with or without the header, and answers
``policy_check`` by a fixed verdict: the application must get the AgenShield error with the
broker's reason when the policy denies the URL, and the upstream's own 403 untouched when it allows it.
"""

import json
import socket
import threading
from typing import Any, Iterator, List

import pytest

from .conftest import ShimEnv

pytestmark = pytest.mark.integration

BODY = b"Blocked by AgenShield URL policy"
REASON = "Host '127.0.0.9' is not allowed by rule stand-in"


def framed(framing: str, header: bool) -> bytes:
    head = b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\n"
    if header:
        head += b"X-Proxy-Error: blocked-by-policy\r\n"
    if framing == "length":
        return head + b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
    if framing == "chunked":
        return head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)
    return head + b"Connection: close\r\n\r\n" + BODY


class StandIn:
    """Answers absolute-form requests with ``answer`` and ``POST /rpc`` policy_check with ``allowed``."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.port = self.server.getsockname()[1]
        self.answer = b""
        self.allowed = False
        self.checks: List[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, rest = data.partition(b"\r\n\r\n")
                if head.startswith(b"POST /rpc "):
                    length = int([line.split(b":", 1)[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:")][0])
                    while len(rest) < length:
                        rest += conn.recv(65536)
                    call = json.loads(rest[:length])
                    self.checks.append(call["params"]["target"])
                    result = {"allowed": True} if self.allowed else {"allowed": False, "reason": REASON}
                    body = json.dumps({"jsonrpc": "2.0", "id": call["id"], "result": result}).encode()
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                                 b"Connection: close\r\n\r\n%s" % (len(body), body))
                    return
                conn.sendall(self.answer)
                if b"Connection: close" in self.answer:
                    conn.shutdown(socket.SHUT_WR)
            except OSError:
                return

    def close(self) -> None:
        self.server.close()


@pytest.fixture(scope="module")
def stand_in() -> Iterator[StandIn]:
    server = StandIn()
    yield server
    server.close()


@pytest.fixture(scope="module")
def env(shim_env_factory: Any) -> ShimEnv:
    return shim_env_factory("3.11", "aiohttp", "httpx")  # type: ignore[no-any-return]


SCRIPT = r'''
import asyncio, json, sys
import aiohttp, httpx
URL = sys.argv[1]
out = {}
def record(name, fn):
    try:
        out[name] = ["ok", fn()]
    except Exception as exc:
        out[name] = ["error", "%s: %s" % (type(exc).__name__, exc)]
def httpx_get():
    with httpx.Client(timeout=5) as c:
        r = c.get(URL)
        return [r.status_code, r.text]
async def httpx_aget():
    async with httpx.AsyncClient(timeout=5) as c:
        r = await c.get(URL)
        return [r.status_code, r.text]
async def aiohttp_get():
    async with aiohttp.ClientSession() as s:
        async with s.get(URL, timeout=aiohttp.ClientTimeout(total=5)) as r:
            return [r.status, await r.text()]
async def aiohttp_raise():
    async with aiohttp.ClientSession(raise_for_status=True) as s:
        async with s.get(URL, timeout=aiohttp.ClientTimeout(total=5)) as r:
            return [r.status, await r.text()]
record("httpx", httpx_get)
record("httpx-async", lambda: asyncio.run(httpx_aget()))
record("aiohttp", lambda: asyncio.run(aiohttp_get()))
record("aiohttp-raise", lambda: asyncio.run(aiohttp_raise()))
print("RESULTS " + json.dumps(out))
'''


def run(env: ShimEnv, stand_in: StandIn) -> Any:
    result = env.run(SCRIPT, "http://127.0.0.9:8080/path?x=1", timeout=120,
                     env={"AGENSHIELD_BROKER_HOST": "127.0.0.1", "AGENSHIELD_BROKER_PORT": str(stand_in.port),
                          "AGENSHIELD_TRANSPORT": "tunnel"})
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")]
    assert lines, result.stdout + result.stderr
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.parametrize("header", [True, False], ids=["x-proxy-error", "bare"])
@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_refusal_recognised_in_any_framing(env: ShimEnv, stand_in: StandIn, framing: str, header: bool) -> None:
    stand_in.answer = framed(framing, header)
    stand_in.allowed = False
    results = run(env, stand_in)
    for name, (status, text) in results.items():
        if name.startswith("httpx"):  # httpx's refusal is the shim's 403 answer (hooks/httpx.refusal_response)
            assert status == "ok" and text[0] == 403 and text[1] != BODY.decode(), (name, text)
            text = text[1]
        else:
            assert status == "error", (name, text)
        assert "AgenShield" in text and "127.0.0.9" in text and REASON in text, (name, text)


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_upstream_403_passes_through_when_the_policy_allows(env: ShimEnv, stand_in: StandIn, framing: str) -> None:
    stand_in.answer = framed(framing, False)
    stand_in.allowed = True
    del stand_in.checks[:]
    results = run(env, stand_in)
    assert results["httpx"] == ["ok", [403, BODY.decode()]]
    assert results["httpx-async"] == ["ok", [403, BODY.decode()]]
    assert results["aiohttp"] == ["ok", [403, BODY.decode()]]
    assert results["aiohttp-raise"][0] == "error" and "403" in results["aiohttp-raise"][1]
    assert "AgenShield" not in results["aiohttp-raise"][1]
    assert stand_in.checks and all(t == "http://127.0.0.9:8080/path?x=1" for t in stand_in.checks)
