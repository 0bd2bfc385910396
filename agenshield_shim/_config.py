"""Configuration from the environment, parsed strictly.

Every interpreter in the agent's environment parses this at start, so it uses
nothing but ``os`` (already imported by ``site``). A value it does not
understand is an error, never a silent default: the boot turns that error into
a guard that blocks everything, which is the only safe reading of a
configuration nobody can vouch for.
"""

import os

TYPE_CHECKING = False  # typing costs milliseconds at every start; only the type checker reads it
if TYPE_CHECKING:  # pragma: no cover
    from typing import Dict, Mapping, Optional, Tuple

    #: (host, port) as written by the user; host already lower-cased, brackets removed.
    Destination = Tuple[str, int]

ENV_ENABLED = "AGENSHIELD_ENABLED"
ENV_BROKER_HOST = "AGENSHIELD_BROKER_HOST"
ENV_BROKER_PORT = "AGENSHIELD_BROKER_PORT"
ENV_BROKER_SOCKET = "AGENSHIELD_BROKER_SOCKET"
ENV_LOG_LEVEL = "AGENSHIELD_LOG_LEVEL"
ENV_ALLOW = "AGENSHIELD_ALLOW"
ENV_AUDIT_LOG = "AGENSHIELD_AUDIT_LOG"
ENV_TRANSPORT = "AGENSHIELD_TRANSPORT"
#: Every variable the shim reads (the boot checks this list to skip parsing when none is set).
VARIABLES = (
    ENV_ENABLED,
    ENV_BROKER_HOST,
    ENV_BROKER_PORT,
    ENV_BROKER_SOCKET,
    ENV_LOG_LEVEL,
    ENV_ALLOW,
    ENV_AUDIT_LOG,
    ENV_TRANSPORT,
)

#: Written by ``agenshield-shim install --lock`` next to the .pth file. When it exists, its
#: values are the configuration: the environment's AGENSHIELD_* variables are ignored (all but
#: the log level), so an agent cannot switch the shim off or widen it for itself or a child.
#: It only protects where the agent cannot write to site-packages.
LOCK_FILE = "agenshield_shim.lock"

DEFAULT_BROKER_HOST = "localhost"
DEFAULT_BROKER_PORT = 6969

_FALSE = ("false", "0", "no", "off")
_TRUE = ("true", "1", "yes", "on")
LOG_LEVELS = ("debug", "info", "warn", "warning", "error")
TRANSPORTS = ("auto", "tunnel", "rpc")
DEFAULT_TRANSPORT = "auto"


class ShimConfigError(ValueError):
    """An ``AGENSHIELD_*`` variable holds a value the shim cannot act on safely."""


class Config:
    """The shim's settings for this interpreter (immutable by convention)."""

    __slots__ = (
        "enabled",
        "broker_host",
        "broker_port",
        "broker_socket",
        "log_level",
        "allow",
        "audit_log",
        "transport",
    )

    def __init__(
        self,
        enabled: bool = True,
        broker_host: str = DEFAULT_BROKER_HOST,
        broker_port: int = DEFAULT_BROKER_PORT,
        broker_socket: "Optional[str]" = None,
        log_level: str = "warn",
        allow: "Tuple[Destination, ...]" = (),
        audit_log: "Optional[str]" = None,
        transport: str = DEFAULT_TRANSPORT,
    ) -> None:
        self.enabled = enabled
        self.broker_host = broker_host
        self.broker_port = broker_port
        self.broker_socket = broker_socket
        self.log_level = log_level
        self.allow = allow
        self.audit_log = audit_log
        self.transport = transport

    @property
    def broker(self) -> str:
        """The broker's address as people write it, for messages."""
        from ._boot import format_destination

        return format_destination(self.broker_host, self.broker_port)

    def __repr__(self) -> str:
        fields = ", ".join("%s=%r" % (name, getattr(self, name)) for name in self.__slots__)
        return "Config(%s)" % fields


def is_disabled(environ: "Mapping[str, str]") -> bool:
    """True only for an explicit, well-formed 'off' value; cheap enough for every start."""
    value = environ.get(ENV_ENABLED)
    return value is not None and value.strip().lower() in _FALSE


def read_lock(path: str) -> "Dict[str, str]":
    """The ``NAME=value`` lines of a lock file (``#`` comments allowed); strict like the rest."""
    values: "Dict[str, str]" = {}
    with open(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, value = line.partition("=")
            name = name.strip()
            if not sep or name not in VARIABLES:
                raise ShimConfigError("%s line %d: %r is not AGENSHIELD_<NAME>=value" % (path, number, line))
            values[name] = value.strip()
    if values.get(ENV_ENABLED, "true").strip().lower() in _FALSE:
        raise ShimConfigError("%s: a lock file cannot disable the shim; remove the file instead" % path)
    return values


def load(environ: "Optional[Mapping[str, str]]" = None, lock: "Optional[str]" = None) -> "Config":
    """Read the configuration; raise :class:`ShimConfigError` naming the variable at fault.

    With ``lock`` (the path of a lock file), the lock's values replace the environment's.
    """
    env = os.environ if environ is None else environ
    if lock is not None:
        locked = read_lock(lock)
        if ENV_LOG_LEVEL in env and ENV_LOG_LEVEL not in locked:
            locked[ENV_LOG_LEVEL] = env[ENV_LOG_LEVEL]
        env = locked
    enabled = _parse_bool(env, ENV_ENABLED, True)
    host = _parse_host(env.get(ENV_BROKER_HOST, DEFAULT_BROKER_HOST), ENV_BROKER_HOST)
    port = _parse_port(env.get(ENV_BROKER_PORT, str(DEFAULT_BROKER_PORT)), ENV_BROKER_PORT)
    log_level = env.get(ENV_LOG_LEVEL, "warn").strip().lower()
    if log_level not in LOG_LEVELS:
        raise ShimConfigError(
            "%s=%r is not a log level; use one of debug, info, warn, error"
            % (ENV_LOG_LEVEL, env[ENV_LOG_LEVEL])
        )
    if log_level == "warning":
        log_level = "warn"
    transport = env.get(ENV_TRANSPORT, DEFAULT_TRANSPORT).strip().lower()
    if transport not in TRANSPORTS:
        raise ShimConfigError(
            "%s=%r is not a transport; use auto (the default), tunnel or rpc" % (ENV_TRANSPORT, env[ENV_TRANSPORT])
        )
    socket_path = _parse_path(env.get(ENV_BROKER_SOCKET), ENV_BROKER_SOCKET)
    audit_log = _parse_path(env.get(ENV_AUDIT_LOG), ENV_AUDIT_LOG)
    allow = parse_allow(env.get(ENV_ALLOW, ""))
    return Config(enabled, host, port, socket_path, log_level, allow, audit_log, transport)


def parse_allow(text: str) -> "Tuple[Destination, ...]":
    """Parse ``host:port[,host:port...]`` (``[v6]:port`` for IPv6 literals).

    A port is required: an allow-list entry opens one service, never a whole host.
    """
    entries = []
    for raw in text.replace(";", ",").split(","):
        item = raw.strip()
        if not item:
            continue
        host, sep, port_text = item.rpartition(":")
        if not sep or not host:
            raise ShimConfigError(
                "%s entry %r has no port; write host:port (for example 127.0.0.1:5432)"
                % (ENV_ALLOW, item)
            )
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ShimConfigError(
                "%s entry %r: put an IPv6 address in brackets, as [::1]:5432" % (ENV_ALLOW, item)
            )
        entries.append((_parse_host(host, ENV_ALLOW), _parse_port(port_text, ENV_ALLOW)))
    return tuple(entries)


def _parse_bool(env: "Mapping[str, str]", name: str, default: bool) -> bool:
    value = env.get(name)
    if value is None:
        return default
    word = value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ShimConfigError(
        "%s=%r is neither true nor false; use true/false (also 1/0, yes/no, on/off)" % (name, value)
    )


def _parse_port(text: str, name: str) -> int:
    word = text.strip()
    if not word.isdigit() or not word.isascii() or not 0 < int(word) < 65536:
        raise ShimConfigError("%s: %r is not a TCP port (1-65535)" % (name, text))
    return int(word)


def _parse_host(text: str, name: str) -> str:
    host = text.strip().lower()
    if host.endswith("."):
        host = host[:-1]
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789-.:_")
    if not host or not set(host) <= allowed:
        raise ShimConfigError("%s: %r is not a host name or IP address" % (name, text))
    return host


def _parse_path(value: "Optional[str]", name: str) -> "Optional[str]":
    if value is None or value == "":
        return None
    if "\x00" in value or not os.path.isabs(value):
        raise ShimConfigError("%s=%r must be an absolute path" % (name, value))
    return value
