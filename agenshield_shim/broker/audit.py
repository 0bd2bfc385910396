"""Audit log: one JSON object per line per policy decision, with the daemon's field names.

Fields: ``id`` (uuid4), ``timestamp`` (ISO 8601 UTC, milliseconds), ``operation``
(``http_request``, ``connect``, ``forward``, ``policy_check``), ``channel`` (``http`` for TCP
callers, ``socket`` for Unix-socket callers), ``allowed``, ``policyId``, ``target`` (URL or
``host:port``), ``result`` (``success``, ``denied`` or ``error``), ``durationMs`` and ``metadata``
(method, status, reason, error kind... whatever the decision had).

A line is written when its outcome is known (a denied request at once, a forward when its response
head arrives, a tunnel when it is established), so ``result`` and ``durationMs`` mean something.
Each line is written at once (one unbuffered ``write``), so a crash loses at most the line being
written. A line that cannot be written fails closed: see :class:`AuditLog`.
"""

import datetime
import json
import sys
import threading
import uuid
from typing import Any, BinaryIO, Dict, Optional, TextIO


def _now() -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (now.microsecond // 1000)


class AuditError(Exception):
    """The audit log cannot be written: the decision that needed the line is refused (fail closed)."""


class AuditLog:
    """Appends audit lines to a file (opened here) or to a given stream (stderr by default).

    A line that cannot be written raises :class:`AuditError` (the first failure, and the first
    success after failures, are said once on stderr), and :attr:`failing` stays true until a line
    is written again: callers refuse what they would have allowed rather than serve it unaudited.
    A file is written unbuffered, one ``write`` per line, so a failed line is not retried later
    under a decision that was refused meanwhile.
    """

    def __init__(self, path: Optional[str] = None, stream: Optional[TextIO] = None) -> None:
        self._own = path is not None
        self._path = path or "(stream)"
        self._raw: Optional[BinaryIO] = None
        self._stream: Optional[TextIO] = None
        if path:
            try:
                self._raw = open(path, "ab", buffering=0)
            except OSError as exc:
                raise AuditError("cannot open the audit log %s: %s; give --audit a file this user can write"
                                 % (path, exc.strerror or exc)) from None
        else:
            self._stream = stream or sys.stderr
        self._lock = threading.Lock()
        self.failing = False

    def record(
        self,
        operation: str,
        channel: str,
        allowed: bool,
        policy_id: Optional[str],
        target: str,
        result: str,
        duration_ms: float,
        metadata: Optional[Dict[str, Any]] = None,
    ) -> Dict[str, Any]:
        entry: Dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "timestamp": _now(),
            "operation": operation,
            "channel": channel,
            "allowed": allowed,
            "policyId": policy_id,
            "target": target,
            "result": result,
            "durationMs": round(duration_ms, 3),
            "metadata": metadata or {},
        }
        line = json.dumps(entry, separators=(",", ":"), default=str) + "\n"
        with self._lock:
            try:
                if self._raw is not None:
                    data = line.encode("utf-8")
                    if self._raw.write(data) != len(data):
                        raise OSError(28, "short write (disk full?)")
                else:
                    assert self._stream is not None
                    self._stream.write(line)
                    self._stream.flush()
            except (OSError, ValueError) as exc:
                if not self.failing:
                    self.failing = True
                    _say("cannot write the audit log %s: %s; refusing every decision it cannot record"
                         " until it can be written again" % (self._path, getattr(exc, "strerror", None) or exc))
                raise AuditError("audit log %s cannot be written" % self._path) from None
            if self.failing:
                self.failing = False
                _say("the audit log %s is writable again; decisions are served" % self._path)
        return entry

    def close(self) -> None:
        if self._raw is not None:
            try:
                self._raw.close()
            except OSError:
                pass


def _say(message: str) -> None:
    try:
        sys.stderr.write("agenshield broker: %s\n" % message)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
