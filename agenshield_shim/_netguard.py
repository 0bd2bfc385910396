"""The ``socket`` module's entry points, made to hand the guard what the kernel will get.

Registered in ``_boot.HOOKS`` for ``socket``: loaded with it, never at interpreter start.

Why, for two holes the audit hook alone cannot close:

* ``connect``, ``connect_ex``, ``sendto``, ``sendmsg`` and ``bind`` resolve a host name in C
  *before* they raise their audit event, so the guard's refusal would come after the DNS query
  (which carries data out) has left. ``socket.socket`` (the Python class that ``socket``,
  ``ssl``, asyncio and every library use) gets overrides of those methods that refuse what the
  guard would refuse before the C method runs.
* ``getaddrinfo``, ``gethostbyname(_ex)`` and ``gethostbyaddr`` convert a ``str`` host with the
  Python ``idna`` codec, which any code can replace, so the guard refuses a ``str`` there (see
  ``_boot.CODEC_EVENTS``). These wrappers pass an ASCII ``str`` as ``bytes`` (its own ASCII
  encoding, done in C), which the resolver gets as is: the guard judges exactly those bytes.

What stays open in-process: ``_socket.socket``'s C methods called directly
(``_socket.socket.connect(s, ("name", 80))``) still resolve the name before the event. The
README says so; the OS layer (``--sandbox netns``) stops it.
"""

import _socket
from types import ModuleType

from . import NetworkBlockedError, _boot

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Callable

_C = _socket.socket
MARK = "__agenshield_netguard__"


def _refuse(event: str, target: str, message: str, policy: "Any") -> None:
    try:
        _boot._report(event, target, policy)
    except Exception:
        pass
    raise NetworkBlockedError(message, target, policy[3])  # the broker


def check_address(event: str, address: "Any") -> None:
    """Refuse an (host, port, ...) address whose host the guard would refuse, before C resolves it.

    Address literals and ``""`` pass (no DNS; the audit hook judges them); so do Unix paths.
    """
    policy = _boot.active_policy()
    if policy is None:
        return
    parts = _boot._address_parts(address)
    if parts is None:
        return
    host, port = parts
    canon = _boot.canonical_host(host)
    if canon is not None and not canon.startswith("name:"):
        return
    target = _boot.format_destination(_boot._display(host), None if port is None else _boot._display(port))
    if event == "socket.bind":
        if _boot.decide_bind(host, policy):
            return
        _refuse(event, target, _boot.bind_message(target), policy)
    if _boot.decide_destination(host, port, policy):
        return
    _, _, _, broker, reason = policy
    _refuse(event, target, _boot.blocked_message(target, broker, reason), policy)


def connect(self: "Any", address: "Any") -> None:
    check_address("socket.connect", address)
    return _C.connect(self, address)


def connect_ex(self: "Any", address: "Any") -> int:
    check_address("socket.connect", address)
    return _C.connect_ex(self, address)


def bind(self: "Any", address: "Any") -> None:
    check_address("socket.bind", address)
    return _C.bind(self, address)


def sendto(self: "Any", data: "Any", *args: "Any") -> int:
    if args:
        check_address("socket.sendto", args[-1])
    return _C.sendto(self, data, *args)


def sendmsg(self: "Any", buffers: "Any", *args: "Any") -> int:
    if len(args) >= 3 and args[2] is not None:
        check_address("socket.sendmsg", args[2])
    return _C.sendmsg(self, buffers, *args)


METHODS = {"connect": connect, "connect_ex": connect_ex, "bind": bind, "sendto": sendto, "sendmsg": sendmsg}
LOOKUPS = ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr")


def _as_bytes(host: "Any") -> "Any":
    """An ASCII ``str`` as its bytes; anything else unchanged (the guard judges it)."""
    if type(host) is str and host.isascii():
        return host.encode("ascii")
    return host


def _lookup(original: "Callable[..., Any]") -> "Callable[..., Any]":
    def lookup(host: "Any", *args: "Any", **kwargs: "Any") -> "Any":
        return original(_as_bytes(host), *args, **kwargs)

    for name in ("__module__", "__name__", "__qualname__", "__doc__"):
        try:
            setattr(lookup, name, getattr(original, name))
        except (AttributeError, TypeError):
            pass
    lookup.__agenshield_original__ = original  # type: ignore[attr-defined]
    return lookup


def install(module: ModuleType) -> None:
    cls = getattr(module, "socket", None)
    if not isinstance(cls, type) or not issubclass(cls, _C) or cls.__dict__.get(MARK):
        return
    for name, method in METHODS.items():
        method.__doc__ = getattr(_C, name).__doc__
        setattr(cls, name, method)
    setattr(cls, MARK, True)
    for name in LOOKUPS:
        original = getattr(module, name, None)
        if original is not None and getattr(original, "__agenshield_original__", None) is None:
            setattr(module, name, _lookup(original))
