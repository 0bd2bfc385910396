"""Audit log: one JSON object per line per policy decision, with the daemon's field names.

Fields: ``id`` (uuid4), ``timestamp`` (ISO 8601 UTC, milliseconds), ``operation``
(``http_request``, ``connect``, ``forward``, ``policy_check``), ``channel`` (``http`` for TCP
callers, ``socket`` for Unix-socket callers), ``allowed``, ``policyId``, ``target`` (URL or
``host:port``), ``result`` (``success``, ``denied`` or ``error``), ``durationMs`` and ``metadata``
(method, status, reason, error kind... whatever the decision had).

A line is written when its outcome is known (a denied request at once, a forward when its response
head arrives, a tunnel when it is established), so ``result`` and ``durationMs`` mean something.
Writes are line-buffered and flushed, so a crash loses at most the line being written.
"""

import datetime
import json
import sys
import threading
import uuid
from typing import Any, Dict, Optional, TextIO


def _now() -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (now.microsecond // 1000)


class AuditLog:
    """Appends audit lines to a file (opened here) or to a given stream (stderr by default)."""

    def __init__(self, path: Optional[str] = None, stream: Optional[TextIO] = None) -> None:
        self._own = path is not None
        self._stream: TextIO = open(path, "a", encoding="utf-8") if path else (stream or sys.stderr)
        self._lock = threading.Lock()

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
                self._stream.write(line)
                self._stream.flush()
            except (OSError, ValueError):
                pass  # an unwritable audit sink must not take the broker down mid-request
        return entry

    def close(self) -> None:
        if self._own:
            try:
                self._stream.close()
            except OSError:
                pass
