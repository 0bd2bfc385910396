"""Audit log: one JSON object per line per policy decision, with the daemon's field names.

Fields: ``id`` (unique, in a UUID's shape), ``timestamp`` (ISO 8601 UTC, milliseconds), ``operation``
(``http_request``, ``connect``, ``forward``, ``policy_check``), ``channel`` (``http`` for TCP
callers, ``socket`` for Unix-socket callers), ``allowed``, ``policyId``, ``target`` (URL or
``host:port``), ``result`` (``success``, ``denied`` or ``error``), ``durationMs`` and ``metadata``
(method, status, reason, error kind... whatever the decision had).

A line is written when its outcome is known (a denied request at once, a forward when its response
head arrives, a tunnel when it is established), so ``result`` and ``durationMs`` mean something.

Durability: a file is appended with one ``os.write`` per line on an ``O_APPEND`` descriptor, before
the client is answered, with no buffer in Python: once a decision has been answered, its line is in
the kernel, and a crash of the broker (even ``SIGKILL``) cannot lose it (a crash of the machine
can: there is no ``fsync`` per line). A line that cannot be written fails closed: see :class:`AuditLog`.

Cost (it is paid on every request): the line is built from a template rather than a ``dict`` through
``json.dumps``, its ``id`` is a counter behind a random per-process prefix rather than a fresh
``uuid4``, and its timestamp's seconds are formatted once per second. The line's bytes are the same
as ``json.dumps(entry, separators=(",", ":"))`` would give (``tests/broker/test_audit_log.py``).
"""

import errno
import itertools
import json
import os
import sys
import threading
import time
from typing import Any, Dict, Iterator, Optional, TextIO, Tuple

#: The strings of a line, JSON-quoted as ``json.dumps`` quotes them (ASCII, ``\uXXXX`` escapes).
_quote = json.encoder.encode_basestring_ascii
_META = json.JSONEncoder(separators=(",", ":"), default=str)
_TEMPLATE = ('{"id":"%s%012x","timestamp":"%s%03dZ","operation":%s,"channel":%s,"allowed":%s,"policyId":%s,'
             '"target":%s,"result":%s,"durationMs":%r,"metadata":%s}\n')


class _Ids:
    """Unique ids in the shape of a version-4 UUID: 80 random bits per process (drawn again in a
    forked child) and a 48-bit counter from a random start. Unique is what the log's readers need;
    ``uuid4()`` per line cost more than the rest of the line."""

    def __init__(self) -> None:
        self.reseed()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        r = os.urandom(16).hex()
        self.prefix = "%s-%s-4%s-%s%s-" % (r[:8], r[8:12], r[13:16], "89ab"[int(r[16], 16) & 3], r[17:20])
        self.counter: Iterator[int] = itertools.count(int(r[20:], 16))


_ids = _Ids()
_MASK48 = (1 << 48) - 1


class _Clock:
    """``2026-12-07T06:54:49.`` for the current second, formatted once per second."""

    second = -1
    prefix = ""

    def stamp(self) -> Tuple[str, int]:
        second, ns = divmod(time.time_ns(), 1_000_000_000)
        if second != self.second:
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
            self.second = second
        return self.prefix, ns // 1_000_000


_clock = _Clock()


def _now() -> str:
    prefix, ms = _clock.stamp()
    return "%s%03dZ" % (prefix, ms)


def _open_append(path: str) -> int:
    """An ``O_APPEND`` descriptor on ``path``, sought to its end as ``open(path, "ab")`` does: that
    seek is what refuses, at start, a path that opens but cannot be appended to (``/proc/version``
    as root); a pipe or a terminal cannot seek and is fine."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        os.lseek(fd, 0, os.SEEK_END)
    except OSError as exc:
        if exc.errno != errno.ESPIPE:
            os.close(fd)
            raise
    return fd


def _field(value: Any) -> str:
    """A string field as ``json.dumps`` writes it (any other type through the encoder)."""
    return _quote(value) if type(value) is str else _META.encode(value)


def _object(metadata: Dict[str, Any]) -> str:
    """``metadata`` as ``json.dumps`` writes it; by hand for the usual flat one of strings and ints."""
    parts = []
    for k, v in metadata.items():
        t = type(v)
        if type(k) is not str or (t is not str and t is not int):
            return _META.encode(metadata)
        parts.append(_quote(k) + ":" + (_quote(v) if t is str else int.__repr__(v)))
    return "{" + ",".join(parts) + "}"


class AuditError(Exception):
    """The audit log cannot be written: the decision that needed the line is refused (fail closed)."""


class AuditLog:
    """Appends audit lines to a file (opened here) or to a given stream (stderr by default).

    A line that cannot be written raises :class:`AuditError` (the first failure, and the first
    success after failures, are said once on stderr), and :attr:`failing` stays true until a line
    is written again: callers refuse what they would have allowed rather than serve it unaudited.
    A file is written with one ``os.write`` per line, nothing buffered, so a failed line is not
    retried later under a decision that was refused meanwhile.
    """

    def __init__(self, path: Optional[str] = None, stream: Optional[TextIO] = None) -> None:
        self._own = path is not None
        self._path = path or "(stream)"
        self._fd = -1
        self._stream: Optional[TextIO] = None
        if path:
            try:
                self._fd = _open_append(path)
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
    ) -> None:
        prefix, ms = _clock.stamp()
        line = _TEMPLATE % (
            _ids.prefix, next(_ids.counter) & _MASK48, prefix, ms, _field(operation), _field(channel),
            "true" if allowed else "false", "null" if policy_id is None else _field(policy_id), _field(target),
            _field(result), round(duration_ms, 3), _object(metadata) if metadata else "{}",
        )
        with self._lock:
            try:
                if self._stream is None:  # a file (-1 once closed: EBADF, refused like any failure)
                    data = line.encode("ascii")
                    if os.write(self._fd, data) != len(data):
                        raise OSError(28, "short write (disk full?)")
                else:
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

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                os.close(fd)
            except OSError:
                pass


def _say(message: str) -> None:
    try:
        sys.stderr.write("agenshield broker: %s\n" % message)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
