"""``agenshield-shim audit`` on a log the reference broker wrote: table, --json, --suggest-policy.

The broker is the real command line (a subprocess with ``--audit FILE``); the requests are real
CONNECTs, forwards and JSON-RPC calls on loopback. Refused destinations are never contacted:
``example.com`` is refused by policy before any name is resolved, and 127.0.0.2 has no listener.
The shim's and the daemon's logs are in tests/integration/test_audit_logs.py.
"""

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from agenshield_shim.audit_report import split_target
from agenshield_shim.broker.policy import Target, build_policy
from agenshield_shim.broker.runner import BrokerProcess

from .conftest import raw_exchange, status_of

ROOT = Path(__file__).resolve().parents[2]


def audit_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "agenshield_shim", "audit", *args], capture_output=True, text=True,
                          timeout=60, env=env)


@pytest.fixture(scope="module")
def site() -> Iterator[int]:
    """A loopback HTTP server the policy allows."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def broker_log(tmp_path_factory: pytest.TempPathFactory, site: int) -> str:
    """The audit log of a broker that allows 127.0.0.1 only, after 2 allowed and 5 refused requests."""
    path = str(tmp_path_factory.mktemp("audit") / "broker-audit.jsonl")
    with BrokerProcess(["--host", "127.0.0.1", "--port", "0", "--allow", "127.0.0.1", "--audit", path]) as broker:
        port = broker.port
        for _ in range(2):
            assert status_of(raw_exchange(port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")) == 403
        assert status_of(raw_exchange(port, b"CONNECT 127.0.0.2:8443 HTTP/1.1\r\nHost: 127.0.0.2:8443\r\n\r\n")) == 403
        assert status_of(raw_exchange(port, b"GET http://127.0.0.2:8080/x HTTP/1.1\r\nHost: 127.0.0.2:8080\r\n"
                                            b"Connection: close\r\n\r\n")) == 403
        call = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "http_request",
                           "params": {"url": "https://pypi.org/simple/", "method": "GET"}}).encode()
        answer = raw_exchange(port, b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(call), call))
        assert b'"code":1001' in answer.replace(b" ", b"")
        assert status_of(raw_exchange(port, b"GET http://127.0.0.1:%d/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                            b"Connection: close\r\n\r\n" % site)) == 200
        assert status_of(raw_exchange(port, b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % site)) == 200
    return path


def by_destination(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    return {r["destination"]: r for r in rows}


def test_json_counts_every_destination(broker_log: str, site: int) -> None:
    result = audit_cli(broker_log, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["entries"], report["allowed"], report["refused"]) == (7, 2, 5)
    rows = by_destination(report["destinations"])
    assert set(rows) == {"example.com:443", "127.0.0.2:8443", "127.0.0.2:8080", "pypi.org:443", "127.0.0.1:%d" % site}
    assert rows["example.com:443"]["refused"] == 2 and rows["example.com:443"]["allowed"] == 0
    assert rows["example.com:443"]["operations"] == ["connect"]
    assert rows["example.com:443"]["reasons"] == ["Host 'example.com' is not allowed"]
    assert rows["pypi.org:443"]["operations"] == ["http_request"]
    assert rows["127.0.0.2:8080"]["operations"] == ["forward"]
    local = rows["127.0.0.1:%d" % site]
    assert (local["count"], local["allowed"], local["refused"]) == (2, 2, 0)
    assert local["firstSeen"] <= local["lastSeen"]
    assert report["destinations"][0]["destination"] in ("example.com:443", "127.0.0.1:%d" % site)  # most first


def test_table(broker_log: str, site: int) -> None:
    result = audit_cli(broker_log)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["DESTINATION", "REQUESTS", "ALLOWED", "REFUSED", "FIRST", "SEEN", "LAST", "SEEN"]
    assert lines[1].split()[:4] in (["example.com:443", "2", "0", "2"], ["127.0.0.1:%d" % site, "2", "2", "0"])
    assert lines[-1] == "5 destination(s), 7 entries: 2 allowed, 5 refused"


def test_suggested_policy_allows_what_was_refused_and_no_more(broker_log: str, site: int, tmp_path: Path) -> None:
    result = audit_cli(broker_log, "--suggest-policy")
    assert result.returncode == 0, result.stderr
    path = tmp_path / "suggested.toml"
    path.write_text(result.stdout)
    policy = build_policy(str(path), [])  # the broker's own loader accepts it
    seen = ["example.com:443", "127.0.0.2:8443", "127.0.0.2:8080", "pypi.org:443", "127.0.0.1:%d" % site]
    for dest in seen:
        host, port = split_target(dest)
        assert host is not None
        assert policy.check(Target(host=host, port=port, tunnel=True)).allowed, dest
    for host, port in (("example.com", 80), ("www.example.com", 443), ("127.0.0.3", 8080), ("127.0.0.1", 22)):
        assert not policy.check(Target(host=host, port=port, tunnel=True)).allowed, (host, port)
    assert "Host 'example.com' is not allowed" in result.stdout  # the reason, as a comment to review


def test_refusals_by_a_deny_rule_are_not_suggested(tmp_path: Path) -> None:
    """An allow rule cannot undo a deny rule: the suggestion says so instead of adding a useless rule."""
    policy = tmp_path / "p.toml"
    policy.write_text('default = "allow"\n[[rules]]\nid = "no-example"\naction = "deny"\nhosts = ["example.com"]\n')
    log = str(tmp_path / "audit.jsonl")
    with BrokerProcess(["--host", "127.0.0.1", "--port", "0", "--policy", str(policy), "--audit", log]) as broker:
        assert status_of(raw_exchange(broker.port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n")) == 403
    out = audit_cli(log, "--suggest-policy").stdout
    assert "deny rule 'no-example'" in out and "allow-example.com" not in out


def test_two_logs_at_once_and_a_line_that_is_no_entry(broker_log: str, tmp_path: Path) -> None:
    other = tmp_path / "other.jsonl"
    other.write_text(Path(broker_log).read_text() + "not json\n")
    result = audit_cli(broker_log, str(other), "--json")
    assert result.returncode == 0
    assert json.loads(result.stdout)["entries"] == 14
    assert result.stderr.strip() == ("agenshield-shim audit: %s: skipped 1 line(s) that are not audit entries "
                                     "(first: line 8)" % other)
