"""The audit line as built by hand (issue 15, item 5): the same bytes ``json.dumps`` would write,
unique ids, the daemon's timestamp form, and in the file before the answer leaves the broker.

The line is a template filled field by field (not ``json.dumps`` of a dict, which cost a third of
a small forward's audit), so these tests hold it to ``json.dumps``'s output on generated fields.
"""

import calendar
import json
import os
import re
import signal
import socket
import sys
import time
import uuid
from typing import Any, Dict, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agenshield_shim.broker.audit import AuditError, AuditLog
from agenshield_shim.broker.runner import BrokerProcess

from .test_small_requests import RawUpstream, read_message

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
_text = st.text(max_size=40)
_scalar = st.one_of(st.none(), st.booleans(), st.integers(), _text,
                    st.floats(allow_nan=False, allow_infinity=False))
_meta = st.one_of(st.none(), st.dictionaries(_text, st.one_of(_scalar, st.lists(_scalar, max_size=3)), max_size=5))


@settings(max_examples=300, deadline=None)
@given(operation=_text, channel=_text, allowed=st.booleans(), policy_id=st.one_of(st.none(), _text), target=_text,
       result=_text, duration=st.floats(min_value=0, max_value=1e7), metadata=_meta)
def test_a_line_is_what_json_dumps_writes(
    tmp_path_factory: Any, operation: str, channel: str, allowed: bool, policy_id: Optional[str], target: str,
    result: str, duration: float, metadata: Optional[Dict[str, Any]],
) -> None:
    path = str(tmp_path_factory.mktemp("audit") / "audit.jsonl")
    log = AuditLog(path)
    log.record(operation, channel, allowed, policy_id, target, result, duration, metadata)
    log.close()
    with open(path, "rb") as fh:
        line = fh.read().decode("ascii")
    entry = json.loads(line)
    assert line == json.dumps(entry, separators=(",", ":")) + "\n"
    assert list(entry) == ["id", "timestamp", "operation", "channel", "allowed", "policyId", "target", "result",
                           "durationMs", "metadata"]
    assert (entry["operation"], entry["channel"], entry["allowed"], entry["policyId"], entry["target"],
            entry["result"], entry["metadata"]) == (operation, channel, allowed, policy_id, target, result,
                                                      metadata or {})
    assert entry["durationMs"] == round(duration, 3)


def test_ids_are_unique_uuid_shaped_and_new_in_a_forked_child(tmp_path: Any) -> None:
    path = str(tmp_path / "audit.jsonl")
    log = AuditLog(path)
    t0 = time.time()
    for i in range(1000):
        log.record("forward", "http", True, None, "http://127.0.0.1/%d" % i, "success", 0.1, {"status": 200})
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            log.record("forward", "http", True, None, "child", "success", 0.1)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    log.close()
    entries = [json.loads(line) for line in open(path)]
    ids = [e["id"] for e in entries]
    assert len(entries) == 1001 and len(set(ids)) == 1001
    assert all(uuid.UUID(i).version == 4 and str(uuid.UUID(i)) == i for i in ids)
    assert ids[-1][:24] != ids[0][:24]  # the child drew its own prefix
    for e in entries:
        assert TIMESTAMP.match(e["timestamp"]), e["timestamp"]
        stamp = calendar.timegm(time.strptime(e["timestamp"][:19], "%Y-%m-%dT%H:%M:%S"))
        assert t0 - 2 < stamp < time.time() + 1


def test_a_closed_log_refuses(tmp_path: Any) -> None:
    log = AuditLog(str(tmp_path / "audit.jsonl"))
    log.close()
    with pytest.raises(AuditError):
        log.record("forward", "http", True, None, "x", "success", 0.1)
    assert log.failing


def test_every_answered_decision_survives_a_kill(tmp_path: Any) -> None:
    """200 keep-alive forwards, then SIGKILL the moment the last answer is read: the log has a line
    for each (written with one ``os.write`` before the answer is sent; nothing in a Python buffer)."""
    up = RawUpstream()
    audit = tmp_path / "audit.jsonl"
    env = dict(os.environ, AGENSHIELD_ENABLED="false")
    b = BrokerProcess(["--port", "0", "--allow", "127.0.0.1", "--audit", str(audit)], python=sys.executable, env=env)
    try:
        with socket.create_connection(("127.0.0.1", b.port), timeout=10) as s:
            for i in range(200):
                s.sendall(b"GET http://127.0.0.1:%d/%d HTTP/1.1\r\nHost: x\r\n\r\n" % (up.port, i))
                head, body, _ = read_message(s)
                assert head.startswith(b"HTTP/1.1 200") and body == b"ok"
            b.proc.send_signal(signal.SIGKILL)
        assert b.proc.wait(10) == -signal.SIGKILL
        entries = [json.loads(line) for line in audit.read_text().splitlines()]
        assert [e["target"] for e in entries] == ["http://127.0.0.1:%d/%d" % (up.port, i) for i in range(200)]
        assert all(e["result"] == "success" and e["metadata"]["status"] == 200 for e in entries)
    finally:
        b.stop()
        up.close()
