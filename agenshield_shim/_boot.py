"""Boot: the one import of ``agenshield_shim.pth``, run by ``site`` at every interpreter start.

Three parts, one module: the guard (a PEP 578 audit hook), the post-import hook
registry, and ``boot()``, which reads the configuration and installs both. They
share a module because every module imported at start-up costs every Python
process of the environment about 0.1 ms of import machinery alone
(benchmarks/startup.py). What runs only once a hooked library is imported lives
in ``_importhooks``, and loads then.
"""

# Why an audit hook: CPython raises its socket events from C, for ``socket``, ``_socket``, a
# reloaded ``socket`` and asyncio's non-blocking sockets alike, in every thread, and a hook
# cannot be removed. Monkey-patches can be undone; this cannot.
#
# Why the odd style of the guard's functions: they are written for an attacker who runs Python
# code in the same interpreter and can reach them (``gc`` finds anything). So they read no
# module globals and no builtins by name (a global can be rebound, ``builtins.len`` can be
# replaced): everything they use is bound at definition time as a default argument, and
# ``__defaults__`` is a tuple. Replacing ``__code__`` or ``__defaults__`` of any of them raises
# an audit event that the hook itself refuses. They never call into objects the caller made (a
# ``str`` subclass with a lying ``__eq__``, an ``int`` with a changing ``__index__``): the
# address is copied through the base types' own C slots first, and anything that cannot be
# copied that way is refused. The hook is registered as its ``__call__`` method-wrapper, so
# that a ``__cantrace__`` attribute planted on it cannot switch tracing on inside it (a tracer
# could otherwise jump over the ``raise``; see ``seal``). Tests check all of this
# (tests/test_guard.py, tests/integration/test_guard_paths.py).
#
# The boot imports nothing else on the common path: not ``socket`` or ``asyncio`` (the guard
# needs neither), not ``typing`` (milliseconds; only the type checker reads it), not the
# library hooks (registered by name, imported with their library), and with no
# ``AGENSHIELD_*`` variable set not even the configuration parser.

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Callable, Dict, FrozenSet, List, Optional, Set, Tuple, Union

    from ._config import Config

    Policy = Tuple[FrozenSet[Tuple[str, int]], FrozenSet[str], Tuple[Tuple[str, int], ...], str, Optional[str]]
    Hook = Union[str, Callable[[Any], None]]

from . import NetworkBlockedError

# == the guard ====================================================================================


def format_destination(host: str, port: "Optional[object]") -> str:
    """``host:port``, with brackets around IPv6 literals so the port stays readable."""
    if ":" in host:
        host = "[%s]" % host
    return host if port is None else "%s:%s" % (host, port)


def blocked_message(destination: str, broker: str, reason: "Optional[str]" = None) -> str:
    """The one wording users see, from the guard and from every hook.

    ``reason`` is the policy's: set when everything is blocked because the shim could not start.
    """
    if reason is not None:
        return "AgenShield: network blocked (%s): %s refused" % (reason, destination)
    return "AgenShield: direct connection to %s blocked; use the broker at %s" % (destination, broker)


def bind_message(destination: str) -> str:
    """Why binding to a host name is refused (from the guard and from ``_netguard``)."""
    return (
        "AgenShield: binding a socket to %s refused: only address literals, \"\" and the broker's or "
        "allowed names can be bound (any other name is a DNS query); bind to an address" % (destination,)
    )


# -- constants ------------------------------------------------------------------------------

AF_UNIX = 1
AF_INET = 2
if sys.platform.startswith("linux"):
    AF_INET6 = 10
elif sys.platform == "darwin":
    AF_INET6 = 30
elif sys.platform.startswith("freebsd"):
    AF_INET6 = 28
else:  # pragma: no cover - Windows and others: one number CPython uses there
    AF_INET6 = 23
SOCK_RAW = 3
SOCK_PACKET = 10
# family -1: socket(fileno=...) adopting a descriptor; the family is read from it later.
ALLOWED_FAMILIES = frozenset((AF_UNIX, AF_INET, AF_INET6, -1))

CONNECT_EVENTS = frozenset(("socket.connect", "socket.sendto", "socket.sendmsg"))
# bind sends nothing, but a host name in its address is resolved (a DNS query) like connect's.
BIND_EVENT = "socket.bind"
NAME_EVENTS = frozenset(("socket.getaddrinfo", "socket.gethostbyname"))
REVERSE_EVENTS = frozenset(("socket.gethostbyaddr", "socket.getnameinfo"))
# The lookups whose C code turns a str host into bytes with the Python ``idna`` codec, which any
# code can replace or re-register: the guard would judge the text while the resolver got what the
# codec returned. Only bytes reach the resolver as they are (``_netguard`` passes them for the
# ``socket`` module's functions). getnameinfo reads its host as UTF-8 in C: no codec.
CODEC_EVENTS = frozenset(("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"))
TAMPER_EVENTS = frozenset(("object.__setattr__", "object.__delattr__"))
# os.environ changes reach subinterpreters, multiprocessing and every child that inherits the
# environment, so the shim's own variables are frozen for the life of a guarded interpreter.
ENV_EVENTS = frozenset(("os.putenv", "os.unsetenv"))
# A subinterpreter can be started without ``site`` (so without the shim): refused. CPython raises
# "cpython.PyInterpreterState_New" in the creating interpreter only on some paths (not for
# _testcapi.run_in_subinterp, nor 3.13's _interpreters), so the modules that create them are
# refused at import: the "import" event carries the name, and an extension module's init symbol
# is named after the last part of that name, so a copy under another package is caught too.
SUBINTERPRETER_EVENT = "cpython.PyInterpreterState_New"
# The last event of an interpreter's teardown that hooks see (see "teardown" below).
TEARDOWN_EVENT = "cpython.PyInterpreterState_Clear"
SUBINTERPRETER_MODULES = frozenset(
    ("_testcapi", "_testinternalcapi", "_xxsubinterpreters", "_interpreters")
)
# Process starts whose environment a locked guard checks; the environment is their fourth argument
# for the first two, the third for the others. (A frozenset: a dict in the guard's defaults could be
# emptied by anyone, with no audit event.)
SPAWN_EVENTS = frozenset(("subprocess.Popen", "os.spawn", "os.exec", "os.posix_spawn"))
# Interpreter variables that make a Python child run code before ``site`` (so before the shim) or
# load something else in its place: module search path and prefix (a shadowing ``encodings``,
# ``site``), the bytecode cache (a forged ``_boot`` .pyc), the user site (its .pth files run
# before site-packages' outside a venv), the executable (macOS: another one, so another
# environment). PYTHONWARNINGS only when a category names a module.
WEAKENING_VARIABLES = frozenset(
    ("PYTHONPATH", "PYTHONHOME", "PYTHONPYCACHEPREFIX", "PYTHONPLATLIBDIR", "PYTHONUSERBASE", "PYTHONEXECUTABLE")
)
WATCHED_EVENTS = (
    CONNECT_EVENTS
    | NAME_EVENTS
    | REVERSE_EVENTS
    | TAMPER_EVENTS
    | ENV_EVENTS
    | SPAWN_EVENTS
    | frozenset(("socket.__new__", BIND_EVENT, SUBINTERPRETER_EVENT, TEARDOWN_EVENT, "import"))
)

LOOPBACK_NAMES = frozenset(("localhost",))
LOOPBACK_V4 = "127.0.0.1"
LOOPBACK_V6 = "v6:0:0:0:0:0:0:0:1"
LOOPBACK_ALIASES = frozenset(("name:localhost", LOOPBACK_V4, LOOPBACK_V6))
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._")
_HEX = frozenset("0123456789abcdef")
_DIGITS = frozenset("0123456789")
_MAX_HOST = 253

_str_copy = str.__str__  # an exact str from any real str subclass, through str's own C slot
_bytes_decode = bytes.decode
_int_copy = int.__index__
_tuple_len = tuple.__len__
_tuple_get = tuple.__getitem__

# -- canonical forms ------------------------------------------------------------------------
# A canonical host is a str: "a.b.c.d" for IPv4, "v6:h:h:h:h:h:h:h:h" for IPv6 (an IPv4-mapped
# address becomes its IPv4 form), "name:example.com" for a DNS name, or None when the value is
# not something we can compare safely (then it is refused).


def _parse_v4(text: "Any", _len=len, _int=int, _digits=_DIGITS, _frozenset=frozenset) -> "Any":
    parts = text.split(".")
    if _len(parts) != 4:
        return None
    out = []
    for part in parts:
        # no leading zeros: inet_aton would read "010" as octal 8
        if not part or _len(part) > 3 or not _frozenset(part) <= _digits or (part[0] == "0" and _len(part) > 1):
            return None
        value = _int(part)
        if value > 255:
            return None
        out.append(value)
    return out


def _parse_v6(text: "Any", _len=len, _int=int, _hex=_HEX, _frozenset=frozenset, _v4=_parse_v4) -> "Any":
    if "%" in text or text.count("::") > 1:
        return None
    tail = []
    if "." in text:
        head, _, last = text.rpartition(":")
        quad = _v4(last)
        if quad is None:
            return None
        tail = [quad[0] * 256 + quad[1], quad[2] * 256 + quad[3]]
        text = head + ":" if head.endswith(":") else head
        if text == ":":
            text = "::"
    if "::" in text:
        left, _, right = text.partition("::")
        lparts = left.split(":") if left else []
        rparts = right.split(":") if right else []
        missing = 8 - _len(tail) - _len(lparts) - _len(rparts)
        if missing < 1:
            return None
        parts = lparts + ["0"] * missing + rparts
    else:
        parts = text.split(":") if text else []
    if _len(parts) + _len(tail) != 8:
        return None
    groups = []
    for part in parts:
        if not part or _len(part) > 4 or not _frozenset(part) <= _hex:
            return None
        groups.append(_int(part, 16))
    return groups + tail


def _canon_text(
    text: "Any",
    _len=len,
    _v4=_parse_v4,
    _v6=_parse_v6,
    _names=_NAME_CHARS,
    _frozenset=frozenset,
    _max=_MAX_HOST,
    _hexfmt="%x",
) -> "Optional[str]":
    """Canonical form of an exact ``str`` host, or None."""
    host = text.lower()
    if _len(host) > _max + 2 or not host:
        return None
    if host[0] == "[" and host[-1] == "]":
        host = host[1:-1]
    if ":" in host:
        groups = _v6(host)
        if groups is None:
            return None
        if groups[:6] == [0, 0, 0, 0, 0, 0xFFFF]:
            hi, lo = groups[6], groups[7]
            return "%d.%d.%d.%d" % (hi >> 8, hi & 255, lo >> 8, lo & 255)
        return "v6:" + ":".join([_hexfmt % g for g in groups])
    quad = _v4(host)
    if quad is not None:
        return "%d.%d.%d.%d" % (quad[0], quad[1], quad[2], quad[3])
    if host.endswith("."):
        host = host[:-1]
    if not host or not _frozenset(host) <= _names or ".." in host:
        return None
    return "name:" + host


def _exact_str(
    value: "Any",
    _type=type,
    _str=str,
    _bytes=bytes,
    _copy=_str_copy,
    _decode=_bytes_decode,
    TypeError=TypeError,  # noqa: N803 - bound here, so a replaced builtins.TypeError changes nothing
    UnicodeDecodeError=UnicodeDecodeError,  # noqa: N803
) -> "Optional[str]":
    """An exact str copy of a str/bytes host, read through the base type's C code, or None."""
    kind = _type(value)
    if kind is _str:
        return value
    if kind is _bytes:
        try:
            return _decode(value, "ascii")
        except UnicodeDecodeError:
            return None
    try:
        return _copy(value)  # TypeError unless a real str subclass
    except TypeError:
        pass
    try:
        return _decode(value, "ascii")  # a real bytes subclass
    except (TypeError, UnicodeDecodeError):
        return None  # bytearray (mutable: could change under us), or anything else


def _plain_host(
    value: "Any",
    _type=type,
    _str=str,
    _decode=_bytes_decode,
    TypeError=TypeError,  # noqa: N803
    UnicodeDecodeError=UnicodeDecodeError,  # noqa: N803
) -> "Optional[str]":
    """The text of a host exactly as the socket C code hands it to the kernel, or None.

    An exact ``str`` (C uses its ASCII buffer as is) or ``bytes`` (or a real subclass: C reads
    the buffer, not methods). A ``str`` subclass is refused: C converts it with the ``idna``
    codec, Python code anyone can replace, so what the guard reads is not what the kernel gets.
    """
    if _type(value) is _str:
        return value
    try:
        return _decode(value, "ascii")
    except (TypeError, UnicodeDecodeError):
        return None  # str subclasses, bytearray (mutable), anything else


def canonical_host(value: "Any", _exact=_plain_host, _canon=_canon_text) -> "Optional[str]":
    """Canonical form of a host as passed to the socket API, or None if it cannot be trusted."""
    text = _exact(value)
    if text is None:
        return None
    return _canon(text)


def _exact_port(value: "Any", _type=type, _int=int, _copy=_int_copy, TypeError=TypeError) -> "Optional[int]":  # noqa: N803
    if _type(value) is _int:
        return value
    try:
        return _copy(value)  # only real int subclasses pass
    except TypeError:
        return None  # objects with their own __index__ could answer differently twice


def _display(value: "Any", _exact=_exact_str, _port=_exact_port, _repr=repr) -> str:
    """A safe text for messages: never calls the caller's __str__ or __repr__."""
    number = _port(value)
    if number is not None:
        return "%d" % number
    text = _exact(value)
    if text is None:
        return "<unreadable address>"
    if text.isprintable() and " " not in text:
        return text
    return _repr(text)


# -- the policy -----------------------------------------------------------------------------


# A policy is an exact tuple, not an object of a class of ours: a class attribute can be
# replaced by anyone, a tuple's items cannot. Index names:
DESTINATIONS, NAMES, RESOLVE, BROKER, REASON = range(5)


def make_policy(
    destinations: "FrozenSet[Tuple[str, int]]",
    names: "FrozenSet[str]",
    resolve: "Tuple[Tuple[str, int], ...]",
    broker: str,
    reason: "Optional[str]" = None,
) -> "Policy":
    """``destinations``: (canonical host, port) pairs reachable directly; ``names``: canonical
    "name:..." hosts that may be resolved; ``resolve``: (dns name, port) entries allowed by
    name, so resolved when a connection's port matches; ``broker``: for messages; ``reason``:
    set when everything is blocked because the shim could not start."""
    return (destinations, names, resolve, broker, reason)


def policy_from_config(config: "Config") -> "Policy":
    return policy_for(config.broker_host, config.broker_port, config.allow)


def policy_for(broker_host: str, broker_port: int, allow: "Tuple[Tuple[str, int], ...]" = ()) -> "Policy":
    """Turn the broker's address and the allow-list into canonical allow sets.

    The broker's host and ``localhost``, ``127.0.0.1`` and ``::1`` are one host when the
    broker is on loopback, whichever spelling the client uses.
    """
    entries = [(broker_host, broker_port)] + list(allow)
    destinations = set()
    names = set()
    resolve = []
    for host, port in entries:
        canon = canonical_host(host)
        if canon is None:  # the config parser checked the characters; this is a belt and braces
            raise ValueError("cannot use %r as a host" % (host,))
        aliases = LOOPBACK_ALIASES if canon in LOOPBACK_ALIASES else frozenset((canon,))
        for alias in aliases:
            destinations.add((alias, port))
            if alias.startswith("name:"):
                names.add(alias)
        if canon.startswith("name:") and canon not in LOOPBACK_ALIASES:
            resolve.append((canon[5:], port))
    broker = format_destination(broker_host, broker_port)
    return make_policy(frozenset(destinations), frozenset(names), tuple(resolve), broker)


def block_all_policy(broker: str, reason: str) -> "Policy":
    return make_policy(frozenset(), frozenset(), (), broker, reason)


# -- the decision ---------------------------------------------------------------------------


def _resolves_to(
    canon: str,
    port: int,
    resolve: "Tuple[Tuple[str, int], ...]",
    _sys=sys,
    _canon=_canon_text,
    _type=type,
    _builtin=type(len),
    _module=type(sys),
    _encode=str.encode,
    OSError=OSError,  # noqa: N803
) -> bool:
    """Is this IP one that an allowed *name* (with this port) resolves to?"""
    # Only asked when the port matches such an entry, so most connections never resolve.
    # ``_socket.getaddrinfo`` must be the real C function: a module planted in sys.modules
    # under that name gets nothing.
    wanted = [name for name, allowed_port in resolve if allowed_port == port]
    if not wanted:
        return False
    module = _sys.modules.get("_socket")
    if _type(module) is not _module:
        return False
    getaddrinfo = module.__dict__.get("getaddrinfo")
    if _type(getaddrinfo) is not _builtin or getaddrinfo.__self__ is not module:
        return False
    for name in wanted:
        try:
            infos = getaddrinfo(_encode(name, "ascii"), port)  # bytes: no idna codec on the way
        except OSError:
            continue
        for info in infos:
            if _canon(info[4][0]) == canon:
                return True
    return False


def decide_destination(
    host: "Any",
    port: "Any",
    policy: "Policy",
    _canonical=canonical_host,
    _port=_exact_port,
    _resolves=_resolves_to,
) -> bool:
    """May this interpreter open a connection to (host, port) directly?"""
    canon = _canonical(host)
    number = _port(port)
    if canon is None or number is None:
        return False
    if (canon, number) in policy[0]:
        return True
    if policy[2] and not canon.startswith("name:"):
        return _resolves(canon, number, policy[2])
    return False


def decide_name(host: "Any", policy: "Policy", _canonical=canonical_host) -> bool:
    """May this name be resolved? IP literals need no DNS; None is the local host."""
    if host is None:
        return True
    canon = _canonical(host)
    if canon is None:
        return False
    return not canon.startswith("name:") or canon in policy[1]


def decide_reverse(host: "Any", policy: "Policy", _canonical=canonical_host, _loop=LOOPBACK_ALIASES) -> bool:
    """May this address be looked up in reverse? ``localhost``, 127.0.0.1, ::1 and the allowed names.

    Anything else may ask a DNS server, and a PTR query for 127.x.y.z carries 24 bits of the
    caller's choosing to it.
    """
    canon = _canonical(host)
    if canon is None:
        return False
    return canon in _loop or canon in policy[1]


def decide_bind(host: "Any", policy: "Policy", _canonical=canonical_host, _plain=_plain_host) -> bool:
    """May a socket be bound to this host? Any address literal and "" (any); names only if allowed."""
    if _plain(host) == "":
        return True
    canon = _canonical(host)
    if canon is None:
        return False
    return not canon.startswith("name:") or canon in policy[1]


def _weakening(
    env: "Any",
    inherited: "FrozenSet[Tuple[str, str]]",
    _type=type,
    _dict=dict,
    _items=dict.items,
    _copy=_str_copy,
    _latin=bytes.decode,
    _names=WEAKENING_VARIABLES,
    TypeError=TypeError,  # noqa: N803
) -> "Optional[str]":
    """The first variable of a child's environment that weakens the shim in a Python child.

    "" if none; None if the environment cannot be read without running the caller's code (not an
    exact ``dict``, or a key or value neither ``str`` nor ``bytes``: ``subprocess`` and ``os``
    would call its methods again and could be answered differently). A variable with the value
    this interpreter was started with is no weakening: ``env=None`` would pass it too.
    """
    if env is None:
        return ""
    if _type(env) is not _dict:
        return None
    for key, value in _items(env):
        pair = []
        for item in (key, value):
            try:
                text = _copy(item)
            except TypeError:
                try:
                    text = _latin(item, "latin-1")
                except TypeError:
                    return None
            pair.append(text)
        name, text = pair[0], pair[1]
        if not (name.startswith("AGENSHIELD_") or name in _names or name == "PYTHONWARNINGS"):
            continue
        if (name, text) in inherited:
            continue
        if name == "PYTHONWARNINGS":
            # action:message:category:module:lineno; a dotted category is imported before site
            if not [f for f in text.split(",") if "." in (f.split(":") + ["", "", ""])[2]]:
                continue
        return name
    return ""


def inherited_environment(environ: "Any") -> "FrozenSet[Tuple[str, str]]":
    """(name, value) of the variables ``_weakening`` watches, as this interpreter got them."""
    data = getattr(environ, "_data", None)
    if type(data) is not dict:
        return frozenset()
    out = set()
    for key, value in data.items():
        name = os.fsdecode(key)
        if name.startswith("AGENSHIELD_") or name in WEAKENING_VARIABLES or name == "PYTHONWARNINGS":
            out.add((name, os.fsdecode(value)))
    return frozenset(out)


def _address_parts(address: "Any", _len=_tuple_len, _get=_tuple_get, TypeError=TypeError) -> "Any":  # noqa: N803
    """(host, port) of an AF_INET/AF_INET6 address tuple; None for any other address."""
    # The socket C code only accepts a tuple for AF_INET and AF_INET6, and it has already
    # parsed the address when the event is raised, so a non-tuple here is a Unix path.
    try:
        size = _len(address)
    except TypeError:
        return None
    if size < 2:
        return (_get(address, 0) if size else None, None)
    return (_get(address, 0), _get(address, 1))


# -- teardown: the network closed when CPython stops calling the hooks -------------------------
# When an interpreter ends, CPython raises "cpython.PyInterpreterState_Clear" (hooks still
# called), then drops the hook list and only afterwards releases what the interpreter still holds:
# the hooks themselves, codec search functions and error handlers, os.register_at_fork callbacks,
# sys.monitoring callbacks (3.12+), warnings state, the last cycles. A finalizer reachable from any
# of them runs with no hook at all (checked on 3.8-3.13). CPython offers no seam after that
# event, so the guard answers it with a layer below Python: a seccomp filter, inherited by every
# thread and child, that refuses what could reach the network (``teardown``). The process is
# ending; an embedding program that goes on after Py_FinalizeEx has no network left (README).
#
# The filter needs ``_ctypes`` (prctl, syscall), and at that event nothing can be imported any
# more, so its three functions are fetched earlier ("prepared"): when ``_socket`` is first
# imported (what an attacker needs then has to be loaded before: on 3.8-3.11 and 3.13 no
# extension module loads once the hooks are gone, and imports fail), or at exit, through
# ``atexit``, with --lock, where something else can reach the network afterwards (a child exec'd
# with a weakening environment would inherit no guard, only the filter; on 3.12, and on versions
# not checked, ``_imp.create_dynamic`` can still load a ``_socket`` never imported before). Unlocked,
# that 3.12 case is left to the OS layer: preparing at every exit costs 4% of a start there. Loading
# ``_ctypes`` costs 0.3-0.5 ms, so a process that never touches ``_socket`` does not pay it
# (README, start-up cost). Whatever sits in the list of prepared functions is checked when used:
# only ``_ctypes``'s own builtins pass. When nothing valid was prepared and ``_socket`` has been
# loaded (past the import event, say, or the preparation was removed), or when installing the
# filter raised (another audit hook can veto ``_ctypes``'s events), the guard cannot close the
# network, and ends the process (status 120) rather than run those finalizers.

SOCKET_MODULE = "_socket"
# Checked: once the hooks are gone, no extension module loads on 3.8-3.11 and 3.13 (SystemError, or
# a fatal error on 3.8 and 3.13). On 3.10-3.12 multi-phase modules do; ``_socket`` is one from 3.12:
# there a ``_socket`` first loaded by such a finalizer is closed only with --lock (atexit below).
#: (machine, seccomp(2)'s number, the filter: ``struct sock_filter[]``), written by
#: tools/seccomp_filter.py, which assembles them and says what they refuse (a test checks that
#: they are its output; assembling them here would cost every start more than they do).
SECCOMP_FILTERS = (
    (
        'x86_64',
        317,
        b' \x00\x00\x00\x04\x00\x00\x00\x15\x00\x01\x00>\x00\x00\xc0\x06\x00\x00\x00\x01\x00\x05\x00'
        b' \x00\x00\x00\x00\x00\x00\x005\x00\x15\x00\x00\x00\x00@\x15\x00\x14\x00*\x00\x00\x00'
        b'\x15\x00\x13\x00+\x00\x00\x00\x15\x00\x12\x00 \x01\x00\x00\x15\x00\x11\x00.\x00\x00\x00'
        b'\x15\x00\x10\x003\x01\x00\x00\x15\x00\x0f\x001\x00\x00\x00\x15\x00\x0e\x002\x00\x00\x00'
        b'\x15\x00\r\x00\xa9\x01\x00\x00\x15\x00\x0c\x00\xaa\x01\x00\x00\x15\x00\x0b\x00\xab\x01\x00\x00'
        b'\x15\x00\n\x00\xb6\x01\x00\x00\x15\x00\x02\x00)\x00\x00\x00\x15\x00\x03\x00,\x00\x00\x00'
        b'\x06\x00\x00\x00\x00\x00\xff\x7f \x00\x00\x00\x10\x00\x00\x00\x15\x00\x04\x05\x01\x00\x00\x00'
        b' \x00\x00\x000\x00\x00\x00\x15\x00\x00\x03\x00\x00\x00\x00 \x00\x00\x004\x00\x00\x00'
        b'\x15\x00\x00\x01\x00\x00\x00\x00\x06\x00\x00\x00\x00\x00\xff\x7f\x06\x00\x00\x00\x01\x00\x05\x00',
    ),
    (
        'aarch64',
        277,
        b' \x00\x00\x00\x04\x00\x00\x00\x15\x00\x01\x00\xb7\x00\x00\xc0\x06\x00\x00\x00\x01\x00\x05\x00'
        b' \x00\x00\x00\x00\x00\x00\x00\x15\x00\x14\x00\xcb\x00\x00\x00\x15\x00\x13\x00\xca\x00\x00\x00'
        b'\x15\x00\x12\x00\xf2\x00\x00\x00\x15\x00\x11\x00\xd3\x00\x00\x00\x15\x00\x10\x00\r\x01\x00\x00'
        b'\x15\x00\x0f\x00\xc8\x00\x00\x00\x15\x00\x0e\x00\xc9\x00\x00\x00\x15\x00\r\x00\xa9\x01\x00\x00'
        b'\x15\x00\x0c\x00\xaa\x01\x00\x00\x15\x00\x0b\x00\xab\x01\x00\x00\x15\x00\n\x00\xb6\x01\x00\x00'
        b'\x15\x00\x02\x00\xc6\x00\x00\x00\x15\x00\x03\x00\xce\x00\x00\x00\x06\x00\x00\x00\x00\x00\xff\x7f'
        b' \x00\x00\x00\x10\x00\x00\x00\x15\x00\x04\x05\x01\x00\x00\x00 \x00\x00\x000\x00\x00\x00'
        b'\x15\x00\x00\x03\x00\x00\x00\x00 \x00\x00\x004\x00\x00\x00\x15\x00\x00\x01\x00\x00\x00\x00'
        b'\x06\x00\x00\x00\x00\x00\xff\x7f\x06\x00\x00\x00\x01\x00\x05\x00',
    ),
)
#: ``_ctypes``'s functions the filter is installed with, filled by ``prepare_teardown``.
TEARDOWN_TOOLS = ("dlopen", "dlsym", "call_function")
_teardown_tools: "List[Any]" = []
_multiarch = getattr(sys.implementation, "_multiarch", "")  # what this Python was built for (a 32-bit
_machine = _multiarch.partition("-")[0] if _multiarch else os.uname().machine  # one on x86_64 says so)
#: This machine's row of SECCOMP_FILTERS (64-bit little-endian Linux), or None: no filter here.
SECCOMP = (
    [row for row in SECCOMP_FILTERS if row[0] == _machine] + [None]
    if sys.platform.startswith("linux") and sys.maxsize > 2**32 and sys.byteorder == "little"
    else [None]
)[0]


def prepare_teardown(tools: "List[Any]" = _teardown_tools, _seccomp=SECCOMP, _base=Exception) -> None:
    """Fetch ``_ctypes``'s functions for ``teardown`` while imports still work (once)."""
    if tools or _seccomp is None:
        return
    try:
        import _ctypes
    except _base:
        return  # no _ctypes: at teardown the guard ends the process if _socket was loaded
    tools[:] = [_ctypes.dlopen, _ctypes.dlsym, _ctypes.call_function]


def teardown(
    tools: "Any" = _teardown_tools,
    late: bool = False,
    _seccomp=SECCOMP,
    _type=type,
    _list=list,
    _builtin=type(len),
    _names=TEARDOWN_TOOLS,
    _errors=OSError.__subclasses__,
    _module=type.__dict__["__module__"].__get__,
    _name=type.__dict__["__name__"].__get__,
    _eq=str.__eq__,
    _id=id,
    _to=int.to_bytes,
    _offset=bytes.__basicsize__ - 1,
    _len=len,
    _write=os.write,
    _exit=os._exit,
    _base=BaseException,
) -> "Optional[bool]":
    """At TEARDOWN_EVENT: close the network below Python, or end the process if that cannot be done.

    True: the filter holds; False: seccomp refused it (not available here); None: no filter for
    this system. ``late``: --lock (a missing preparation then always ends it).
    """
    if _seccomp is None:
        return None  # README: which layer stops what
    try:
        # only _ctypes's own builtins pass: one module's, by their C names, which nobody can set
        found: "Any" = tools[:] if _type(tools) is _list and _len(tools) == 3 else [None]
        owner = found[0].__self__ if _type(found[0]) is _builtin else None
        for index in (0, 1, 2):
            function = found[index]
            if _type(function) is not _builtin or function.__name__ != _names[index] or function.__self__ is not owner:
                found = None
                break
    except _base:
        found = None
    if found is not None:
        try:
            dlopen, dlsym, call = found
            program = _seccomp[2]
            # struct sock_fprog {unsigned short len; struct sock_filter *filter;}: the filter is
            # the bytes object's own buffer (CPython keeps it at a fixed offset, immutable)
            fprog = _to(_len(program) // 8, 2, "little") + b"\0\0\0\0\0\0" + _to(_id(program) + _offset, 8, "little")
            libc = dlopen(None, 2)
            prctl, syscall = dlsym(libc, "prctl"), dlsym(libc, "syscall")
            if call(prctl, (38, 1, 0, 0, 0)) != 0:  # PR_SET_NO_NEW_PRIVS: needed without CAP_SYS_ADMIN
                return False
            for flags in (1, 0):  # SECCOMP_FILTER_FLAG_TSYNC; else this thread, the one that finalizes
                if call(syscall, (_seccomp[1], 1, flags, fprog)) == 0:  # SECCOMP_SET_MODE_FILTER
                    return True
            return call(prctl, (22, 2, fprog)) == 0  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER: before Linux 3.17
        except _base:
            alive = True  # refused: any audit hook can veto _ctypes's own events
    else:
        # Has _socket been loaded, whoever imported it and however? Its gaierror (an OSError
        # subclass) outlives the module on 3.8-3.11 (CPython keeps a copy of a single-phase
        # module's dict) and lives with any of its types on 3.12+ (they hold their module). Read
        # through type's and str's own C code: no code of a class's runs.
        alive = late
        try:
            for kind in _errors():
                if _eq("gaierror", _name(kind)) is True and _eq("socket", _module(kind)) is True:
                    alive = True
        except _base:
            alive = True  # a check that fails is no proof of absence
    if alive:
        try:
            _write(2, b"AgenShield: the network could not be closed for the interpreter's teardown (the guard's "
                      b"preparation is missing, or was refused); ending the process (status 120)\n")
        except _base:
            pass  # no stderr: end all the same
        _exit(120)
    return None


# -- the hook -------------------------------------------------------------------------------


def make_hook(
    policy: "Policy",
    report: "Callable[[str, str, Policy], None]",
    locked: bool = False,
    inherited: "FrozenSet[Tuple[str, str]]" = frozenset(),
) -> "Callable[[str, Tuple[Any, ...]], None]":
    """Build the audit hook for a policy; ``report`` logs a refusal (its failures are ignored).

    ``locked`` (installed with ``--lock``): processes started with an environment that weakens
    the shim in a Python child are refused too; ``inherited`` is what this interpreter got.
    """
    # Two functions: ``audit_hook`` sees every audit event of the interpreter (every ``open``,
    # every import), so it does one set lookup and carries two defaults; ``judge`` runs for the
    # few events that matter.

    def judge(
        event: str,
        args: "Tuple[Any, ...]",
        _connect=CONNECT_EVENTS,
        _names=NAME_EVENTS,
        _reverse=REVERSE_EVENTS,
        _codec=CODEC_EVENTS,
        _tamper=TAMPER_EVENTS,
        _env=ENV_EVENTS,
        _spawn=SPAWN_EVENTS,
        _subs=SUBINTERPRETER_MODULES,
        _exact=_exact_str,
        _str=str,
        _type=type,
        _families=ALLOWED_FAMILIES,
        _inet=(AF_INET, AF_INET6),
        _raw=(SOCK_RAW, SOCK_PACKET),
        _policy=policy,
        _report=report,
        _locked=locked,
        _inherited=inherited,
        _parts=_address_parts,
        _dest=decide_destination,
        _name=decide_name,
        _rev=decide_reverse,
        _bind=decide_bind,
        _weak=_weakening,
        _display=_display,
        _format=format_destination,
        _message=blocked_message,
        _bind_message=bind_message,
        _error=NetworkBlockedError,
        _permission=PermissionError,
        _import=ImportError,
        _base=BaseException,
        _socket_module=SOCKET_MODULE,
        _tools=_teardown_tools,
        _prepare=prepare_teardown,
        _teardown=teardown,
        _teardown_event=TEARDOWN_EVENT,
        _late=locked,
        _protected=(),
    ) -> None:
        target = None
        message = None
        if event == "import":
            name = _exact(args[0])
            if name is not None and name.rpartition(".")[2] not in _subs:
                if name == _socket_module and not _tools:
                    try:
                        _prepare(_tools)  # what closes the network at teardown, while imports work
                    except _base:
                        pass
                return
            raise _import(
                "AgenShield: %s cannot be imported in a guarded interpreter: it starts subinterpreters, "
                "which run without the network guard" % (_display(args[0]),)
            )
        elif event in _connect:
            parts = _parts(args[1])
            if parts is None or _dest(parts[0], parts[1], _policy):
                return
            target = _format(_display(parts[0]), None if parts[1] is None else _display(parts[1]))
        elif event in _names:
            host = args[0]
            port = args[1] if event == "socket.getaddrinfo" else None
            target = _format(_display(host), None if port is None else _display(port))
            if _name(host, _policy):
                if _type(host) is not _str:
                    return
                if _policy[4] is None:  # a guard that blocks everything says why, not this
                    message = (
                        "AgenShield: lookup of %s refused: the C code would convert this str with the idna codec, "
                        "which the guard cannot check; call socket.%s (the shim passes bytes) or pass bytes"
                        % (target, event[7:])
                    )
        elif event in _reverse:
            host = args[0]
            if event == "socket.getnameinfo":
                parts = _parts(host)
                host = None if parts is None else parts[0]
            target = "reverse lookup of " + _display(host)
            if host is not None and _rev(host, _policy):
                if event not in _codec or _type(host) is not _str:
                    return
                if _policy[4] is None:
                    message = (
                        "AgenShield: %s refused: the C code would convert this str with the idna codec, which the "
                        "guard cannot check; call socket.gethostbyaddr (the shim passes bytes) or pass bytes" % (target,)
                    )
        elif event == "socket.bind":
            parts = _parts(args[1])
            if parts is None or _bind(parts[0], _policy):
                return
            target = _format(_display(parts[0]), None if parts[1] is None else _display(parts[1]))
            message = _bind_message(target)
        elif event == "socket.__new__":
            family, kind = args[1], args[2]
            if family in _families and not (family in _inet and kind & 15 in _raw):
                return
            target = "a raw or non-IP socket (family %d, type %d)" % (family, kind)
        elif event in _tamper:
            for item in _protected:
                if item is args[0]:
                    raise _permission("AgenShield: the network guard cannot be modified")
            return
        elif event in _env:
            name = _exact(args[0])
            if name is not None and name.startswith("AGENSHIELD_"):
                raise _permission(
                    "AgenShield: %s cannot be changed inside a guarded interpreter" % (_display(name),)
                )
            if _locked and event == "os.putenv" and (name is None or _weak({name: args[1]}, _inherited) != ""):
                raise _permission(
                    "AgenShield: %s cannot be set inside a guarded interpreter installed with --lock: it would "
                    "start Python children without the guard" % (_display(args[0]),)
                )
            return
        elif event in _spawn:
            if not _locked:
                return
            weak = _weak(args[3] if event == "subprocess.Popen" or event == "os.spawn" else args[2], _inherited)
            if weak == "":
                return
            raise _permission(
                "AgenShield: starting a process refused: %s (installed with --lock). Start it without "
                "that variable, or with the value this interpreter has; pass the environment as a dict of str"
                % ("its environment sets %s, which would let a Python child run without the guard" % (weak,)
                   if weak is not None else "its environment is not a dict of str or bytes, so it cannot be checked")
            )
        elif event == _teardown_event:
            _teardown(_tools, _late)
            return
        elif event == "cpython.PyInterpreterState_New":
            raise _permission(
                "AgenShield: subinterpreters cannot be created in a guarded interpreter: they run without the "
                "network guard"
            )
        else:
            return
        if message is None:
            message = _message(target, _policy[3], _policy[4])
        try:
            _report(event, target, _policy)
        except _base:
            pass
        raise _error(message, target, _policy[3])

    def audit_hook(event: str, args: "Tuple[Any, ...]", _watched=WATCHED_EVENTS, _judge=judge) -> None:
        if event in _watched:
            _judge(event, args)

    protected = (audit_hook, judge) + PROTECTED_HELPERS
    judge.__defaults__ = (judge.__defaults__ or ())[:-1] + (protected,)
    return audit_hook


PROTECTED_HELPERS = (
    _parse_v4,
    _parse_v6,
    _canon_text,
    _exact_str,
    _plain_host,
    canonical_host,
    _exact_port,
    _display,
    _resolves_to,
    decide_destination,
    decide_name,
    decide_reverse,
    decide_bind,
    _weakening,
    _address_parts,
    format_destination,
    blocked_message,
    bind_message,
    prepare_teardown,
    teardown,
)


def seal(hook: "Callable[..., None]") -> "Callable[[str, Tuple[Any, ...]], None]":
    """What to register: the function's ``__call__`` method-wrapper, not the function."""
    # CPython runs audit hooks with tracing off unless the hook has a true ``__cantrace__``
    # attribute, and it looks that attribute up on the object registered. A function's
    # ``__dict__`` takes any attribute, so anyone could plant ``__cantrace__`` and have a tracer
    # jump over the ``raise``. A method-wrapper has no ``__dict__`` and does not forward
    # attribute lookups to the function it wraps, so nothing can be planted, on every CPython we
    # support; and its attribute lookup is the generic one (no AttributeError raised per event,
    # which ``types.MethodType`` would cost). The price is the argument tuple a method-wrapper
    # call builds, tens of nanoseconds an event: up to 1% of an ``open()`` (benchmarks/startup.py
    # prints the no-op hook both ways). Every wrapper that forwards a call and has no
    # ``__dict__`` of its own costs at least that much.
    return hook.__call__  # type: ignore[operator]


# -- installed state --------------------------------------------------------------------------

_active: "Optional[Policy]" = None
_installs = 0  # how many hooks this interpreter got from us: the boot's idempotence is tested on it


def install(
    policy: "Policy",
    report: "Callable[[str, str, Policy], None]",
    locked: bool = False,
    inherited: "FrozenSet[Tuple[str, str]]" = frozenset(),
) -> None:
    """Add the audit hook for this policy (there is no way to take it back)."""
    global _active, _installs
    sys.addaudithook(seal(make_hook(policy, report, locked, inherited)))
    _active = policy
    _installs += 1
    if _installs == 1 and (locked or SOCKET_MODULE in sys.modules):
        # no "import _socket" event is coming to prepare the teardown, or (--lock) something else
        # could reach the network after it: do it at exit (30-40 µs of start-up for atexit, only
        # here). Not on 3.12 unlocked: 0.4 ms at every exit of every 3.12 process is over
        # the start-up budget; that gap is --lock's and the OS layer's (README, Teardown).
        import atexit

        atexit.register(prepare_teardown)


def active_policy() -> "Optional[Policy]":
    return _active


# == boot =======================================================================================

_booted = False
_config_object = None  # the parsed Config when AGENSHIELD_* variables were set at boot

#: Kept equal to ``_config.VARIABLES`` (a unit test checks): when none is set, defaults apply.
VARIABLES = (
    "AGENSHIELD_ENABLED",
    "AGENSHIELD_BROKER_HOST",
    "AGENSHIELD_BROKER_PORT",
    "AGENSHIELD_BROKER_SOCKET",
    "AGENSHIELD_LOG_LEVEL",
    "AGENSHIELD_ALLOW",
    "AGENSHIELD_AUDIT_LOG",
    "AGENSHIELD_TRANSPORT",
)

#: (module whose import triggers the hook, "hook module:function"), registered in this order.
HOOKS = (
    ("socket", "agenshield_shim.hooks.socket:install"),
    ("socket", "agenshield_shim._netguard:install"),
    ("http.client", "agenshield_shim.hooks.http_client:install"),
    ("aiohttp", "agenshield_shim.hooks.aiohttp:install"),
    ("httpx", "agenshield_shim.hooks.httpx:install"),
    ("httpx2", "agenshield_shim.hooks.httpx:install"),  # the maintained fork, its own module names
    ("websockets.asyncio.client", "agenshield_shim.hooks.websockets:install_asyncio"),
    ("websockets.sync.client", "agenshield_shim.hooks.websockets:install_sync"),
    ("websockets.legacy.client", "agenshield_shim.hooks.websockets:install_legacy"),
    ("urllib.request", "agenshield_shim.hooks.proxy_env:install"),
)

# -- the proxy environment ----------------------------------------------------------------------
# Every guarded interpreter carries the standard proxy variables pointing at the broker, so that
# what no hook knows (a library honouring HTTP(S)_PROXY, a C library reading them with getenv, a
# child process: curl, git, uv, npm, another environment's pip) goes through the broker too. The
# guard stays the enforcement; the variables are what makes the unknown work. They are set here,
# at boot, not where children start: libraries in this process (and libcurl, grpc) read them at
# any time, and an exec path that is not patched would miss them. A proxy the application had set
# is replaced (the guard would refuse it, and a child would use it to go around the broker), and
# NO_PROXY/no_proxy hold only AGENSHIELD_ALLOW (a child would connect directly to what they list).

#: Set to ``http://BROKER`` (README: the proxy environment); npm's own settings beat HTTP(S)_PROXY.
PROXY_VARIABLES = (
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
    "npm_config_proxy", "npm_config_https_proxy",
)
NO_PROXY_VARIABLES = ("NO_PROXY", "no_proxy")


def proxy_environment(broker: str) -> "Dict[str, str]":
    """The proxy variables for a broker at ``broker`` (``host:port``, IPv6 in brackets)."""
    url = "http://" + broker
    return {name: url for name in PROXY_VARIABLES}


def no_proxy_value(allow: "Tuple[Tuple[str, int], ...]") -> str:
    """``NO_PROXY`` for ``AGENSHIELD_ALLOW``: exactly the ``host:port`` pairs the guard lets through directly.

    Python's libraries (urllib, requests, httpx) then reach them directly, as they did before the
    proxy variables; a program that ignores ports in NO_PROXY (curl) sends them to the broker.
    """
    return ",".join(format_destination(host, port) for host, port in allow)


def set_proxy_environment(environ: "Any", broker: str, allow: "Tuple[Tuple[str, int], ...]" = ()) -> None:
    """Point this process's proxy variables (and so its children's) at the broker; NO_PROXY holds
    only ``AGENSHIELD_ALLOW`` (what the guard lets through anyway), or is removed.

    Compares ``os.environ``'s own store first, so a child that inherited them sets nothing (each
    ``os.environ`` assignment is a ``putenv`` and an audit event).
    """
    url = "http://" + broker
    bypass = no_proxy_value(allow) if allow else None
    data = getattr(environ, "_data", None)
    encode = getattr(environ, "encodekey", None)
    if type(data) is not dict or encode is None:  # pragma: no cover - not CPython's os.environ
        for name in PROXY_VARIABLES:
            environ[name] = url
        for name in NO_PROXY_VARIABLES:
            if bypass is None:
                environ.pop(name, None)
            else:
                environ[name] = bypass
        return
    wanted = environ.encodevalue(url)
    for name in PROXY_VARIABLES:
        if data.get(encode(name)) != wanted:
            environ[name] = url
    for name in NO_PROXY_VARIABLES:
        if bypass is not None:
            if data.get(encode(name)) != environ.encodevalue(bypass):
                environ[name] = bypass
        elif encode(name) in data:
            del environ[name]


#: ``policy_for("localhost", 6969)``, the defaults, spelled out: parsing them cost every default
#: start 15 µs (a unit test keeps the two equal).
DEFAULT_POLICY = make_policy(
    frozenset((("name:localhost", 6969), (LOOPBACK_V4, 6969), (LOOPBACK_V6, 6969))),
    frozenset(("name:localhost",)),
    (),
    "localhost:6969",
)


def any_variable_set(environ: "Any") -> bool:
    """Is any ``AGENSHIELD_*`` variable set? Asked of ``os.environ``'s own store when it has one."""
    # ``name in os.environ`` raises and catches two KeyErrors for every name that is not set
    # (MutableMapping.__contains__ over _Environ.__getitem__): 30 µs for the eight names, at
    # every start. Its store (``_data``, keyed by ``encodekey(name)``) answers without them.
    data = getattr(environ, "_data", None)
    encode = getattr(environ, "encodekey", None)
    if type(data) is not dict or encode is None:
        return any(name in environ for name in VARIABLES)
    return any(encode(name) in data for name in VARIABLES)


def boot() -> None:
    """Activate the shim for this interpreter (once)."""
    global _booted
    if _booted:
        return
    _booted = True
    environ = os.environ
    lock = os.path.join(os.path.dirname(os.path.dirname(__file__)), "agenshield_shim.lock")
    locked = os.path.exists(lock)
    if locked or any_variable_set(environ):
        from . import _config

        try:
            config = _config.load(environ, lock if locked else None)
        except (_config.ShimConfigError, OSError) as exc:
            reason = "invalid configuration: %s" % (exc,)
            install(
                block_all_policy("(unknown: configuration invalid)", reason),
                _report,
                locked,
                inherited_environment(environ) if locked else frozenset(),
            )
            sys.stderr.write("agenshield-shim: %s; all network access is blocked until it is fixed\n" % (exc,))
            return
        if not config.enabled:  # only reached when boot() is called directly: the .pth checks first
            return
        if config.log_level != "warn" or config.audit_log:
            from . import _log

            _log.configure(config.log_level, config.audit_log)
        policy = policy_from_config(config)
        global _config_object
        _config_object = config
    else:
        policy = DEFAULT_POLICY
    install(policy, _report, locked, inherited_environment(environ) if locked else frozenset())
    for module_name, hook in HOOKS:
        when_imported(module_name, hook)
    set_proxy_environment(environ, str(policy[BROKER]), _config_object.allow if _config_object is not None else ())


def active_config() -> "Optional[Config]":
    """The configuration this interpreter booted with, for the library hooks; None if not booted."""
    # Parsed here only when a hook asks for it and no variable was set (the boot skips the
    # parser then): the defaults.
    global _config_object
    if not _booted or _active is None:
        return None
    if _config_object is None:
        from ._config import Config

        _config_object = Config()
    return _config_object


def _report(event: str, target: str, policy: object) -> None:
    """Log a refusal; ``logging`` and the audit-log writer load only when something is refused."""
    from ._log import report_block

    report_block(event, target, policy)


# == post-import hooks ============================================================================
# Run a function when a module is imported, whatever the import order.
#
# The semantics are wrapt's ``when_imported``: if the module is already imported
# the hook runs at once, otherwise right after the module's code has run. Each
# hook runs exactly once per module object (``importlib.reload`` keeps the
# object, so it does not run again; a module removed from ``sys.modules`` and
# imported anew is a new object, and it does).
#
# Why not wrapt itself: ``import wrapt`` costs 30 ms (1.17) to 115-145 ms (2.x)
# per interpreter start on our machines, against a 15-18 ms bare start, and the
# boot path pays it in every Python process of the environment. This finder is a
# few dozen lines, imports nothing, and costs one dict lookup per import.
#
# Hooks are named as ``"package.module:function"`` strings so a hook's own module
# is imported only when its library is.


_hooks: "Dict[str, List[Hook]]" = {}
_searching: "Set[str]" = set()
_MARK = "__agenshield_hooks__"


def when_imported(name: str, hook: "Hook") -> None:
    """Run ``hook(module)`` once the module ``name`` is imported (now, if it already is)."""
    _install_finder()
    _hooks.setdefault(name, []).append(hook)
    module = sys.modules.get(name)
    if module is not None:
        from ._importhooks import fire

        fire(name, module, [hook])


def registered() -> "Dict[str, List[Hook]]":
    return {name: list(hooks) for name, hooks in _hooks.items()}


class PostImportFinder:
    """A meta path finder that only ever answers for modules that have hooks."""

    def find_spec(self, fullname: str, path: "Any" = None, target: "Any" = None) -> "Any":
        if fullname not in _hooks or fullname in _searching:
            return None
        _searching.add(fullname)
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self:
                    continue
                find_spec = getattr(finder, "find_spec", None)
                if find_spec is None:
                    continue
                spec = find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            _searching.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None  # let the import system handle what we cannot wrap
        from ._importhooks import HookedLoader

        spec.loader = HookedLoader(spec.loader, fullname)
        return spec

    def invalidate_caches(self) -> None:
        pass


_finder: "Optional[PostImportFinder]" = None


def _install_finder() -> None:
    global _finder
    if _finder is None:
        _finder = PostImportFinder()
        sys.meta_path.insert(0, _finder)
