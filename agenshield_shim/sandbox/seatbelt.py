"""macOS OS layer: the seatbelt (``sandbox-exec``) profile that lets an interpreter reach only the broker.

The profile denies by default and then allows what a Python program needs to run (its own
installation, system libraries, the workspace and temporary folders, POSIX semaphores and shared
memory for ``multiprocessing``) and, on the network, the broker alone:

- TCP: ``(remote ip "localhost:PORT")``. Seatbelt takes only ``localhost`` or ``*`` as the host of
  an ``ip``/``tcp`` filter, and ``localhost`` means the loopback addresses (IPv4 and IPv6);
- a Unix-socket broker (``broker_socket``): ``network-outbound`` with
  ``(remote unix-socket (path-literal PATH))`` (the check XNU makes at ``connect()``), plus
  ``file-read*`` (looking the socket file up) and ``file-write-data`` on that path (a Unix
  ``connect()`` is a write to the socket's inode). ``file-write-data`` rather than ``file-write*``:
  the agent must not be able to unlink or replace the broker's socket.

Children inherit the profile, so a ``curl``, a shell or a ``python -S`` started inside stays under
it. Seatbelt compares real paths (``/tmp`` is ``/private/tmp``), so every directory is written both
as given and resolved. Strings are quoted per SBPL (Scheme) rules: ``\\`` and ``"`` are escaped,
and a path with a control character (a newline, say) is refused, because no tool reading the
profile should have to agree with us on how one is escaped.

Not verified on a Mac from this repository's CI (sandbox-exec exists only on macOS): the tests
parse the profile instead; see ``tests/test_seatbelt.py``.
"""

import os
import sys
import tempfile
from typing import Iterable, List, Optional, Sequence

from .._config import DEFAULT_BROKER_PORT

SANDBOX_EXEC = "/usr/bin/sandbox-exec"
PROFILE_MARKER = ";; agenshield-shim seatbelt profile"

#: Read-only system locations every program needs (dyld shared cache, libSystem, zoneinfo, CA files).
SYSTEM_READ = (
    "/System",
    "/usr/lib",
    "/usr/share",
    "/usr/bin",
    "/bin",
    "/usr/sbin",
    "/sbin",
    "/usr/libexec",
    "/private/var/db/dyld",
    "/private/var/db/timezone",
    "/private/etc/ssl",
    "/Library/Apple/System",
)
#: Where system programs live (process-exec; also readable through SYSTEM_READ).
SYSTEM_EXEC = ("/usr/bin", "/bin", "/usr/sbin", "/sbin", "/usr/libexec")
SYSTEM_READ_FILES = (
    "/private/etc/localtime",
    "/private/etc/hosts",
    "/private/etc/passwd",
    "/private/etc/group",
    "/private/etc/protocols",
    "/private/etc/services",
)
#: Devices: read and write, no ioctl beyond what is listed.
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom", "/dev/tty", "/dev/dtracehelper")
#: Mach services: user and group lookups (getpwuid for ~), the system log, notifications (time
#: zone changes), the per-user temp directory helper, and the proxy settings that urllib reads
#: (SystemConfiguration). Not mDNSResponder: resolving arbitrary names is a DNS channel out.
MACH_SERVICES = (
    "com.apple.system.opendirectoryd.libinfo",
    "com.apple.system.opendirectoryd.membership",
    "com.apple.system.logger",
    "com.apple.logd",
    "com.apple.system.notification_center",
    "com.apple.bsd.dirhelper",
    "com.apple.SystemConfiguration.configd",
)


class ProfileError(ValueError):
    """A path or port that cannot be written into a seatbelt profile safely."""


def sbpl_string(text: str) -> str:
    """``text`` as an SBPL string literal, or :class:`ProfileError` if it cannot be one safely.

    Only ``\\`` and ``"`` are special inside an SBPL (TinyScheme) string; both are escaped. Control
    characters (a newline, NUL, DEL, ...) are refused rather than escaped: a path holding one is
    almost certainly an attack, and refusing leaves no doubt about how a reader decodes it.
    """
    bad = [ch for ch in text if ord(ch) < 0x20 or ord(ch) == 0x7F]
    if bad:
        raise ProfileError("path %r contains a control character (%r); it cannot be written into a seatbelt profile"
                           % (text, bad[0]))
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in text):
        raise ProfileError("path %r is not valid UTF-8 (lone surrogate); refusing to write it" % (text,))
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _absolute(path: str, what: str) -> str:
    if not path:
        raise ProfileError("%s: empty path" % what)
    if "\x00" in path:
        raise ProfileError("%s: path %r contains NUL" % (what, path))
    return os.path.normpath(os.path.abspath(path))


def path_variants(path: str) -> List[str]:
    """The path as given (made absolute) and, if different, as seatbelt will see it (symlinks resolved)."""
    given = _absolute(path, "path")
    real = os.path.realpath(given)
    return [given] if real == given else [given, real]


def _unique(items: Iterable[str]) -> List[str]:
    seen: List[str] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


def python_paths(python: str) -> List[str]:
    """Directories of the interpreter's installation: the venv, its base Python, the real binary's prefix.

    Worked out from files (``pyvenv.cfg``), not by running ``python``: generating a profile must not
    execute the program it is about to confine.
    """
    exe = _absolute(python, "python")
    paths: List[str] = []
    if os.path.realpath(exe) == os.path.realpath(sys.executable):
        paths += [sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix]
    venv = os.path.dirname(os.path.dirname(exe))
    cfg = os.path.join(venv, "pyvenv.cfg")
    if os.path.isfile(cfg):
        paths.append(venv)
        try:
            with open(cfg, encoding="utf-8") as handle:
                for line in handle:
                    key, sep, value = line.partition("=")
                    if sep and key.strip() == "home" and value.strip():
                        paths.append(os.path.dirname(value.strip()))  # home is the base's bin directory
        except OSError:
            pass
    paths.append(os.path.dirname(os.path.dirname(os.path.realpath(exe))))
    out: List[str] = []
    for path in paths:
        out += path_variants(path)
    # Never "/" itself: a Python in /usr/bin would otherwise make the whole disk readable.
    return [p for p in _unique(out) if p != "/"]


def temp_dirs() -> List[str]:
    """/tmp, /var/tmp and this user's $TMPDIR (on macOS a per-user folder under /var/folders)."""
    candidates = ["/tmp", "/var/tmp", tempfile.gettempdir()]
    if os.environ.get("TMPDIR"):
        candidates.append(os.environ["TMPDIR"])
    out: List[str] = []
    for path in candidates:
        out += path_variants(path)
    return _unique(out)


def _rule(action: str, operations: Sequence[str], filters: Sequence[str]) -> str:
    if not filters:
        return "(%s %s)" % (action, " ".join(operations))
    body = "".join("\n  " + f for f in filters)
    return "(%s %s%s)" % (action, " ".join(operations), body)


def generate_sandbox_profile(
    workspace: str,
    allow_read: Sequence[str] = (),
    allow_write: Sequence[str] = (),
    broker_port: int = DEFAULT_BROKER_PORT,
    broker_socket: Optional[str] = None,
    python: str = sys.executable,
) -> str:
    """The seatbelt profile (SBPL text) for running ``python`` in ``workspace``, reaching only the broker.

    ``allow_read``/``allow_write``: extra directories (subpaths) readable, or readable and writable.
    Raises :class:`ProfileError` for a path or port that cannot be expressed safely.
    """
    if isinstance(broker_port, bool) or not isinstance(broker_port, int) or not 0 < broker_port < 65536:
        raise ProfileError("broker port must be an integer 1-65535, not %r" % (broker_port,))
    work = path_variants(workspace)
    reads = _unique(p for d in allow_read for p in path_variants(d))
    writes = _unique(p for d in allow_write for p in path_variants(d))
    tmps = temp_dirs()
    pythons = python_paths(python)
    exe = path_variants(python)
    socket_paths = path_variants(broker_socket) if broker_socket else []

    def subpaths(paths: Iterable[str]) -> List[str]:
        return ["(subpath %s)" % sbpl_string(p) for p in paths]

    def literals(paths: Iterable[str]) -> List[str]:
        return ["(literal %s)" % sbpl_string(p) for p in paths]

    writable = _unique(work + writes + tmps)
    lines = [
        "(version 1)",
        PROFILE_MARKER + " (generated; regenerate rather than edit)",
        "(deny default)",
        "",
        ";; processes: children inherit this profile, so what they run stays confined",
        _rule("allow", ["process-fork"], []),
        _rule("allow", ["process-exec"], literals(exe) + subpaths(_unique(pythons + list(SYSTEM_EXEC) + work + reads + writes))),
        _rule("allow", ["process-info*"], ["(target same-sandbox)"]),
        _rule("allow", ["signal"], ["(target same-sandbox)"]),
        ";; read-only facts Python asks for (os.cpu_count, platform, time zone, user name)",
        _rule("allow", ["sysctl-read"], []),
        _rule("allow", ["mach-lookup"], ["(global-name %s)" % sbpl_string(name) for name in MACH_SERVICES]),
        ";; multiprocessing: named semaphores (SemLock) and shared_memory",
        _rule("allow", ["ipc-posix-sem"], []),
        _rule("allow", ["ipc-posix-shm"], []),
        "",
        ";; files: metadata everywhere (path lookups, realpath); contents where listed",
        _rule("allow", ["file-read-metadata"], []),
        _rule("allow", ["file-read*"], subpaths(_unique(list(SYSTEM_READ) + pythons + reads)) + literals(SYSTEM_READ_FILES)),
        _rule("allow", ["file-read*", "file-write-data", "file-ioctl"], literals(DEVICES)),
        _rule("allow", ["file-read*", "file-write*"], subpaths(writable)),
        "",
        ";; network: the broker only",
        _rule("allow", ["network-outbound"], ['(remote ip "localhost:%d")' % broker_port]),
    ]
    if socket_paths:
        lines += [
            ";; the broker's Unix socket: connect, look up, write (not unlink or replace)",
            _rule("allow", ["network-outbound"], ["(remote unix-socket (path-literal %s))" % sbpl_string(p) for p in socket_paths]),
            _rule("allow", ["file-read*"], literals(socket_paths)),
            _rule("allow", ["file-write-data"], literals(socket_paths)),
        ]
    # Unix sockets of the program's own (multiprocessing managers, language servers) in the
    # workspace and the extra writable folders; one rule per directory, since several paths
    # inside one unix-socket filter would all have to match. Not the temporary folders: other
    # programs of the user (ssh-agent under /private/tmp) listen there.
    own = _unique(work + writes)
    lines += [";; the program's own Unix sockets, in the workspace and --allow-write folders only"]
    lines.append(_rule("allow", ["system-socket"], ["(socket-domain AF_UNIX)"]))
    for path in own:
        lines.append(_rule("allow", ["network-bind"], ["(local unix-socket (subpath %s))" % sbpl_string(path)]))
        lines.append(_rule("allow", ["network-outbound"], ["(remote unix-socket (subpath %s))" % sbpl_string(path)]))
    return "\n".join(lines) + "\n"


def cli_profile(argv: List[str]) -> int:
    """``agenshield-shim sandbox-profile``: print the profile (write it to a file with ``>``)."""
    from ..cli_args import Parser, check_directory, first_problem, port

    parser = Parser(
        prog="agenshield-shim sandbox-profile",
        description="Print a macOS seatbelt profile for sandbox-exec: deny by default, the broker only.",
    )
    parser.add_argument("--workspace", required=True, metavar="DIR", help="read-write working directory (must exist)")
    parser.add_argument("--allow-read", action="append", default=[], metavar="DIR",
                        help="extra readable directory (repeatable; default: none)")
    parser.add_argument("--allow-write", action="append", default=[], metavar="DIR",
                        help="extra writable directory (repeatable; default: none)")
    parser.add_argument("--broker-port", type=port, default=DEFAULT_BROKER_PORT, metavar="P",
                        help="the broker's TCP port on localhost, the only one the profile opens")
    parser.add_argument("--broker-socket", metavar="PATH", help="the broker's Unix socket, if it has one (default: none)")
    parser.add_argument("--python", default=sys.executable, metavar="PATH", help="interpreter to allow")
    args = parser.parse_args(argv)
    problem = first_problem(check_directory("--workspace", args.workspace),
                            *(check_directory("--allow-read", d) for d in args.allow_read),
                            *(check_directory("--allow-write", d) for d in args.allow_write))
    if problem:
        sys.stderr.write("agenshield-shim sandbox-profile: %s\n" % problem)
        return 2
    try:
        text = generate_sandbox_profile(args.workspace, args.allow_read, args.allow_write,
                                        args.broker_port, args.broker_socket, args.python)
    except ProfileError as exc:
        sys.stderr.write("agenshield-shim sandbox-profile: %s\n" % exc)
        return 2
    sys.stdout.write(text)
    return 0
