"""Broker settings in one frozen dataclass, shared by the CLI, the Python API and the tests.

Everything a broker needs to run is here, so a test or the selftest can start one in-process with
exactly the knobs the command line offers (``BrokerConfig(port=0, allow=["127.0.0.1"])``), and the
command line is a thin translation of flags into this object.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

#: Protocol extensions this broker implements beyond the AgenShield daemon's broker. They are
#: advertised in ``GET /health`` and in the ``ping`` result (never with ``compat=True``) so that a
#: client can detect them; see ``PROTOCOL.md`` beside this file for their wire format.
EXTENSIONS: Tuple[str, ...] = (
    "tunnel",
    "body-base64",
    "redirect-policy",
    "connect-port-policy",
    "proxy-error-header",
)

#: Daemon versions ``--compat VERSION`` reproduces, as clients see them. ``0.7.2`` is the one on
#: the npm registry (``/health`` and ``/rpc`` only; its Unix socket speaks newline-delimited
#: JSON-RPC only); ``0.7.3`` stands for the daemon's later source, which adds the forward proxy and
#: ``CONNECT`` (what ``--compat`` alone reproduces).
COMPAT_VERSIONS: Tuple[str, ...] = ("0.7.2", "0.7.3")
#: What ``compat=True`` without a version means.
LATEST_COMPAT = "0.7.3"

MiB = 1024 * 1024


@dataclass(frozen=True)
class BrokerConfig:
    """How one broker listens, decides and limits.

    Times are in seconds, sizes in bytes. ``port=0`` picks a free port (read it back from
    ``Broker.address`` / ``Broker.port`` once started). ``unix`` adds a Unix-socket listener; with
    ``tcp=False`` it is the only one.
    """

    host: str = "127.0.0.1"
    port: int = 6969
    tcp: bool = True
    unix: Optional[str] = None
    unix_mode: int = 0o600
    #: Path of a TOML policy file (see ``policy.py``); ``None`` for none.
    policy_file: Optional[str] = None
    #: ``HOST[:PORT]`` entries, each an allow rule (the ``--allow`` flag).
    allow: Tuple[str, ...] = ()
    #: Audit log file (appended to); ``None`` writes the audit lines to stderr.
    audit_file: Optional[str] = None
    #: Reproduce the daemon's broker exactly: no extensions, ``/api/proxy`` answers 404.
    compat: bool = False
    #: Which daemon ``compat`` reproduces (one of :data:`COMPAT_VERSIONS`); ``None`` is
    #: :data:`LATEST_COMPAT`. Setting it implies ``compat=True``.
    compat_version: Optional[str] = None
    connect_timeout: float = 10.0
    #: A tunnel or forward with no byte moving either way for this long is closed.
    idle_timeout: float = 300.0
    #: A request head must be complete this long after its first byte (slowloris guard): 408.
    head_timeout: float = 10.0
    #: An idle keep-alive client connection is closed after this long without a new request.
    keepalive_timeout: float = 60.0
    #: A ``/rpc`` or local-route request body (and a socket JSON-RPC line) must be complete this
    #: long after it started: 408 (a line: closed) otherwise.
    body_timeout: float = 30.0
    #: Client connections served at once; more wait in the listen backlog (back-pressure) instead
    #: of running the process out of file descriptors. ``None``: from the descriptor limit
    #: (a quarter of it, each connection may hold an upstream too, and at least 8).
    max_connections: Optional[int] = None
    #: Largest request head (request line and headers): 431 above it.
    max_head_size: int = 64 * 1024
    #: Largest ``/rpc`` (and ``/api/proxy``) request body: 413 above it.
    max_body_size: int = 10 * MiB
    #: Largest upstream response body buffered for an ``http_request`` call (error 1004 above it).
    max_rpc_response: int = 100 * MiB
    #: Extra CA bundle (PEM) trusted for upstream TLS, on top of the system store.
    upstream_ca_file: Optional[str] = None
    #: In-flight requests get this long to finish on shutdown; tunnels are closed at once.
    shutdown_grace: float = 5.0
    #: Write ``host:port`` (and/or ``unix:PATH``) here, atomically, once listening.
    ready_file: Optional[str] = None

    def __post_init__(self) -> None:
        if self.compat_version is not None:
            if self.compat_version not in COMPAT_VERSIONS:
                raise ValueError("compat_version %r is not one of %s" % (self.compat_version, ", ".join(COMPAT_VERSIONS)))
            object.__setattr__(self, "compat", True)

    @property
    def daemon_version(self) -> Optional[str]:
        """The daemon version reproduced, or ``None`` with extensions on."""
        if not self.compat:
            return None
        return self.compat_version or LATEST_COMPAT

    @property
    def rpc_only(self) -> bool:
        """The published daemon 0.7.2: ``/health`` and ``/rpc`` only, its wire answers (``legacy.py``)."""
        return self.daemon_version == "0.7.2"

    @property
    def extensions(self) -> Tuple[str, ...]:
        """The extension names this configuration turns on (none in compat mode)."""
        return () if self.compat else EXTENSIONS
