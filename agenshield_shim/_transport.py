"""Which transport carries this process's hooked requests to the broker.

``AGENSHIELD_TRANSPORT=tunnel`` or ``rpc`` is obeyed as written. ``auto`` (the default) asks the
broker what it serves, once per broker address and process, on the first hooked connection, never
at start-up: brokers differ. The reference broker and the AgenShield daemon from 0.7.3 on are
proxies (``CONNECT`` and absolute-form forwarding: the tunnel, TLS end to end); the published
daemon 0.7.2 serves only ``/health`` and ``/rpc``.

The probe, cheapest first:

1. ``ping`` (the rpc transport asks it anyway, for the broker's extensions; the answer is shared).
   A broker that advertises the ``tunnel`` extension tunnels.
2. Otherwise, on the broker's Unix socket: rpc (the daemon's socket speaks JSON-RPC lines only).
3. Otherwise one ``CONNECT 127.0.0.1:0`` on a connection of its own: a broker without a proxy
   closes the connection without a word (0.7.2's Node server drops a CONNECT) or answers
   404/405/501, which means rpc; any other HTTP answer means the method is served: tunnel. The target is loopback port 0, so even a broker that
   allows it connects nowhere (the kernel refuses port 0 locally); it costs one audit line.

A broker that cannot be reached, or does not answer in time, decides nothing: nothing is cached and
the connection goes the way whose own error says that the broker is down, naming it as configured:
rpc for a Unix socket (both brokers speak JSON-RPC lines there), else the tunnel.
"""

import threading

from . import _rpc
from ._config import Config
from ._rpc import broker_key as _key
from ._rpc import broker_name as _broker_name

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Callable, Dict, Optional, Tuple

TUNNEL = "tunnel"
RPC = "rpc"
EXT_TUNNEL = "tunnel"
PROBE_TARGET = b"127.0.0.1:0"
#: Statuses that say "no such method or route here": the broker is not a proxy.
NOT_A_PROXY = (404, 405, 501)
#: The probe's "status" when the broker closed the connection without a word (what the daemon
#: 0.7.2's HTTP server does with a CONNECT: Node drops a CONNECT nobody listens for).
CLOSED = 0


class Choice:
    """The transport chosen for one broker, and why (for ``selftest``, ``verify`` and the log)."""

    __slots__ = ("transport", "reason")

    def __init__(self, transport: str, reason: str) -> None:
        self.transport = transport
        self.reason = reason

    def __repr__(self) -> str:
        return "Choice(%r, %r)" % (self.transport, self.reason)


_probed: "Dict[Tuple[Any, ...], Choice]" = {}  # never rebound: learned() holds its get
_lock = threading.Lock()


def chosen(config: Config) -> "Optional[Choice]":
    """The choice made so far for this broker (``None`` under ``auto`` before the first hooked connection)."""
    if config.transport != "auto":
        return Choice(config.transport, "AGENSHIELD_TRANSPORT=%s" % config.transport)
    return _probed.get(_key(config))


def choose(config: Config, deadline_s: "Optional[float]" = None) -> str:
    """``tunnel`` or ``rpc`` for this broker; probes once under ``auto`` (thread-safe, blocking)."""
    if config.transport != "auto":
        return config.transport
    probe(config, deadline_s)
    return current(config)


def current(config: Config) -> str:
    """The transport in use now, asking nothing: the configured one, the one learned, or (nothing
    learned yet: the broker could not be asked) the way whose error names the broker as configured,
    rpc for a Unix socket (both brokers speak JSON-RPC lines there), else the tunnel."""
    if config.transport != "auto":
        return config.transport
    choice = _probed.get(_key(config))
    if choice is not None:
        return choice.transport
    return RPC if config.broker_socket else TUNNEL


def probe(config: Config, deadline_s: "Optional[float]" = None) -> "Optional[Choice]":
    """What the broker serves, asked once per broker and process; ``None`` if it could not be asked.

    Also asked under an explicit ``tunnel`` when the broker answers like something that is not a
    proxy (a 404), so that the error can say so.
    """
    key = _key(config)
    choice = _probed.get(key)
    if choice is not None:
        return choice
    with _lock:  # one probe per process, however many threads make their first request at once
        choice = _probed.get(key)
        if choice is None:
            choice = _probe(config, deadline_s)
            if choice is None:
                return None
            _probed[key] = choice
            from . import _log

            if _log.enabled("info"):
                _log.get_logger().info("AgenShield: transport %s for the broker at %s (%s)",
                                       choice.transport, _broker_name(config), choice.reason)
    return choice


def not_a_proxy(config: Config, deadline_s: "Optional[float]" = None) -> bool:
    """Has the broker turned out not to tunnel? Asked (once, then remembered) on an answer that looks
    like one that is not a proxy: a dropped ``CONNECT``, a 404 to a forwarded request."""
    choice = probe(config, deadline_s)
    return choice is not None and choice.transport != TUNNEL


def learned(config: Config) -> "Callable[[], Optional[Choice]]":
    """For a hook's per-request path: a function that gives the choice known for this broker now,
    asking nothing (under ``auto``: ``None`` before the probe answered, or after :func:`forget`).

    Why a function made once (a C-level one: no Python frame per call): a hook asks before every
    request, and on a keep-alive request the broker's key, a coroutine and an executor hop were
    most of what the shim added to aiohttp.
    """
    if config.transport != "auto":
        fixed = chosen(config)
        return lambda: fixed
    import functools

    return functools.partial(_probed.get, _key(config))  # the one dict: forget() clears it in place


async def choose_async(config: Config, deadline_s: "Optional[float]" = None) -> str:
    """:func:`choose` for asyncio code: the probe runs in the loop's executor, once."""
    if config.transport != "auto":
        return config.transport
    choice = _probed.get(_key(config))
    if choice is not None:
        return choice.transport
    import asyncio

    return await asyncio.get_running_loop().run_in_executor(None, choose, config, deadline_s)


def forget(config: "Optional[Config]" = None) -> None:
    """Forget what was learned (of one broker, or all): the broker was replaced, or tests."""
    with _lock:
        if config is None:
            _probed.clear()
        else:
            _probed.pop(_key(config), None)


def _probe(config: Config, deadline_s: "Optional[float]") -> "Optional[Choice]":

    deadline = _rpc.BROKER_CONNECT_TIMEOUT_S if deadline_s is None else min(deadline_s, _rpc.BROKER_CONNECT_TIMEOUT_S)
    try:
        caps = _rpc.capabilities(config, deadline)
    except _rpc.RpcError:
        return None
    if EXT_TUNNEL in caps.extensions:
        return Choice(TUNNEL, "the broker advertises the tunnel extension")
    if config.broker_socket:
        return Choice(RPC, "the broker's Unix socket speaks JSON-RPC only (no tunnel extension)")
    status = _connect_status(config, deadline)
    if status is None:
        return None
    if status == CLOSED:
        return Choice(RPC, "the broker closed the connection on CONNECT: it serves /rpc only (the AgenShield "
                           "daemon before 0.7.3)")
    if status in NOT_A_PROXY:
        return Choice(RPC, "the broker answered CONNECT with %d: it serves /rpc only (the AgenShield daemon "
                           "before 0.7.3)" % status)
    return Choice(TUNNEL, "the broker answered CONNECT (HTTP %d): it is a proxy" % status)


def _connect_status(config: Config, deadline: float) -> "Optional[int]":
    """The status of the broker's answer to one ``CONNECT`` probe; ``None`` if it gave none."""
    import socket

    request = b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (PROBE_TARGET, PROBE_TARGET)
    try:
        with socket.create_connection((config.broker_host, config.broker_port), deadline) as sock:
            sock.sendall(request)
            answer = b""
            while b"\r\n" not in answer and len(answer) < 256:
                chunk = sock.recv(256)
                if not chunk:
                    break
                answer += chunk
    except OSError:
        return None
    if not answer:
        return CLOSED
    parts = answer.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit() or len(parts[1]) != 3:
        return None
    return int(parts[1])


def not_a_proxy_message(broker: str, status: int, destination: str) -> str:
    """The error of an explicit ``AGENSHIELD_TRANSPORT=tunnel`` against a broker that is not a proxy."""
    answer = "closed the connection" if status == CLOSED else "answered %d" % status
    return ("AgenShield: the broker at %s does not tunnel: it %s when asked for %s (the AgenShield daemon "
            "0.7.2 serves only /rpc); set AGENSHIELD_TRANSPORT=auto (the default) or rpc"
            % (broker, answer, destination))
