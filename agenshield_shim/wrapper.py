"""Wrapper scripts: an executable that runs a Python with the broker configured, inside the OS sandbox.

``agenshield-shim wrapper --python venv/bin/python --out agent-python`` writes a POSIX sh script
that exports the ``AGENSHIELD_*`` configuration and execs the interpreter with the caller's
arguments, under

- ``seatbelt``: ``/usr/bin/sandbox-exec -f PROFILE`` (macOS), with the profile written beside the
  wrapper (``FILE.sb``);
- ``netns``: a new network namespace (Linux; bubblewrap, else ``unshare`` as root) with the relay
  to the broker's Unix socket (see :mod:`agenshield_shim.sandbox.netns`);
- ``none``: no OS sandbox, the in-process guard only;
- ``auto``: seatbelt on macOS, netns on Linux when it can be created here and a broker socket is
  given, else none (with a warning on stderr: ask for ``netns``/``seatbelt`` explicitly to make a
  missing sandbox an error).

Everything that varies is decided when the script is written (absolute paths to the tools, the
profile), so running it depends on nothing in ``PATH``. Every word is quoted with
:func:`shlex.quote`. The second line is a marker; ``restore`` removes only files that carry it.
"""

import os
import re
import shlex
import subprocess
import sys
import tempfile
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from . import __version__
from ._boot import NO_PROXY_VARIABLES, PROXY_VARIABLES, proxy_environment
from .authority import authority
from .cli_args import Parser, check_directory, first_problem, port as _port_type
from ._config import (
    DEFAULT_BROKER_HOST,
    DEFAULT_BROKER_PORT,
    ENV_BROKER_HOST,
    ENV_BROKER_PORT,
    ENV_BROKER_SOCKET,
)
from .sandbox import netns, seatbelt

MARKER = "# agenshield-shim wrapper: generated, do not edit (remove with: agenshield-shim restore --out THIS_FILE)"
SANDBOXES = ("auto", "none", "seatbelt", "netns")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RESERVED = (ENV_BROKER_HOST, ENV_BROKER_PORT, ENV_BROKER_SOCKET)
_LOOPBACK = ("localhost", "127.0.0.1", "::1")


class WrapperError(ValueError):
    """The wrapper cannot be written as asked (and nothing was written)."""


def profile_path(out: str) -> str:
    """Where the seatbelt profile of the wrapper at ``out`` lives: beside it."""
    return out + ".sb"


def is_wrapper(path: str) -> bool:
    """True if ``path`` is a script this module wrote (its second line is the marker)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096).split(b"\n")
    except OSError:
        return False
    return len(head) >= 2 and head[0] == b"#!/bin/sh" and head[1] == MARKER.encode()


def _is_profile(path: str) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096).split(b"\n")
    except OSError:
        return False
    return len(head) >= 2 and head[1].startswith(seatbelt.PROFILE_MARKER.encode())


def choose_sandbox(sandbox: str, broker_socket: Optional[str]) -> Tuple[str, str]:
    """(sandbox, why) for ``auto``; an explicit choice is returned as is (checked later)."""
    if sandbox != "auto":
        return sandbox, "asked for"
    if sys.platform == "darwin":
        if os.path.exists(seatbelt.SANDBOX_EXEC):
            return "seatbelt", "auto: macOS"
        return "none", "auto: %s is missing" % seatbelt.SANDBOX_EXEC
    if sys.platform.startswith("linux"):
        if not broker_socket:
            return "none", "auto: netns needs the broker's Unix socket (--broker-socket)"
        try:
            netns.find_backend()
        except netns.NetnsUnavailable as exc:
            return "none", "auto: %s" % exc
        return "netns", "auto: Linux"
    return "none", "auto: no OS sandbox for %s" % sys.platform


def _relay_file(python: str) -> str:
    """The relay script, preferably the target environment's own copy (it outlives this installation).

    Found by asking the target interpreter where the package is, without importing it
    (``find_spec`` of a top-level package only locates it).
    """
    code = ("import importlib.util as u; s = u.find_spec('agenshield_shim'); "
            "print(list(s.submodule_search_locations)[0] if s and s.submodule_search_locations else '')")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "AGENSHIELD_"))}
    env["AGENSHIELD_ENABLED"] = "false"
    try:
        out = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, timeout=60, env=env).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    candidate = os.path.join(out, "sandbox", "relay.py") if out else ""
    return candidate if candidate and os.path.isfile(candidate) else netns.RELAY_FILE


def _parse_env(items: Sequence[str]) -> Dict[str, str]:
    env: Dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not _NAME.match(name):
            raise WrapperError("--env %r: write NAME=VALUE with NAME a shell variable name (e.g. --env HOME=/tmp)" % item)
        env[name] = value
    return env


def generate_python_wrapper(
    python: str,
    out: str,
    sandbox: str = "auto",
    env: Optional[Mapping[str, str]] = None,
    broker_host: Optional[str] = None,
    broker_port: int = DEFAULT_BROKER_PORT,
    broker_socket: Optional[str] = None,
    workspace: Optional[str] = None,
    allow_read: Sequence[str] = (),
    allow_write: Sequence[str] = (),
    netns_backend: Optional[str] = None,
) -> str:
    """Write the wrapper script at ``out`` (mode 0755) and return its text.

    ``workspace``/``allow_read``/``allow_write`` shape the seatbelt profile (workspace default: the
    current directory). ``netns_backend`` forces ``bwrap`` or ``unshare``. An existing file at
    ``out`` is replaced only if it is a wrapper written here. Raises :class:`WrapperError`.
    """
    if sandbox not in SANDBOXES:
        raise WrapperError("--sandbox %r: use one of %s" % (sandbox, ", ".join(SANDBOXES)))
    python = os.path.abspath(python)
    out = os.path.abspath(out)
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise WrapperError("--python %s: not an executable file; give the path of a Python interpreter "
                           "(e.g. venv/bin/python)" % python)
    if os.path.realpath(out) == os.path.realpath(python):
        raise WrapperError("--out %s is the interpreter itself; the wrapper would run itself" % out)
    out_dir = os.path.dirname(out)
    if not os.path.isdir(out_dir):
        raise WrapperError("--out %s: directory %s does not exist; create it first or choose another path"
                           % (out, out_dir))
    if os.path.isdir(out):
        raise WrapperError("--out %s: is a directory; give the path of the script to write" % out)
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise WrapperError("--out %s: directory %s is not writable; choose another path" % (out, out_dir))
    if os.path.lexists(out) and not is_wrapper(out):
        raise WrapperError("%s exists and is not a wrapper written by agenshield-shim; refusing to replace it" % out)
    if isinstance(broker_port, bool) or not isinstance(broker_port, int) or not 0 < broker_port < 65536:
        raise WrapperError("broker port must be 1-65535, not %r" % (broker_port,))
    if broker_socket is not None and ("\x00" in broker_socket or not os.path.isabs(broker_socket)):
        raise WrapperError("--broker-socket must be an absolute path: %r" % broker_socket)
    extra = dict(env or {})
    for name in extra:
        if not _NAME.match(name):
            raise WrapperError("environment name %r is not a shell variable name" % name)
        if name in _RESERVED:
            raise WrapperError("set %s with its own option (--broker-host/--broker-port/--broker-socket)" % name)
        if name in PROXY_VARIABLES or name in NO_PROXY_VARIABLES:
            raise WrapperError("%s is the wrapper's: the proxy variables point at the broker, and NO_PROXY is "
                               "removed (a child would connect directly to what it lists)" % name)
        if "\x00" in extra[name]:
            raise WrapperError("environment value of %s contains NUL" % name)

    chosen, why = choose_sandbox(sandbox, broker_socket)
    if why.startswith("auto") and chosen == "none":
        sys.stderr.write("agenshield-shim wrapper: no OS sandbox (%s); only the in-process guard applies\n" % why[6:])
    host = broker_host
    if host is None:
        # Under seatbelt, resolving "localhost" would need mDNSResponder, which the profile does not
        # open (DNS is a channel out); the address needs no resolver.
        host = "127.0.0.1" if chosen == "seatbelt" else DEFAULT_BROKER_HOST
    if chosen in ("netns", "seatbelt") and host.strip("[]").lower() not in _LOOPBACK:
        raise WrapperError("--sandbox %s: the broker must be on loopback (localhost), not %r" % (chosen, host))

    exec_words: List[str]
    profile_text: Optional[str] = None
    if chosen == "none":
        exec_words = [python]
    elif chosen == "seatbelt":
        if sys.platform != "darwin":
            sys.stderr.write("agenshield-shim wrapper: writing a seatbelt wrapper on %s; it runs only on macOS\n" % sys.platform)
        try:
            profile_text = seatbelt.generate_sandbox_profile(
                workspace or os.getcwd(), allow_read, allow_write, broker_port, broker_socket, python)
        except seatbelt.ProfileError as exc:
            raise WrapperError(str(exc)) from None
        exec_words = [seatbelt.SANDBOX_EXEC, "-f", profile_path(out), python]
    else:  # netns
        if not broker_socket:
            raise WrapperError("--sandbox netns needs the broker's Unix socket (--broker-socket PATH): "
                               "a TCP broker outside the namespace is unreachable from inside it")
        try:
            backend = netns.find_backend(netns_backend)
            exec_words = netns.netns_command([python], broker_port, broker_socket, python=python,
                                             backend=backend, relay_file=_relay_file(python))
        except (netns.NetnsUnavailable, ValueError) as exc:
            raise WrapperError(str(exc)) from None

    variables = [(ENV_BROKER_HOST, host), (ENV_BROKER_PORT, str(broker_port))]
    if broker_socket:
        variables.append((ENV_BROKER_SOCKET, broker_socket))
    variables += sorted(extra.items())
    # What the guarded Python sets for itself at boot, written here too, so that the script says
    # what its children get (inside the namespace, the address is the relay's).
    variables += sorted(proxy_environment(authority(host, broker_port)).items())
    lines = [
        "#!/bin/sh",
        MARKER,
        "# agenshield-shim %s; sandbox: %s (%s)" % (__version__, chosen, _one_line(why)),
        "# python: %s" % _one_line(python),
    ]
    lines += ["%s=%s; export %s" % (name, shlex.quote(value), name) for name, value in variables]
    lines.append("unset " + " ".join(NO_PROXY_VARIABLES))
    lines.append("exec " + " ".join(shlex.quote(w) for w in exec_words) + ' "$@"')
    text = "\n".join(lines) + "\n"

    try:
        if profile_text is not None:
            _write_atomic(profile_path(out), profile_text, 0o644)
        _write_atomic(out, text, 0o755)
    except OSError as exc:
        raise WrapperError("--out %s: cannot write it: %s; choose another path" % (out, exc.strerror or exc)) from None
    return text


def _one_line(text: str) -> str:
    """For comments in the script: a newline there would end the comment and start a command."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _write_atomic(path: str, text: str, mode: int) -> None:
    """Write beside the target and rename: a half-written wrapper must never be executable."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".agenshield-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def restore_wrapper(out: str) -> List[str]:
    """Remove the wrapper at ``out`` (and its profile); return what was removed.

    Refuses (:class:`WrapperError`) a file without the marker: this must never delete a real
    interpreter or someone's script that happens to sit at that path.
    """
    out = os.path.abspath(out)
    if not os.path.lexists(out):
        raise WrapperError("--out %s: no such file; give the path of a wrapper written by agenshield-shim wrapper" % out)
    if os.path.islink(out) or not is_wrapper(out):
        raise WrapperError("%s was not written by agenshield-shim wrapper; leaving it alone" % out)
    removed = []
    profile = profile_path(out)
    if os.path.isfile(profile) and not os.path.islink(profile) and _is_profile(profile):
        os.unlink(profile)
        removed.append(profile)
    os.unlink(out)
    removed.insert(0, out)
    return removed


def cli_wrapper(argv: List[str]) -> int:
    parser = Parser(
        prog="agenshield-shim wrapper",
        description="Write a wrapper script that runs PYTHON with the broker configured, in an OS sandbox.",
    )
    parser.add_argument("--python", required=True, metavar="PATH", help="the interpreter to wrap")
    parser.add_argument("--out", required=True, metavar="FILE", help="where to write the wrapper")
    parser.add_argument("--sandbox", choices=SANDBOXES, default="auto",
                        help="auto: seatbelt on macOS, netns on Linux with --broker-socket, else none; none: the "
                             "in-process guard only")
    parser.add_argument("--env", action="append", default=[], metavar="K=V",
                        help="extra environment variable the wrapper exports (repeatable; default: none)")
    parser.add_argument("--broker-host", metavar="H", help="the broker's host (default: localhost; 127.0.0.1 under seatbelt)")
    parser.add_argument("--broker-port", type=_port_type, default=DEFAULT_BROKER_PORT, metavar="P",
                        help="the broker's TCP port")
    parser.add_argument("--broker-socket", metavar="PATH",
                        help="the broker's Unix socket, needed for netns (default: none)")
    parser.add_argument("--netns-backend", choices=netns.BACKENDS,
                        help="force bubblewrap or unshare (default: bwrap if it works here, else unshare)")
    parser.add_argument("--workspace", metavar="DIR", help="seatbelt: read-write directory (default: the current one)")
    parser.add_argument("--allow-read", action="append", default=[], metavar="DIR",
                        help="seatbelt: extra readable directory (repeatable; default: none)")
    parser.add_argument("--allow-write", action="append", default=[], metavar="DIR",
                        help="seatbelt: extra writable directory (repeatable; default: none)")
    args = parser.parse_args(argv)
    problem = first_problem(check_directory("--workspace", args.workspace),
                            *(check_directory("--allow-read", d) for d in args.allow_read),
                            *(check_directory("--allow-write", d) for d in args.allow_write))
    if problem:
        sys.stderr.write("agenshield-shim wrapper: %s\n" % problem)
        return 2
    try:
        text = generate_python_wrapper(
            args.python, args.out, args.sandbox, _parse_env(args.env), args.broker_host, args.broker_port,
            args.broker_socket, args.workspace, args.allow_read, args.allow_write, args.netns_backend,
        )
    except WrapperError as exc:
        sys.stderr.write("agenshield-shim wrapper: %s\n" % exc)
        return 2
    chosen = text.split("\n")[2].split("sandbox: ", 1)[1].split(" ", 1)[0]
    sys.stdout.write("wrote %s (sandbox: %s)\n" % (os.path.abspath(args.out), chosen))
    return 0


def cli_restore(argv: List[str]) -> int:
    parser = Parser(
        prog="agenshield-shim restore",
        description="Remove a wrapper script written by 'agenshield-shim wrapper' (and its seatbelt profile).",
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="the wrapper to remove")
    args = parser.parse_args(argv)
    try:
        removed = restore_wrapper(args.out)
    except WrapperError as exc:
        sys.stderr.write("agenshield-shim restore: %s\n" % exc)
        return 2
    for path in removed:
        sys.stdout.write("removed %s\n" % path)
    return 0
