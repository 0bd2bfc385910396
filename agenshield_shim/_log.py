"""Reporting refusals: the ``agenshield_shim`` logger and the optional audit-log file.

Nothing here is imported until something is refused (or a hook needs to log),
so ``logging`` and ``json`` cost nothing at start. A report runs inside the
audit hook: it must never raise into it and never recurse into itself (a
logging handler that sends over the network would be refused, and report
that refusal, and so on), hence the per-thread re-entry flag.
"""

from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False  # typing costs milliseconds at every start; only the type checker reads it
if TYPE_CHECKING:  # pragma: no cover
    import logging
    from typing import Any, Dict, Optional

LOGGER_NAME = "agenshield_shim"
_LEVELS = {"debug": 10, "info": 20, "warn": 30, "error": 40}

_settings: Dict[str, Any] = {"level": "warn", "audit_log": None}
_logger: Optional["logging.Logger"] = None

try:
    import _thread

    _local = _thread._local()
except ImportError:  # pragma: no cover - every CPython we support has _thread
    _local = None  # type: ignore[assignment]


def configure(level: str, audit_log: Optional[str]) -> None:
    """Remember the settings; the logger itself is made on first use."""
    _settings["level"] = level
    _settings["audit_log"] = audit_log
    if level == "debug":
        get_logger().debug("agenshield-shim active (pid %d, %s)", os.getpid(), sys.executable)


def enabled(level: str) -> bool:
    """Would a message at ``level`` pass? Asked without importing ``logging`` (10 ms at first use)."""
    return _LEVELS.get(_settings["level"], 30) <= _LEVELS[level]


def get_logger() -> "logging.Logger":
    """The ``agenshield_shim`` logger at the configured level.

    It propagates to the application's logging set-up; when the application has
    configured none, a stderr handler of ours prints what passes the level
    (``logging``'s last-resort handler would drop anything below WARNING).
    """
    global _logger
    if _logger is None:
        import logging

        logger = logging.getLogger(LOGGER_NAME)
        logger.setLevel(_LEVELS.get(_settings["level"], 30))
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
        handler.addFilter(lambda record: not logging.getLogger().handlers)
        logger.addHandler(handler)
        _logger = logger
    return _logger


def report_block(event: str, target: str, policy: Any) -> None:
    """Log a refusal at warning level and append it to the audit log, if one is set."""
    if _local is not None:
        if getattr(_local, "busy", False):
            return
        _local.busy = True
    try:
        broker, reason = policy[3], policy[4]
        if reason is None:
            get_logger().warning("direct connection to %s blocked (%s); use the broker at %s", target, event, broker)
        else:
            get_logger().warning("network blocked (%s): %s refused (%s)", reason, target, event)
        if _settings["audit_log"]:
            _append_audit(event, target, broker, policy[4])
    finally:
        if _local is not None:
            _local.busy = False


def _append_audit(event: str, target: str, broker: str, reason: Optional[str]) -> None:
    import json

    now = time.time()
    record = {
        "id": os.urandom(16).hex(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + ".%03dZ" % int(now % 1 * 1000),
        "operation": "network",
        "channel": "python-guard",
        "allowed": False,
        "policyId": None,
        "target": target,
        "result": "blocked",
        "durationMs": 0,
        "metadata": {
            "event": event,
            "broker": broker,
            "reason": reason,
            "pid": os.getpid(),
            "executable": sys.executable,
        },
    }
    line = json.dumps(record, sort_keys=True) + "\n"
    try:
        fd = os.open(_settings["audit_log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)
    except OSError as exc:
        get_logger().error("cannot write the audit log %s: %s", _settings["audit_log"], exc)
