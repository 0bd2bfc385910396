"""Linux OS layer: run a command in a new network namespace where only loopback exists.

The in-process guard cannot stop native code (ctypes, C extensions), ``python -S``, or a non-Python
child. A network namespace can: inside it there is no interface but ``lo``, so no connect() of any
program reaches anything outside. The broker stays reachable because the relay
(:mod:`agenshield_shim.sandbox.relay`, started first inside the namespace) forwards
``localhost:PORT`` to the broker's Unix socket, which is a file and so crosses namespaces.

Two ways in, picked in this order:

- ``bwrap`` (bubblewrap) ``--unshare-net``: works unprivileged where user namespaces are allowed,
  and as root;
- ``unshare --net`` (util-linux): needs root (CAP_SYS_ADMIN).

Either way the relay drops every capability before it starts the command (see
:func:`agenshield_shim.sandbox.relay.drop_privileges`): root inside ``unshare --net``, and bubblewrap
run as root, keep CAP_SYS_ADMIN, which is enough to ``setns()`` back into the host's namespace.

Only the network is isolated here: the file system, processes and Unix sockets of the host stay
visible (a Unix socket of another service, such as ``/var/run/docker.sock``, remains reachable if
its permissions let the user in).
"""

import argparse
import os
import shutil
import subprocess
import sys
from typing import Dict, List, Mapping, Optional, Sequence

#: The relay script, run by path with ``python -I -S`` inside the namespace.
RELAY_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "relay.py")
BACKENDS = ("bwrap", "unshare")

_probe_cache: Dict[str, Optional[str]] = {}


class NetnsUnavailable(RuntimeError):
    """Neither bubblewrap nor ``unshare --net`` can create a network namespace here."""


def _probe(argv: List[str]) -> Optional[str]:
    """None when ``argv`` ran and exited 0, else the reason it did not."""
    try:
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if result.returncode != 0:
        return (result.stderr.decode(errors="replace").strip() or "exit status %d" % result.returncode)
    return None


def backend_prefix(backend: str, tool: str) -> List[str]:
    """The words that put what follows them into a new network namespace."""
    if backend == "bwrap":
        # The whole file system as it is (devices included): only the network is taken away.
        # bwrap brings lo up itself. --die-with-parent: killing the wrapper kills the sandbox.
        return [tool, "--dev-bind", "/", "/", "--unshare-net", "--die-with-parent", "--"]
    if backend == "unshare":
        return [tool, "--net", "--"]
    raise ValueError("unknown network-namespace backend %r (use one of %s)" % (backend, ", ".join(BACKENDS)))


def why_unavailable(backend: str) -> Optional[str]:
    """None when ``backend`` can create a network namespace here, else why not (probed once)."""
    if backend in _probe_cache:
        return _probe_cache[backend]
    if not sys.platform.startswith("linux"):
        reason: Optional[str] = "network namespaces exist only on Linux"
    else:
        tool = shutil.which(backend)
        if tool is None:
            reason = "%s is not installed" % backend + (" (apt-get install bubblewrap)" if backend == "bwrap" else "")
        elif backend == "unshare" and os.geteuid() != 0:
            reason = "unshare --net needs root"
        else:
            true = shutil.which("true") or "/bin/true"
            failure = _probe(backend_prefix(backend, tool) + [true])
            if failure is not None:
                reason = "%s cannot create a network namespace here: %s" % (backend, failure)
            else:
                reason = None
    _probe_cache[backend] = reason
    return reason


def find_backend(preferred: Optional[str] = None) -> str:
    """The backend to use (``preferred`` if given and usable); raise :class:`NetnsUnavailable`."""
    reasons = []
    for backend in ([preferred] if preferred else list(BACKENDS)):
        reason = why_unavailable(backend)
        if reason is None:
            return backend
        reasons.append(reason)
    raise NetnsUnavailable("no way to create a network namespace: " + "; ".join(reasons))


def netns_command(
    command: Sequence[str],
    broker_port: int,
    broker_socket: str,
    python: Optional[str] = None,
    backend: Optional[str] = None,
    relay_file: str = RELAY_FILE,
) -> List[str]:
    """The argv that runs ``command`` in a new network namespace, with the relay to the broker.

    ``python`` runs the relay (any Python 3.8+, with ``-I -S``: no site, so no shim and no
    environment variables of the caller in its way); the default is this interpreter.
    """
    if not os.path.isabs(broker_socket):
        raise ValueError("the broker's Unix socket must be an absolute path: %r" % broker_socket)
    if not 0 < int(broker_port) < 65536:
        raise ValueError("not a TCP port: %r" % broker_port)
    chosen = backend or find_backend()
    tool = shutil.which(chosen) or chosen
    relay = [
        python or sys.executable, "-I", "-S", relay_file,
        "--listen", "127.0.0.1:%d" % broker_port,
        "--listen-optional", "[::1]:%d" % broker_port,
        "--unix", broker_socket,
        "--drop-caps",
    ]
    if chosen == "unshare":
        relay.append("--lo-up")  # unshare leaves lo down; bwrap has brought it up already
    return backend_prefix(chosen, tool) + relay + ["--"] + list(command)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m agenshield_shim.sandbox.netns --broker-port P --broker-socket S -- COMMAND...``."""
    parser = argparse.ArgumentParser(
        prog="python -m agenshield_shim.sandbox.netns",
        description="Run COMMAND in a network namespace where only the broker (through its Unix socket) is reachable.",
    )
    parser.add_argument("--broker-port", type=int, default=6969)
    parser.add_argument("--broker-socket", required=True, metavar="PATH")
    parser.add_argument("--backend", choices=BACKENDS)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give a command after --")
    try:
        full = netns_command(command, args.broker_port, args.broker_socket, backend=args.backend)
    except (NetnsUnavailable, ValueError) as exc:
        sys.stderr.write("agenshield-shim: %s\n" % exc)
        return 2
    os.execvpe(full[0], full, child_environment(os.environ, args.broker_port))
    return 127  # not reached


def child_environment(environ: "Mapping[str, str]", broker_port: int) -> Dict[str, str]:
    """The command's environment inside the namespace: the proxy variables name the relay.

    Programs that know nothing of the shim (curl, git, uv, npm) find the broker through them; the
    relay listens on loopback at the broker's port, so the address is the one outside.
    """
    from .._boot import NO_PROXY_VARIABLES, proxy_environment

    env = {k: v for k, v in environ.items() if k not in NO_PROXY_VARIABLES}
    env.update(proxy_environment("127.0.0.1:%d" % broker_port))
    return env


if __name__ == "__main__":
    sys.exit(main())
