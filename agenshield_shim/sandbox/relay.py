"""The process that starts first inside the network namespace: relay to the broker, then the command.

Inside a fresh network namespace only loopback exists, so the broker's TCP port outside is out of
reach; its Unix socket is not (a pathname socket is found through the file system, whatever the
namespace). This program:

1. brings ``lo`` up (``--lo-up``; ``unshare --net`` leaves it down, bubblewrap brings it up itself);
2. listens on ``127.0.0.1:PORT`` (and, where the kernel has IPv6, ``[::1]:PORT``), so the shim
   inside finds the broker at ``localhost:PORT`` exactly as outside;
3. drops every capability from the bounding set and sets ``no_new_privs`` (``--drop-caps``), so a
   root command cannot ``setns()`` back into the host's network namespace, bring up an interface,
   or gain privileges through a setuid program;
4. starts the command as its child, forwards signals to it, relays each accepted connection to the
   broker's Unix socket, and exits with the command's status. The relay lives in this process, so it
   dies with the command; the command is killed (``PR_SET_PDEATHSIG``) if this process is killed.

It is run as ``python -I -S relay.py ...``: no ``site``, so no shim (the guard would have nothing to
refuse here, but a lock file or a broken installation must not stop the relay), and nothing but
the standard library, so any Python 3.8+ can run the file wherever it lies.
"""

import argparse
import ctypes
import ctypes.util
import errno
import fcntl
import os
import signal
import socket
import struct
import sys
import threading
from typing import List, Optional, Sequence, Tuple

# linux/prctl.h, linux/sockios.h, linux/if.h, linux/capability.h
PR_SET_PDEATHSIG = 1
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
_IFREQ = "16sh22x"  # struct ifreq: name[16], then the union (flags is a short); 40 bytes on Linux

_BUFSIZE = 65536


class RelayError(Exception):
    """Setting up the namespace failed; the command must not start."""


def _libc() -> "ctypes.CDLL":
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _prctl(libc: "ctypes.CDLL", option: int, arg: int) -> int:
    result = libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    return int(result)


def loopback_up() -> None:
    """``ip link set lo up`` without needing ``ip``: SIOCSIFFLAGS with IFF_UP on ``lo``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        request = struct.pack(_IFREQ, b"lo", 0)
        flags = struct.unpack(_IFREQ, fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, request))[1]
        if not flags & IFF_UP:
            fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, struct.pack(_IFREQ, b"lo", flags | IFF_UP))
    except OSError as exc:
        raise RelayError("cannot bring the loopback interface up in the namespace: %s" % exc) from None
    finally:
        sock.close()


def _status_caps(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1], 16)
    raise RelayError("/proc/self/status has no %s line" % field)


def drop_privileges() -> None:
    """Make sure the command (and everything it executes) holds no capability at all.

    A root process keeps its capabilities across ``unshare --net`` (and bubblewrap run as root
    keeps them too); with CAP_SYS_ADMIN it could ``setns()`` into ``/proc/1/ns/net`` and leave
    the sandbox. Dropping the bounding set means an exec'd program gets no capability, even as
    root; ``no_new_privs`` stops setuid programs and file capabilities from giving any back.
    """
    libc = _libc()
    for cap in range(64):
        if _prctl(libc, PR_CAPBSET_READ, cap) != 1:
            continue  # absent, or past the kernel's last capability
        _prctl(libc, PR_CAPBSET_DROP, cap)  # EPERM without CAP_SETPCAP: judged below
    _prctl(libc, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)  # EINVAL on kernels before 4.3: nothing to clear
    if _prctl(libc, PR_SET_NO_NEW_PRIVS, 1) != 0:
        raise RelayError("cannot set no_new_privs: %s" % os.strerror(ctypes.get_errno()))
    if _status_caps("CapAmb") != 0:
        raise RelayError("ambient capabilities remain; refusing to start the command")
    if _status_caps("CapBnd") != 0 and (os.geteuid() == 0 or _status_caps("CapPrm") != 0):
        # Unprivileged bubblewrap leaves a bounding set it does not let us drop; that is fine for a
        # non-root user with no permitted capability (no_new_privs: exec grants none). Root is not.
        raise RelayError("capabilities remain in the bounding set (no CAP_SETPCAP?); refusing to start the command")


def parse_address(text: str) -> Tuple[int, str, int]:
    """``127.0.0.1:6969`` or ``[::1]:6969`` -> (family, host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError("not HOST:PORT: %r" % text)
    if host.startswith("[") and host.endswith("]"):
        return socket.AF_INET6, host[1:-1], int(port)
    return socket.AF_INET, host, int(port)


def listen(address: Tuple[int, str, int], optional: bool = False) -> Optional[socket.socket]:
    family, host, port = address
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if optional and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            return None  # no IPv6 on this kernel: 127.0.0.1 alone still serves "localhost"
        raise RelayError("cannot listen on %s:%d in the namespace: %s" % (host, port, exc)) from None
    return sock


def _pump(src: socket.socket, dst: socket.socket, done: "threading.Semaphore") -> None:
    """Copy one direction until EOF, then half-close; the second pump to finish closes both."""
    try:
        while True:
            data = src.recv(_BUFSIZE)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    if not done.acquire(blocking=False):  # the other direction is already finished
        src.close()
        dst.close()


def _relay_one(client: socket.socket, unix_path: str) -> None:
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        upstream.connect(unix_path)
    except OSError as exc:
        sys.stderr.write("agenshield relay: broker socket %s: %s\n" % (unix_path, exc))
        upstream.close()
        client.close()
        return
    done = threading.Semaphore(1)
    threading.Thread(target=_pump, args=(client, upstream, done), daemon=True).start()
    threading.Thread(target=_pump, args=(upstream, client, done), daemon=True).start()


def _accept_loop(server: socket.socket, unix_path: str) -> None:
    while True:
        try:
            client, _ = server.accept()
        except OSError as exc:
            if exc.errno in (errno.EINTR, errno.ECONNABORTED, errno.EMFILE, errno.ENFILE):
                continue
            return
        _relay_one(client, unix_path)


def serve(servers: Sequence[socket.socket], unix_path: str) -> None:
    """Start one accepting (daemon) thread per listening socket."""
    for server in servers:
        threading.Thread(target=_accept_loop, args=(server, unix_path), daemon=True).start()


def _start_child(command: List[str]) -> int:
    """fork + exec with PR_SET_PDEATHSIG, before any thread exists (fork is then safe)."""
    libc = _libc()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # child
        try:
            _prctl(libc, PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:  # the supervisor died before prctl took effect
                os._exit(1)
            for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            os.execvp(command[0], command)
        except OSError as exc:
            os.write(2, ("agenshield relay: cannot run %s: %s\n" % (command[0], exc.strerror)).encode())
            os._exit(127 if exc.errno == errno.ENOENT else 126)
        finally:
            os._exit(127)
    return pid


def _forward_signals(pid: int) -> None:
    """Pass signals sent to the wrapper on to the command.

    Keyboard signals (SIGINT, SIGQUIT) from the terminal already reach the command, which is in
    the same foreground process group; forwarding them too would deliver them twice.
    """
    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    keyboard = False
    try:
        keyboard = os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        pass
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGQUIT):
        if keyboard and sig in (signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_IGN)
        else:
            signal.signal(sig, forward)


def _wait(pid: int) -> int:
    while True:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return 1
        if os.WIFEXITED(status):
            return os.WEXITSTATUS(status)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            # Die of the same signal, so the caller sees what it would have seen without us.
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(sig, signal.SIG_DFL)
            sys.stdout.flush()
            os.kill(os.getpid(), sig)
            return 128 + sig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agenshield relay",
        description="Inside a network namespace: relay loopback TCP to the broker's Unix socket, then run COMMAND.",
    )
    parser.add_argument("--listen", action="append", default=[], type=parse_address, metavar="HOST:PORT")
    parser.add_argument("--listen-optional", action="append", default=[], type=parse_address, metavar="HOST:PORT",
                        help="like --listen, skipped when the address does not exist (IPv6 disabled)")
    parser.add_argument("--unix", required=True, metavar="PATH", help="the broker's Unix socket")
    parser.add_argument("--lo-up", action="store_true", help="bring the loopback interface up first")
    parser.add_argument("--drop-caps", action="store_true", help="leave the command no capability and no_new_privs")
    parser.add_argument("--ready-file", metavar="FILE", help="written once listening (without a command)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    try:
        if args.lo_up:
            loopback_up()
        servers = [s for s in (listen(a) for a in args.listen) if s is not None]
        servers += [s for s in (listen(a, optional=True) for a in args.listen_optional) if s is not None]
        if not servers:
            raise RelayError("nothing to listen on (give --listen HOST:PORT)")
        if args.drop_caps:
            drop_privileges()
    except RelayError as exc:
        sys.stderr.write("agenshield relay: %s\n" % exc)
        return 126
    if not command:  # a relay on its own (tests, or a service manager that supervises it)
        serve(servers, args.unix)
        if args.ready_file:
            with open(args.ready_file, "w") as handle:
                handle.write("%d\n" % os.getpid())
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        threading.Event().wait()
        return 0
    pid = _start_child(command)  # before the relay threads: fork is only safe without threads
    _forward_signals(pid)
    serve(servers, args.unix)
    return _wait(pid)


if __name__ == "__main__":
    sys.exit(main())
