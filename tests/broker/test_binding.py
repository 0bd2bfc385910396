"""Policy decisions bind connections: no spelling, resolver answer, trailer or kept connection gets
a request to an address the policy denies (issue 15, red-team findings), by forward, ``CONNECT``
or rpc ``http_request`` alike.

The policy allows everything but ``127.0.0.2``; a listener on ``127.0.0.2`` counts every connection
it is offered and must count none. Names are resolved by a recording resolver (loopback answers
only), so no test sends a DNS query, and names that must never reach a resolver are checked too.
"""

import json
import socket
import threading
import time
import urllib.request
from typing import Any, Iterator, List, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agenshield_shim.broker.config import BrokerConfig
from agenshield_shim.broker.runner import BrokerThread, LoopThread

from .conftest import AuditSink, raw_exchange, status_of

POLICY = """
default = "allow"

[[rules]]
id = "deny-two"
action = "deny"
hosts = ["127.0.0.2"]
"""

#: The red-team spellings of 127.0.0.2 from the issue, and a few more of the same families.
SPELLINGS = [
    "2130706434", "0177.0.0.2", "0x7f.0.0.2", "0x7F.0.0.2", "127.2", "127.0.2", "127.000.000.002",
    "127.0.0.02", "017700000002", "0x7f000002", "[::ffff:127.0.0.2]", "[::ffff:7f00:2]",
    "[::FFFF:7F00:0002]", "[0:0:0:0:0:ffff:127.0.0.2]", "127.0.0.2.", "127.0.0.2\u00ad",
    "127\uff0e0\uff0e0\uff0e2", "127\u30020\u30020\u30022", "127.0.0.2\u200b", "127.0.0.0x2",
]


class Listener:
    """A TCP listener that counts the connections offered to it and closes each at once."""

    def __init__(self, host: str) -> None:
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


class RecordingResolver:
    """Loopback-only resolver: ``two.test`` is 127.0.0.2, ``mapped.test`` ::ffff:127.0.0.2, the rest 127.0.0.1."""

    def __init__(self) -> None:
        self.asked: List[str] = []

    async def __call__(self, host: str, port: int) -> List[Any]:
        self.asked.append(host)
        if host in ("two.test", "2fast.test", "host2"):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", port))]
        if host == "mapped.test":
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::ffff:127.0.0.2", port, 0, 0))]
        if host == "both.test":  # a denied address first, an allowed one second
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", port)),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]


class Setup:
    def __init__(self, loop_thread: LoopThread, policy_file: str) -> None:
        self.denied = Listener("127.0.0.2")
        self.allowed = Listener("127.0.0.1")
        self.resolver = RecordingResolver()
        self.audit = AuditSink()
        self.bt = BrokerThread(
            BrokerConfig(port=0, policy_file=policy_file, connect_timeout=2.0, idle_timeout=2.0),
            loop_thread=loop_thread, audit_stream=self.audit, resolver=self.resolver)
        self.port = self.bt.port

    def forward(self, host: str, port: Optional[int] = None) -> bytes:
        target = "http://%s:%d/" % (host, port or self.denied.port)
        return raw_exchange(self.port, b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % target.encode())

    def connect(self, host: str, port: Optional[int] = None) -> bytes:
        target = ("%s:%d" % (host, port or self.denied.port)).encode()
        return raw_exchange(self.port, b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target))

    def rpc(self, host: str, port: Optional[int] = None) -> Any:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "http_request",
                           "params": {"url": "http://%s:%d/" % (host, port or self.denied.port), "timeout": 2000}})
        req = urllib.request.Request(self.bt.url + "/rpc", data=body.encode(), headers={"Content-Type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=15) as resp:
            return json.loads(resp.read())

    def close(self) -> None:
        self.bt.stop()
        self.denied.close()
        self.allowed.close()


@pytest.fixture(scope="module")
def setup(loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    path = tmp_path_factory.mktemp("binding") / "policy.toml"
    path.write_text(POLICY)
    s = Setup(loop_thread, str(path))
    yield s
    s.close()


def _refused_everywhere(s: Setup, spelling: str) -> None:
    fwd = s.forward(spelling)
    assert fwd and status_of(fwd) in (400, 403), (spelling, fwd[:200])
    con = s.connect(spelling)
    assert con and status_of(con) in (400, 403), (spelling, con[:200])
    answer = s.rpc(spelling)
    assert answer["error"]["code"] == 1001, (spelling, answer)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_other_spellings_never_reach_the_denied_address(setup: Setup, spelling: str) -> None:
    before = setup.denied.accepted
    _refused_everywhere(setup, spelling)
    time.sleep(0.05)
    assert setup.denied.accepted == before, "a request reached 127.0.0.2 as %r" % spelling


def test_the_listeners_are_reachable_when_allowed(setup: Setup) -> None:
    """The control: the same requests to 127.0.0.1 are served, so a refusal above means something."""
    before = setup.allowed.accepted
    out = setup.connect("127.0.0.1.", setup.allowed.port)  # trailing dot: the address, not a DNS name
    assert out.startswith(b"HTTP/1.1 200 Connection Established")
    assert setup.allowed.accepted == before + 1
    assert "127.0.0.1." not in setup.resolver.asked and "127.0.0.1" not in setup.resolver.asked


def test_numeric_spellings_never_reach_the_resolver(setup: Setup) -> None:
    asked = len(setup.resolver.asked)
    for spelling in SPELLINGS:
        setup.forward(spelling)
        setup.connect(spelling)
    assert setup.resolver.asked[asked:] == []


@pytest.mark.parametrize("name", ["two.test", "mapped.test", "2fast.test", "host2"])
def test_a_name_resolving_to_a_denied_address_is_refused(setup: Setup, name: str) -> None:
    """The policy allows the name; the address it resolves to is denied: refused, never connected."""
    before = setup.denied.accepted
    fwd = setup.forward(name)
    assert status_of(fwd) == 403 and b"resolves to 127.0.0.2" in fwd
    con = setup.connect(name)
    assert status_of(con) == 403 and b"resolves to 127.0.0.2" in con
    answer = setup.rpc(name)
    assert answer["error"]["code"] == 1001 and "resolves to 127.0.0.2" in answer["error"]["message"]
    assert setup.denied.accepted == before
    entry = setup.audit.entries()[-1]
    assert entry["allowed"] is False and entry["result"] == "denied"


def test_only_the_allowed_address_of_a_name_is_tried(setup: Setup) -> None:
    before_denied, before_allowed = setup.denied.accepted, setup.allowed.accepted
    out = setup.connect("both.test", setup.allowed.port)
    assert out.startswith(b"HTTP/1.1 200 Connection Established")
    assert (setup.denied.accepted, setup.allowed.accepted) == (before_denied, before_allowed + 1)


def test_localhost_names_are_loopback_without_a_resolver(setup: Setup) -> None:
    asked = len(setup.resolver.asked)
    before = setup.allowed.accepted
    for name in ("localhost", "agent.localhost", "A.B.LOCALHOST."):
        out = setup.connect(name, setup.allowed.port)
        assert out.startswith(b"HTTP/1.1 200 Connection Established"), (name, out)
    assert setup.allowed.accepted == before + 3
    out = setup.connect("nothing.invalid", setup.allowed.port)
    assert status_of(out) == 403 and b"dns-resolution-failed" in out
    assert setup.resolver.asked[asked:] == []


def test_default_policy_localhost_is_not_resolved(make_broker: Any, servers: Any) -> None:
    """The default policy's ``*.localhost`` rule: decided as loopback, never sent to the resolver."""
    b = make_broker()
    asked: List[str] = []

    async def spy(host: str, port: int) -> List[Any]:
        asked.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "must not be asked")

    b.broker.services.resolver = spy
    out = raw_exchange(b.port, b"GET http://api.localhost:%d/hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                       % servers.http_port)
    assert status_of(out) == 200 and out.endswith(b"hello")
    assert asked == []


# -- fuzz: generated spellings of 127.0.0.2 -------------------------------------------------------------

_OCTETS = [127, 0, 0, 2]


def _num(value: int, style: str, width: int) -> str:
    if style == "hex":
        return "0x%0*x" % (width, value)
    if style == "HEX":
        return "0X%0*X" % (width, value)
    if style == "oct":
        return "0%0*o" % (width, value)
    return "%0*d" % (width, value)


@st.composite
def ipv4_spellings(draw: Any) -> str:
    """127.0.0.2 in the forms libc's inet_aton and WHATWG read as it: 1 to 4 parts, any base, padding."""
    parts = draw(st.integers(1, 4))
    if parts == 4:
        values = _OCTETS
    elif parts == 3:
        values = [127, 0, 2]
    elif parts == 2:
        values = [127, 2]
    else:
        values = [0x7F000002]
    styles = draw(st.lists(st.sampled_from(["dec", "hex", "HEX", "oct"]), min_size=parts, max_size=parts))
    widths = draw(st.lists(st.integers(0, 4), min_size=parts, max_size=parts))
    return ".".join(_num(v, s, w) for v, s, w in zip(values, styles, widths))


@st.composite
def ipv6_spellings(draw: Any) -> str:
    tail = draw(st.sampled_from(["127.0.0.2", "7f00:2", "7F00:0002", "7f00:02"]))
    head = draw(st.sampled_from(["::ffff:", "0::ffff:", "0:0:0:0:0:ffff:", "::FFFF:", "0:0::ffff:"]))
    return "[%s%s]" % (head, tail)


_DECORATIONS = ["", ".", "\u00ad", "\u200b", "\u200d", "\ufeff"]
_DOTS = [".", "\uff0e", "\u3002", "\uff61"]


@st.composite
def decorated(draw: Any) -> str:
    base = draw(st.one_of(ipv4_spellings(), ipv6_spellings()))
    if not base.startswith("["):
        dot = draw(st.sampled_from(_DOTS))
        base = base.replace(".", dot)
        if draw(st.booleans()):
            base = base.upper()
    return base + draw(st.sampled_from(_DECORATIONS))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spelling=decorated())
def test_fuzz_spellings_never_reach_the_denied_address(setup: Setup, spelling: str) -> None:
    before = setup.denied.accepted
    fwd = setup.forward(spelling)
    con = setup.connect(spelling)
    answer = setup.rpc(spelling)
    time.sleep(0.02)
    assert setup.denied.accepted == before, "reached 127.0.0.2 as %r" % spelling
    # each channel answered (a refusal), none dropped the connection or crashed the broker
    assert status_of(fwd) in (400, 403) and status_of(con) in (400, 403), spelling
    assert "error" in answer, (spelling, answer)


# -- framing: a trailer cannot carry a request, a kept upstream with unread bytes is not reused ----------


class RawUpstream:
    """Answers each request head with ``HTTP/1.1 200`` and the request's path as the body; with
    ``extra`` it appends that many bytes after every response (a response nobody asked for)."""

    def __init__(self, extra: bytes = b"") -> None:
        self.extra = extra
        self.received = bytearray()
        self.connections = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        conn.settimeout(5)
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                self.received += data
                buf += data
                while b"\r\n\r\n" in buf:
                    head, buf = buf.split(b"\r\n\r\n", 1)
                    path = head.split(b" ")[1]
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path) + self.extra)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()


@pytest.mark.parametrize("trailer", [
    b"0\r\nGET /bytes HTTP/1.1\r\nHost: x\r\n\r\n",     # a request line as a trailer line
    b"0\r\n\nGET /bytes HTTP/1.1\r\nHost: x\r\n\r\n",   # a bare LF ending the trailers
    b"0\n\r\nGET /bytes HTTP/1.1\r\nHost: x\r\n\r\n",   # a bare LF ending the last chunk line
    b"0;\r\n\r\nGET /bytes HTTP/1.1\r\nHost: x\r\n\r\n",  # an empty chunk extension
    b"0 \r\n\r\nGET /bytes HTTP/1.1\r\nHost: x\r\n\r\n",  # whitespace after the size
])
def test_a_trailer_cannot_smuggle_a_request(make_broker: Any, tmp_path: Any, trailer: bytes) -> None:
    up = RawUpstream()
    try:
        policy = tmp_path / "p.toml"
        policy.write_text('[[rules]]\nid = "hello-only"\naction = "allow"\nhosts = ["127.0.0.1"]\npaths = ["/hello"]\n')
        b = make_broker(policy_file=str(policy))
        req = (b"POST http://127.0.0.1:%d/hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n" % up.port) + trailer
        out = raw_exchange(b.port, req)
        time.sleep(0.1)
        assert b"/bytes" not in bytes(up.received)
        assert b"/bytes" not in out
        # 400, or (when this upstream answers before the body is read) its one answer, then close
        assert status_of(out) in (400, 200) and out.count(b"HTTP/1.1 ") == 1
        assert b.stats().get("internal_errors", 0) == 0
    finally:
        up.close()


def test_a_valid_trailer_is_forwarded(make_broker: Any) -> None:
    up = RawUpstream()
    try:
        b = make_broker(allow=["127.0.0.1"])
        req = (b"POST http://127.0.0.1:%d/t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
               b"5;ext=\"a b\"\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n" % up.port)
        out = raw_exchange(b.port, req)
        assert status_of(out) == 200 and out.endswith(b"/t")
        deadline = time.monotonic() + 2
        while b"X-Sum: 1\r\n\r\n" not in up.received and time.monotonic() < deadline:
            time.sleep(0.02)
        assert up.received.endswith(b"0\r\nX-Sum: 1\r\n\r\n")
    finally:
        up.close()


def test_a_kept_upstream_with_unread_bytes_is_not_reused(make_broker: Any) -> None:
    """The upstream sends a second, unrequested response after each one: the next request of the
    client must get its own answer from a new upstream connection, never the planted one."""
    up = RawUpstream(extra=b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPLANTD")
    try:
        b = make_broker(allow=["127.0.0.1"])
        with socket.create_connection(("127.0.0.1", b.port), timeout=10) as s:
            answers = []
            for path in (b"/first", b"/second"):
                s.sendall(b"GET http://127.0.0.1:%d%s HTTP/1.1\r\nHost: x\r\n\r\n" % (up.port, path))
                data = b""
                while not data.endswith(b"\r\n\r\n" + path) and b"PLANTD" not in data:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                answers.append(data)
        assert answers[0].endswith(b"/first") and answers[1].endswith(b"/second"), answers
        assert up.connections == 2
    finally:
        up.close()


def test_policy_check_answers_on_the_canonical_form(setup: Setup) -> None:
    """``policy_check`` decides as the requests themselves would: never ``allowed`` for a spelling
    of a denied address."""
    def check(operation: str, target: str) -> Any:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "policy_check",
                           "params": {"operation": operation, "target": target}})
        req = urllib.request.Request(setup.bt.url + "/rpc", data=body.encode())
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10) as resp:
            return json.loads(resp.read())["result"]

    for spelling in SPELLINGS:
        assert check("connect", "%s:80" % spelling)["allowed"] is False, spelling
        assert check("http_request", "http://%s/" % spelling)["allowed"] is False, spelling
    assert check("connect", "127.0.0.1.:80")["allowed"] is True
