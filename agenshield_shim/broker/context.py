"""What every request handler needs, passed explicitly: the broker-wide services and the connection.

Kept apart from ``server.py`` so ``tunnel.py``, ``forward.py`` and ``rpc.py`` depend on this small
module rather than on the server (no import cycles, and each handler can be read on its own).
"""

import asyncio
import dataclasses
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Set, Tuple

from ..addr import canonical_ip
from .audit import AuditError, AuditLog
from .config import BrokerConfig
from .http1 import READ_SIZE, Stream, abort
from .policy import Decision, Policy, Target
from .upstream import Permit, Resolver


#: What a client is told when its decision is refused because the audit log cannot be written.
AUDIT_TEXT = "Refused: the broker's audit log cannot be written"


@dataclass
class Services:
    """Broker-wide, created at start: configuration, policy, audit sink, upstream TLS context."""

    config: BrokerConfig
    policy: Policy
    audit: AuditLog
    ssl_context: ssl.SSLContext
    #: Open tunnel and upgraded pipes as (client writer, upstream writer); closed on shutdown.
    pipes: Set[Tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = field(default_factory=set)
    #: Upstream writers currently open (tunnels, forwards), for cleanup checks and shutdown.
    upstreams: Set[asyncio.StreamWriter] = field(default_factory=set)
    counters: Dict[str, int] = field(default_factory=dict)
    #: Name resolution for tunnels and forwards; ``None`` is the loop's ``getaddrinfo``.
    resolver: Optional[Resolver] = None

    @property
    def ext(self) -> bool:
        """Extensions on (not ``--compat``)."""
        return not self.config.compat

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def audit_blocked(self, conn: "Conn", operation: str, target: str, started: float, **metadata: Any) -> bool:
        """While the audit log is failing, refuse what would be allowed before any upstream is
        contacted (``True``). The refusal is audited if it can be: that write is also the probe
        that ends the failing state, so the next decision is served again."""
        if not self.audit.failing:
            return False
        self.count("audit_refusals")
        self.audit_decision(conn, operation, Decision(False, None, AUDIT_TEXT), target, "denied", started, **metadata)
        return True

    def permit(self, target: Target, check_port: bool = True, address: Optional[bool] = None) -> Optional[Permit]:
        """For a name: the check each of its resolved addresses must pass (no deny rule matches it
        with the request's port, scheme, method and path). ``None`` for an address: the decision
        was already made on it. ``address``: whether the host is one, when the caller knows."""
        host = target.host
        if address is None:  # a name may start or end with a digit: "9gag.com", "host2"
            address = ":" in host or (host[-1:].isdigit() and canonical_ip(host) is not None)
        if address:
            return None

        def check(ip: str) -> Optional[str]:
            refusal = self.policy.deny_for(dataclasses.replace(target, host=ip), check_port)
            if refusal is None:
                return None
            return "Host '%s' resolves to %s: %s" % (target.host, ip, refusal.reason)

        return check

    def audit_decision(
        self,
        conn: "Conn",
        operation: str,
        decision: Decision,
        target: str,
        result: str,
        started: float,
        **metadata: Any,
    ) -> None:
        """One audit line; for ``result == "success"`` an unwritable log raises :class:`AuditError`
        and the caller refuses (refusals and errors are refused anyway: never raises for them)."""
        meta = {k: v for k, v in metadata.items() if v is not None}
        if decision.reason and "reason" not in meta:
            meta["reason"] = decision.reason
        if conn.peer:
            meta.setdefault("peer", conn.peer)
        try:
            self.audit.record(
                operation, conn.channel, decision.allowed, decision.policy_id, target, result,
                (time.monotonic() - started) * 1000.0, meta,
            )
        except AuditError:
            self.count("audit_failures")
            if result == "success":
                raise  # fail closed: what cannot be recorded is not served
            # a refusal or a failure is not served anyway; stderr has said the log is failing


class ConnTimer:
    """A connection's one timer, for one wait at a time: the wait for its next request (keep-alive
    timeout) or a forward exchange (idle timeout). ``on_idle`` is called once nothing has
    ``touch()``-ed the timer for the wait's ``timeout`` seconds.

    Reused from wait to wait, so a keep-alive request costs no timer of its own (an
    ``asyncio.wait_for`` per request costs a task, a timer handle and a cancellation): one
    ``call_at`` handle re-arms itself lazily while waits go on, and lapses when it finds none.
    """

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.timeout = 0.0
        self.last = 0.0
        self.fired = False
        self._on_idle: Optional[Callable[[], None]] = None
        self._handle: Optional[asyncio.TimerHandle] = None

    def start(self, timeout: float, on_idle: Callable[[], None]) -> None:
        """Begin a wait: ``on_idle`` is what its timeout does."""
        self._on_idle, self.fired, self.timeout, self.last = on_idle, False, timeout, self.loop.time()
        due = self.last + timeout
        if self._handle is not None and self._handle.when() > due:  # a shorter wait than the last
            self._handle.cancel()
            self._handle = None
        if self._handle is None:
            self._handle = self.loop.call_at(due, self._check)

    def touch(self) -> None:
        self.last = self.loop.time()

    def stop(self) -> None:
        """End the wait (its ``on_idle`` will not be called); the handle lapses on its own."""
        self._on_idle = None

    def close(self) -> None:
        """The connection is gone: drop the handle now rather than when it would lapse."""
        self._on_idle = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        self._handle = None
        on_idle = self._on_idle
        if on_idle is None:
            return
        due = self.last + self.timeout
        if self.loop.time() >= due:
            self._on_idle, self.fired = None, True
            on_idle()
        else:
            self._handle = self.loop.call_at(due, self._check)


@dataclass
class Conn:
    """One client connection: its stream, how it came in, and a kept-alive forward upstream."""

    stream: Stream
    channel: str  # "http" (TCP) or "socket" (Unix socket), the daemon's audit vocabulary
    peer: str
    upstream_key: Optional[Tuple[str, str, int]] = None
    upstream: Optional[Stream] = None
    #: The kept upstream's address, canonical (what deny rules are checked on when it is reused).
    upstream_ip: Optional[str] = None
    busy: bool = False
    #: The connection's timer (keep-alive wait, forward exchanges), made on first use.
    _timer: Optional[ConnTimer] = None

    @property
    def timer(self) -> ConnTimer:
        if self._timer is None:
            self._timer = ConnTimer()
        return self._timer

    async def wait_request(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the first bytes of the next request (into the
        stream's buffer); ``False`` if the client closed or stayed silent (then the connection is
        aborted: it is closed anyway, and nothing is left to send)."""
        stream = self.stream
        if stream.buf:
            return True
        timer = self.timer
        timer.start(timeout, lambda: abort(stream.writer))
        try:
            data = await stream.reader.read(READ_SIZE)
        finally:
            timer.stop()
        stream.buf += data
        return bool(data)

    def drop_upstream(self, services: Services) -> None:
        if self.upstream is not None:
            w = self.upstream.writer
            services.upstreams.discard(w)
            abort(w)  # a kept or half-used upstream has nothing worth flushing
        self.upstream = None
        self.upstream_key = None
        self.upstream_ip = None

    def release(self, services: Services) -> None:
        """The client connection ends: its upstream and its timer go with it."""
        self.drop_upstream(services)
        if self._timer is not None:
            self._timer.close()
