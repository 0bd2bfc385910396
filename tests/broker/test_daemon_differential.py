"""``broker --compat 0.7.2`` against the real AgenShield daemon 0.7.2: one corpus, the same answers.

The same requests (valid, refused by policy, malformed) go to the reference broker run as a real
subprocess (``python -m agenshield_shim.broker --compat 0.7.2``) and to the daemon itself
(``tests.daemon.Daemon``, ``@agenshield/broker@0.7.2`` under node), both on 127.0.0.1, both with a
Unix socket; the upstream is this suite's loopback aiohttp server (HTTP and HTTPS with a test CA).
Each answer is reduced to what a client sees with the clock taken out: the status line, every
header name and value in order (``Date`` only checked for its format), the framing (chunked,
Content-Length, close-delimited, or the connection closed without a byte), the body (JSON with
``timestamp``/``date`` values replaced), and, over the Unix socket, the list of answer lines.

Where the reference broker differs on purpose (``PROTOCOL.md``, "Differences from the daemon that
--compat keeps"), the case is in ``DIFFERENCES`` with the reason, and the test checks both sides
of that difference explicitly instead of equality.

The daemon's policy is its built-in one (loopback URLs with an explicit port allowed, anything
else refused); the reference broker gets the equivalent rule under the daemon's rule id. The
daemon asks a "daemon URL" before refusing; it is pointed at a loopback port that refuses.
"""

import json
import os
import re
import shutil
import socket
import tempfile
import time
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from agenshield_shim.broker.runner import BrokerProcess
from tests.daemon import Daemon, DaemonUnavailable

pytestmark = pytest.mark.timeout(180)

POLICY = """\
[[rules]]
id = "builtin-allow-localhost"
action = "allow"
hosts = ["127.0.0.1", "localhost"]
schemes = ["http", "https"]
"""
_DATE = re.compile(r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d GMT$")
_ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
_TIME_KEYS = {"timestamp": _ISO, "date": _DATE, "last-modified": _DATE}


def skip_unless_local(reason: str) -> None:
    """As ``tests/integration/conftest.py``: a gap on a developer's machine, a failure on CI."""
    if os.environ.get("CI"):
        pytest.fail("CI must have this: %s" % reason)
    pytest.skip(reason)


# -- reading answers ---------------------------------------------------------------------------


def _exchange(address: Any, data: bytes, timeout: float = 15.0) -> Tuple[bytes, bool]:
    """Send ``data``, read until the server closes: (bytes, closed). Every corpus request ends in a
    ``Connection: close`` (or one the server must close), so EOF is the normal end."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(address)
        s.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                return out, False
            except ConnectionResetError:
                return out, True
            if not chunk:
                return out, True
            out += chunk
        return out, False


def _normalise_json(value: Any) -> Any:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            pattern = _TIME_KEYS.get(k)
            if pattern is not None and isinstance(v, str):
                assert pattern.match(v), "%s=%r is not a %s" % (k, v, k)
                v = "<%s>" % k
            out[k] = _echo(_normalise_json(v)) if k == "result" else _normalise_json(v)
        return out
    if isinstance(value, list):
        return [_normalise_json(v) for v in value]
    return value


def _echo(value: Any) -> Any:
    """An ``http_request`` result from the upstream's ``/echo``: what arrived there, with header names
    lower-cased and sorted (their order and case on the wire are the HTTP client's), ``Connection``
    left out (hop-by-hop: Node's fetch says keep-alive, aiohttp says nothing, both keep it alive)."""
    if isinstance(value, dict) and isinstance(value.get("body"), str) and value["body"].startswith('{"method"'):
        seen = json.loads(value["body"])
        seen["headers"] = sorted([k.lower(), v] for k, v in seen["headers"] if k.lower() != "connection")
        headers = dict(value["headers"], **{"content-length": "<length of the echo>"})
        value = dict(value, body=seen, headers=headers)
    return value


def _body(data: bytes) -> Any:
    try:
        return ("json", _normalise_json(json.loads(data.decode("utf-8"))))
    except ValueError:
        return ("bytes", data.decode("latin-1"))


def _dechunk(data: bytes) -> Tuple[bytes, bytes]:
    body = b""
    while True:
        line, _, data = data.partition(b"\r\n")
        size = int(line.split(b";")[0], 16)
        if size == 0:
            _trailer, _, rest = data.partition(b"\r\n")
            return body, rest
        body, data = body + data[:size], data[size + 2:]


def parse_responses(raw: bytes, closed: bool, head_requests: int = 0) -> List[Dict[str, Any]]:
    """Split what one connection received into responses, each reduced to what is compared."""
    out: List[Dict[str, Any]] = []
    while raw:
        head, sep, raw = raw.partition(b"\r\n\r\n")
        assert sep, "incomplete response head: %r" % head
        lines = head.decode("latin-1").split("\r\n")
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            value = value.strip()
            if name.lower() == "date":
                assert _DATE.match(value), value
                value = "<date>"
            headers.append((name, value))
        names = {k.lower(): v for k, v in headers}
        status = int(lines[0].split()[1])
        if status == 100:
            out.append({"status": lines[0], "headers": headers})
            continue
        if head_requests > 0:
            framing, body = "none (HEAD)", b""
            head_requests -= 1
        elif names.get("transfer-encoding") == "chunked":
            framing = "chunked"
            body, raw = _dechunk(raw)
        elif "content-length" in names:
            framing = "length"
            n = int(names["content-length"])
            body, raw = raw[:n], raw[n:]
        else:
            framing = "close-delimited"
            body, raw = raw, b""
        out.append({"status": lines[0], "headers": headers, "framing": framing, "body": _body(body)})
    out.append({"connection": "closed" if closed else "left open"})
    return out


def parse_lines(raw: bytes) -> List[Any]:
    assert raw.endswith(b"\n"), raw
    return [_body(line) for line in raw.split(b"\n")[:-1]]


# -- the corpus --------------------------------------------------------------------------------

SENTINEL = b'{"jsonrpc":"2.0","id":"end","method":"ping","params":{}}'


def rpc_corpus(http: str, https: str, refused_port: int) -> Dict[str, bytes]:
    """JSON-RPC bodies, each sent as ``POST /rpc`` and as one line over the Unix socket."""

    def call(method: Any, params: Any = None, req_id: Any = 1, **extra: Any) -> bytes:
        obj: Dict[str, Any] = {"jsonrpc": "2.0", "id": req_id, "method": method}
        if params is not None:
            obj["params"] = params
        obj.update(extra)
        return json.dumps(obj).encode()

    return {
        "ping": call("ping", {}),
        "ping-echo": call("ping", {"echo": {"x": [1, "two"]}}),
        "ping-without-params": call("ping"),
        "ping-params-null": b'{"jsonrpc":"2.0","id":1,"method":"ping","params":null}',
        "ping-params-list": call("ping", []),
        "id-string": call("ping", {}, req_id="abc"),
        "id-null": call("ping", {}, req_id=None),
        "id-object": call("ping", {}, req_id={"k": [1]}),
        "id-float": call("ping", {}, req_id=1.5),
        "id-missing": b'{"jsonrpc":"2.0","method":"ping","params":{}}',
        "non-ascii": call("ping", {"echo": "\u00e9\u4e2d"}, req_id="\u00e9"),
        "unknown-method": call("no_such_method", {}, req_id=7),
        "unknown-method-id-true": call("no_such_method", {}, req_id=True),
        "method-number": call(5, {}),
        "method-empty": call("", {}),
        "method-missing": b'{"jsonrpc":"2.0","id":3,"params":{}}',
        "jsonrpc-1.0": b'{"jsonrpc":"1.0","id":3,"method":"ping","params":{}}',
        "batch": b'[' + call("ping", {}) + b']',
        "batch-empty": b"[]",
        "json-null": b"null",
        "json-number": b"5",
        "json-string": b'"ping"',
        "json-empty-object": b"{}",
        "bad-json": b'{"jsonrpc":"2.0",',
        "exec": call("exec", {"command": "ls"}, req_id=4),
        "file_write": call("file_write", {"path": "/tmp/x", "content": "x"}, req_id=4),
        "skill_install": call("skill_install", {}, req_id=4),
        "policy_check-allowed": call("policy_check", {"operation": "http_request", "target": http + "/hello"}),
        "policy_check-denied": call("policy_check", {"operation": "http_request", "target": "http://127.0.0.2:8080/"}),
        "policy_check-not-a-url": call("policy_check", {"operation": "http_request", "target": "127.0.0.1:443"}),
        "policy_check-other-operation": call("policy_check", {"operation": "connect", "target": "127.0.0.1:443"}),
        "policy_check-no-operation": call("policy_check", {"target": http}),
        "policy_check-without-params": call("policy_check"),
        "policy_check-no-target": call("policy_check", {"operation": "http_request"}),
        "http_request-allowed": call("http_request", {"url": http + "/hello"}),
        "http_request-https": call("http_request", {"url": https + "/hello"}),
        "http_request-repeated-headers": call("http_request", {"url": http + "/cookies"}),
        "http_request-gzip": call("http_request", {"url": http + "/gzip"}),
        "http_request-get-with-body": call("http_request", {"url": http + "/echo", "body": "x"}),
        "http_request-echo-object-body": call("http_request", {"url": http + "/echo", "method": "PUT", "body": {"a": 1},
                                                               "headers": {"User-Agent": "mine"}}),
        "http_request-echo-post": call("http_request", {"url": http + "/echo?q=1", "method": "POST", "body": "x\u00e9",
                                                        "headers": {"X-Test": "1", "Content-Type": "text/plain"}}),
        "http_request-upstream-404": call("http_request", {"url": http + "/status/404"}),
        "http_request-201-timeout-param": call("http_request", {"url": http + "/status/201", "method": "GET", "timeout": 5000}),
        "http_request-redirect-kept": call("http_request", {"url": http + "/redirect?to=/hello", "followRedirects": False}),
        "http_request-redirect-followed": call("http_request", {"url": http + "/redirect?to=/hello"}),
        # 0.7.2 checks only the first URL: the hop to 127.0.0.2 is attempted (and refused by the OS)
        "http_request-redirect-to-denied-host": call(
            "http_request", {"url": http + "/redirect?to=http://127.0.0.2:%d/" % refused_port}),
        "http_request-denied-127.0.0.2": call("http_request", {"url": "http://127.0.0.2:%d/hello" % refused_port}),
        "http_request-denied-name": call("http_request", {"url": "https://example.com/"}),
        "http_request-refused-port": call("http_request", {"url": "http://127.0.0.1:%d/" % refused_port}),
        "http_request-timeout": call("http_request", {"url": http + "/slow?s=2", "timeout": 300}),
        "http_request-missing-url": call("http_request", {"method": "GET"}),
        "http_request-without-params": call("http_request"),
        "http_request-not-a-url": call("http_request", {"url": "not a url"}),
    }


def http_corpus(upstream_port: int) -> Dict[str, Tuple[bytes, int]]:
    """Raw requests to the HTTP port: (bytes, how many of them are HEAD requests)."""
    h = b"Host: 127.0.0.1\r\n"
    close = b"Connection: close\r\n"
    rpc = b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{}}'
    return {
        "health": (b"GET /health HTTP/1.1\r\n" + h + close + b"\r\n", 0),
        "health-keep-alive-then-second": (
            b"GET /health HTTP/1.1\r\n" + h + b"\r\n" + b"GET /health HTTP/1.1\r\n" + h + close + b"\r\n", 0),
        "health-http1.0": (b"GET /health HTTP/1.0\r\n\r\n", 0),
        "health-head": (b"HEAD /health HTTP/1.1\r\n" + h + close + b"\r\n", 1),
        "health-query": (b"GET /health?x=1 HTTP/1.1\r\n" + h + close + b"\r\n", 0),
        "health-post": (b"POST /health HTTP/1.1\r\n" + h + close + b"Content-Length: 2\r\n\r\n{}", 0),
        "rpc-get": (b"GET /rpc HTTP/1.1\r\n" + h + close + b"\r\n", 0),
        "rpc-delete": (b"DELETE /rpc HTTP/1.1\r\n" + h + close + b"\r\n", 0),
        "unknown-path": (b"GET /nope HTTP/1.1\r\n" + h + close + b"\r\n", 0),
        "api-proxy": (b"POST /api/proxy HTTP/1.1\r\n" + h + close + b"Content-Length: 2\r\n\r\n{}", 0),
        "options-star": (b"OPTIONS * HTTP/1.1\r\n" + h + close + b"\r\n", 0),
        "connect": (b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (upstream_port, upstream_port), 0),
        "connect-denied": (b"CONNECT 127.0.0.2:443 HTTP/1.1\r\nHost: 127.0.0.2:443\r\n\r\n", 0),
        "absolute-form-get": (
            b"GET http://127.0.0.1:%d/hello HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % (upstream_port, upstream_port) + close + b"\r\n", 0),
        "absolute-form-denied": (b"GET http://127.0.0.2/ HTTP/1.1\r\nHost: 127.0.0.2\r\n" + close + b"\r\n", 0),
        "garbage-request-line": (b"GARBAGE\r\n\r\n", 0),
        "http2-preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 0),
        "obs-fold": (b"GET /health HTTP/1.1\r\n" + h + b" folded: x\r\n\r\n", 0),
        "http1.2": (b"GET /health HTTP/1.2\r\n" + h + close + b"\r\n", 0),
        "content-length-superscript": (b"POST /rpc HTTP/1.1\r\n" + h + close + b"Content-Length: \xc2\xb2\r\n\r\n", 0),
        "no-host-http1.1": (b"GET /health HTTP/1.1\r\n" + close + b"\r\n", 0),
        "no-host-rpc": (b"POST /rpc HTTP/1.1\r\n" + close + b"Content-Length: %d\r\n\r\n" % len(rpc) + rpc, 0),
        "two-hosts": (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: 127.0.0.2\r\n" + close + b"\r\n", 0),
        "two-hosts-rpc": (b"POST /rpc HTTP/1.1\r\n" + h + h + close + b"Content-Length: %d\r\n\r\n" % len(rpc) + rpc, 0),
        "empty-host": (b"GET /health HTTP/1.1\r\nHost:\r\n" + close + b"\r\n", 0),
        "rpc-http1.0-chunked": (
            b"POST /rpc HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(rpc), rpc), 0),
        "rpc-content-length": (
            b"POST /rpc HTTP/1.1\r\n" + h + close + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(rpc) + rpc, 0),
        "rpc-chunked": (
            b"POST /rpc HTTP/1.1\r\n" + h + close + b"Transfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (10, rpc[:10], len(rpc) - 10, rpc[10:]), 0),
        "rpc-expect-100": (
            b"POST /rpc HTTP/1.1\r\n" + h + close + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(rpc) + rpc, 0),
        "rpc-keep-alive-then-second": (
            b"POST /rpc HTTP/1.1\r\n" + h + b"Content-Length: %d\r\n\r\n" % len(rpc) + rpc
            + b"POST /rpc HTTP/1.1\r\n" + h + close + b"Content-Length: %d\r\n\r\n" % len(rpc) + rpc, 0),
        "rpc-http1.0": (b"POST /rpc HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % len(rpc) + rpc, 0),
        "rpc-empty-body": (b"POST /rpc HTTP/1.1\r\n" + h + close + b"Content-Length: 0\r\n\r\n", 0),
    }


#: Several lines on one connection, malformed ones among them; the sentinel ends the exchange.
SOCKET_SESSION = (
    b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{}}\n'
    b"\n   \n"
    b"garbage\n"
    b'{"jsonrpc":"2.0","id":2,"method":"ping","params":{}}\r\n'
    b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    b'[{"jsonrpc":"2.0","id":3,"method":"ping","params":{}}]\n'
    b'{"jsonrpc":"2.0","id":4,"method":"ping"}\n'
    + SENTINEL + b"\n"
)

#: Where the reference broker answers differently on purpose: case -> why (``_expected_difference`` checks it).
DIFFERENCES: Dict[str, str] = {
    "socket:skill_install": (
        "the daemon's socket runs its skill installer (1003 about the slug); the reference broker implements no "
        "skills, so its policy refuses the method: 1001 No matching allow policy"),
    "http:policy_check-no-target": (
        "the daemon answers allowed:true for an empty URL (its network constraints skip it); the reference broker "
        "does not call an empty target allowed: allowed:false, reason 'URL is required'"),
    "socket:policy_check-no-target": "as http:policy_check-no-target",
    "raw:rpc-http1.0-chunked": (
        "the daemon de-chunks an HTTP/1.0 body sent with Transfer-Encoding; the reference broker's codec treats "
        "that framing as faulty (RFC 9112 6.1) in every mode, so --compat 0.7.2 answers Node's bare 400"),
    "socket:file_write": (
        "the daemon's socket puts file_write to its file-system policy (1001 'File path not in allowed "
        "directories'); the reference broker governs no files: 1001 No matching allow policy"),
}


def _first_json(answer: List[Any]) -> Any:
    """The JSON of the first answer: an HTTP response's body, or the first socket line."""
    first = answer[0]
    kind, obj = first["body"] if isinstance(first, dict) else first
    assert kind == "json", answer
    return obj


def _expected_difference(case: str, daemon: Any, ref: Any) -> None:
    if case == "raw:rpc-http1.0-chunked":
        assert _first_json(daemon)["result"]["pong"] is True, daemon
        bare_400 = parse_responses(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n", True)
        assert ref == bare_400, ref
        return
    d, r = _first_json(daemon), _first_json(ref)
    if case == "socket:file_write":
        assert d["error"] == {"code": 1001, "message": "File path not in allowed directories"}, daemon
        assert r == {"jsonrpc": "2.0", "id": 4, "error": {"code": 1001, "message": "No matching allow policy"}}, ref
    elif case == "socket:skill_install":
        assert d["id"] == 4 and d["error"]["code"] == 1003, daemon
        assert r == {"jsonrpc": "2.0", "id": 4, "error": {"code": 1001, "message": "No matching allow policy"}}, ref
    elif case.endswith(":policy_check-no-target"):
        assert d["result"] == {"allowed": True, "reason": "Allowed by network constraints"}, daemon
        assert r["result"] == {"allowed": False, "reason": "URL is required"}, ref
    else:  # pragma: no cover - a DIFFERENCES entry without a check
        raise AssertionError("no check for the declared difference %s" % case)


# -- running both ------------------------------------------------------------------------------


class Target:
    def __init__(self, name: str, port: int, socket_path: str) -> None:
        self.name, self.port, self.socket_path = name, port, socket_path

    def answers(self, rpc: Dict[str, bytes], raw: Dict[str, Tuple[bytes, int]]) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        address = ("127.0.0.1", self.port)
        for name, (data, heads) in raw.items():
            out["raw:" + name] = parse_responses(*_exchange(address, data), head_requests=heads)
        for name, body in rpc.items():
            req = (b"POST /rpc HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\n"
                   b"Content-Length: %d\r\n\r\n" % len(body)) + body
            out["http:" + name] = parse_responses(*_exchange(address, req))
            out["socket:" + name] = self.lines(body + b"\n")
        out["socket:session"] = self.lines(SOCKET_SESSION)
        return out

    def lines(self, data: bytes) -> List[Any]:
        """Lines answered on one connection; the sentinel call is sent last and ends the exchange."""
        if not data.endswith(SENTINEL + b"\n"):
            data += SENTINEL + b"\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(15)
            s.connect(self.socket_path)
            s.sendall(data)
            raw = b""
            while b'"id":"end"' not in raw or not raw.endswith(b"\n"):
                chunk = s.recv(65536)
                assert chunk, "%s closed the socket early: %r" % (self.name, raw)
                raw += chunk
        answers = parse_lines(raw)
        assert answers[-1][1]["id"] == "end", answers
        return answers[:-1]


@pytest.fixture(scope="module")
def answers(servers: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tuple[Dict[str, Any], Dict[str, Any]]]:
    if shutil.which("node") is None:
        skip_unless_local("node is needed to run the AgenShield daemon (apt-get install nodejs npm)")
    work = tmp_path_factory.mktemp("differential")
    # A loopback port bound but not listening: connections to it are refused (the daemon's "daemon URL",
    # and the upstream of the refused-port case)
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    refused_port = refused.getsockname()[1]
    try:
        daemon = Daemon(work, ca_file=servers.ca_path, env={"AGENSHIELD_DAEMON_URL": "http://127.0.0.1:%d" % refused_port})
    except DaemonUnavailable as exc:
        refused.close()
        skip_unless_local(str(exc))
    policy = work / "policy.toml"
    policy.write_text(POLICY)
    sock_dir = tempfile.mkdtemp(prefix="agsr-")
    ref_sock = os.path.join(sock_dir, "ref.sock")
    ref = BrokerProcess(["--compat", "0.7.2", "--host", "127.0.0.1", "--port", "0", "--unix", ref_sock,
                         "--policy", str(policy), "--upstream-ca", servers.ca_path, "--audit", str(work / "ref-audit.jsonl")])
    try:
        rpc = rpc_corpus(servers.http, servers.https, refused_port)
        raw = http_corpus(servers.http_port)
        got_daemon = Target("daemon", daemon.port, daemon.socket_path).answers(rpc, raw)
        got_ref = Target("reference broker", ref.port, ref_sock).answers(rpc, raw)
        assert daemon.proc.poll() is None, "the daemon died during the corpus"
        yield got_daemon, got_ref
    finally:
        ref.stop()
        daemon.stop()
        refused.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def _case_names() -> List[str]:
    rpc = rpc_corpus("http://127.0.0.1:1", "https://localhost:1", 1)
    names = ["raw:" + n for n in http_corpus(1)]
    names += [p + n for n in rpc for p in ("http:", "socket:")]
    return names + ["socket:session"]


@pytest.mark.parametrize("case", _case_names())
def test_same_answer_as_the_daemon(answers: Tuple[Dict[str, Any], Dict[str, Any]], case: str) -> None:
    daemon, ref = answers[0][case], answers[1][case]
    if case in DIFFERENCES:
        _expected_difference(case, daemon, ref)
        return
    assert ref == daemon, "%s: the reference broker (--compat 0.7.2) answers\n%s\nthe daemon 0.7.2 answers\n%s" % (
        case, json.dumps(ref, indent=1), json.dumps(daemon, indent=1))


def test_differences_are_in_the_corpus() -> None:
    """Every declared difference names a case that exists (a stale entry would hide nothing and check nothing)."""
    assert set(DIFFERENCES) <= set(_case_names())
