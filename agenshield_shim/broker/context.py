"""What every request handler needs, passed explicitly: the broker-wide services and the connection.

Kept apart from ``server.py`` so ``tunnel.py``, ``forward.py`` and ``rpc.py`` depend on this small
module rather than on the server (no import cycles, and each handler can be read on its own).
"""

import asyncio
import dataclasses
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Set, Tuple

from ..addr import canonical_ip
from .audit import AuditError, AuditLog
from .config import BrokerConfig
from .http1 import Stream, abort
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

    def permit(self, target: Target, check_port: bool = True) -> Optional[Permit]:
        """For a name: the check each of its resolved addresses must pass (no deny rule matches it
        with the request's port, scheme, method and path). ``None`` for an address: the decision
        was already made on it."""
        host = target.host
        if ":" in host or (host[-1:].isdigit() and canonical_ip(host) is not None):
            return None  # an address (a name may start or end with a digit: "9gag.com", "host2")

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


@dataclass
class Conn:
    """One client connection: its stream, how it came in, and a kept-alive forward upstream."""

    stream: Stream
    channel: str  # "http" (TCP) or "socket" (Unix socket), the daemon's audit vocabulary
    peer: str
    upstream_key: Optional[Tuple[str, str, int]] = None
    upstream: Optional[Stream] = None
    busy: bool = False

    def drop_upstream(self, services: Services) -> None:
        if self.upstream is not None:
            w = self.upstream.writer
            services.upstreams.discard(w)
            abort(w)  # a kept or half-used upstream has nothing worth flushing
        self.upstream = None
        self.upstream_key = None
