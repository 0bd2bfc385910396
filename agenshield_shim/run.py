"""``agenshield-shim run [--allow HOST[:PORT] ...] [--policy FILE] [--sandbox none|netns|auto] -- COMMAND ...``

The main job in one line, in the style of ``opentelemetry-instrument`` or ``ddtrace-run``:

1. If the configured broker (``AGENSHIELD_BROKER_HOST``/``_PORT``, default ``localhost:6969``) answers
   ``GET /health``, use it (``--allow``/``--policy`` then do not apply: that broker has its own policy,
   and run says so). Otherwise start the reference broker for the command's lifetime, as a
   subprocess with ``AGENSHIELD_ENABLED=false`` (it is the one process that must reach the network),
   with the given policy, on the configured port if it is free, else on a free one.
2. Run COMMAND with the shim's configuration in its environment (``AGENSHIELD_BROKER_PORT`` ...;
   ``AGENSHIELD_ENABLED`` removed, so the shim is on). The shim itself must be installed in COMMAND's
   Python (``agenshield-shim install --python PATH``): run checks when COMMAND is a Python or a
   Python script, and warns when it is not guarded. It does not inject the shim through
   ``PYTHONPATH``: a guard that a child can shed by clearing one variable is no guard.
3. With ``--sandbox netns`` COMMAND runs in a network namespace whose only way out is the broker's
   Unix socket (:mod:`agenshield_shim.sandbox.netns`); that also stops native code and non-Python
   children. ``auto`` uses it where it can be created, else none.
4. Forward signals to COMMAND (SIGINT only when stdin is not a terminal: a terminal's Ctrl-C already
   reaches COMMAND, which is in the same process group), exit with its status (128+N when it died
   of signal N), stop the broker.
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional, Tuple

from ._config import (
    DEFAULT_BROKER_HOST, DEFAULT_BROKER_PORT, ENV_BROKER_HOST, ENV_BROKER_PORT, ENV_BROKER_SOCKET, ShimConfigError,
    _parse_host, _parse_port,
)

PROG = "agenshield-shim run"
SANDBOXES = ("none", "netns", "auto")
FORWARDED = ("SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH", "SIGCONT")
_PYTHON_NAME = re.compile(r"^python(\d+(\.\d+)?)?$")
_LOOPBACK = ("localhost", "127.0.0.1", "::1")


class RunError(Exception):
    """run cannot start COMMAND as asked; the message says why."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run COMMAND with the shim active, through the configured broker or a reference broker "
                    "started for its lifetime.",
        usage="%(prog)s [--allow HOST[:PORT] ...] [--policy FILE] [--sandbox none|netns|auto] -- COMMAND ...",
    )
    parser.add_argument("--allow", action="append", default=[], metavar="HOST[:PORT]",
                        help="allow a destination in the broker run starts (repeatable)")
    parser.add_argument("--policy", metavar="FILE", help="TOML policy file for the broker run starts")
    parser.add_argument("--sandbox", choices=SANDBOXES, default="none",
                        help="none (in-process guard only, default), netns (Linux network namespace), auto")
    parser.add_argument("--audit", metavar="FILE", help="the started broker's audit log (default: its stderr)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    return parser


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    args.command = command
    if args.policy is not None and not os.path.isfile(args.policy):
        parser.error("--policy %s: no such file" % args.policy)
    return args


def configured_broker(environ: Optional[Dict[str, str]] = None) -> Tuple[str, int]:
    """The broker the shim would use, from the environment (strict, like the shim)."""
    env = os.environ if environ is None else environ
    host = _parse_host(env.get(ENV_BROKER_HOST, DEFAULT_BROKER_HOST), ENV_BROKER_HOST)
    port = _parse_port(env.get(ENV_BROKER_PORT, str(DEFAULT_BROKER_PORT)), ENV_BROKER_PORT)
    return host, port


def _port_free(port: int) -> bool:
    import socket

    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        probe.close()


class Broker:
    """The broker COMMAND uses: a running one, or one started here (``process`` set)."""

    def __init__(self, host: str, port: int, socket_path: Optional[str], process: Any = None) -> None:
        self.host = host
        self.port = port
        self.socket_path = socket_path
        self.process = process

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def start_broker(port: int, allow: List[str], policy: Optional[str], audit: Optional[str],
                 unix: Optional[str]) -> Broker:
    """The reference broker as a subprocess, shim off, on ``port`` if free else on a free port."""
    try:
        from .broker.runner import BrokerProcess
    except ImportError as exc:
        raise RunError('no broker is running and the reference broker cannot start (%s); install it with: '
                       'pip install "agenshield-shim[broker]", or start the AgenShield broker' % exc) from None
    chosen = port if _port_free(port) else 0
    args = ["--host", "127.0.0.1", "--port", str(chosen)]
    for item in allow:
        args += ["--allow", item]
    if policy:
        args += ["--policy", policy]
    if audit:
        args += ["--audit", audit]
    if unix:
        args += ["--unix", unix]
    env = dict(os.environ)
    env["AGENSHIELD_ENABLED"] = "false"
    try:
        process = BrokerProcess(args, env=env, stderr=_stderr_fd())
    except (RuntimeError, OSError) as exc:
        raise RunError("the reference broker did not start: %s" % exc) from None
    return Broker("localhost", process.port, unix, process)


def _stderr_fd() -> Any:
    """The broker's stderr (its audit lines, unless --audit): ours, or nowhere when ours is no file."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return subprocess.DEVNULL


def ensure_broker(args: argparse.Namespace, host: str, port: int, need_socket: bool, work: str) -> Broker:
    from .selftest import broker_health

    ok, why = broker_health(host, port)
    if ok:
        if args.allow or args.policy:
            _warn("using the broker already running at %s:%d; --allow/--policy apply only to a broker run starts"
                  % (host, port))
        socket_path = os.environ.get(ENV_BROKER_SOCKET) or None
        if need_socket and not socket_path:
            raise RunError("--sandbox netns reaches the broker through its Unix socket: set %s for the broker "
                           "running at %s:%d, or stop it and let run start one" % (ENV_BROKER_SOCKET, host, port))
        warning = tunnel_warning(host, port)
        if warning:
            _warn(warning)
        return Broker(host, port, socket_path)
    if host not in _LOOPBACK:
        raise RunError("the configured broker at %s:%d does not answer (%s), and run starts brokers only on "
                       "loopback" % (host, port, why))
    unix = os.path.join(work, "broker.sock") if need_socket else None
    broker = start_broker(port, args.allow, args.policy, args.audit, unix)
    where = "" if broker.port == port else " (port %d was busy)" % port
    _info("started the reference broker on localhost:%d%s for this command" % (broker.port, where))
    return broker


def tunnel_warning(host: str, port: int) -> Optional[str]:
    """The one warning for a running broker that does not tunnel (the AgenShield daemon 0.7.2), else None.

    COMMAND's proxy variables name the broker; a broker that serves only ``/rpc`` cannot carry
    what uses them, and curl or git would only say "Empty reply from server".
    """
    from . import _transport
    from ._config import Config

    choice = _transport.probe(Config(broker_host=host, broker_port=port))
    if choice is None or choice.transport == _transport.TUNNEL:
        return None
    return ("the broker at %s:%d does not tunnel (%s): programs that use the proxy variables (curl, git, uv, npm, "
            "another environment's pip) cannot reach the network through it; guarded Python libraries with a hook "
            "use rpc" % (host, port, choice.reason))


def _python_of(command: List[str]) -> Optional[str]:
    """The Python that will run COMMAND: itself, or the interpreter of its ``#!`` line; None if neither."""
    path = shutil.which(command[0])
    if path is None:
        return None
    if _PYTHON_NAME.match(os.path.basename(path)):
        return path
    try:
        with open(path, "rb") as handle:
            first = handle.readline(512).decode("utf-8", "replace").strip()
    except OSError:
        return None
    if not first.startswith("#!"):
        return None
    words = first[2:].split()
    if words and os.path.basename(words[0]) == "env" and len(words) > 1:
        words = [shutil.which(words[1]) or words[1]] + words[2:]
    if words and _PYTHON_NAME.match(os.path.basename(words[0])):
        return words[0]
    return None


def check_guarded(command: List[str], env: Dict[str, str]) -> Optional[str]:
    """A warning when COMMAND's Python would not be guarded, else None."""
    python = _python_of(command)
    if python is None:
        return ("%s is not a Python program: only Python processes whose environment has agenshield-shim "
                "installed are guarded (use --sandbox netns for everything else)" % command[0])
    code = "import sys; print('agenshield_shim._boot' in sys.modules)"
    try:
        out = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return "could not check %s: %s" % (python, exc)
    if out.stdout.strip() != "True":
        return ("%s does not have agenshield-shim installed, so COMMAND's network is NOT guarded; install it "
                "with: agenshield-shim install --python %s" % (python, python))
    return None


def child_env(broker: Broker) -> Dict[str, str]:
    """COMMAND's environment: the shim's configuration, and the proxy variables pointing at the broker.

    The proxy variables are what a guarded Python sets for itself at boot; COMMAND may be no Python
    (curl, git, npm, a shell), so run sets them too. Under ``--sandbox netns`` the same address is
    the relay's, inside the namespace.
    """
    from ._boot import NO_PROXY_VARIABLES, format_destination, proxy_environment

    env = {k: v for k, v in os.environ.items() if k != "AGENSHIELD_ENABLED" and k not in NO_PROXY_VARIABLES}
    env[ENV_BROKER_HOST] = broker.host
    env[ENV_BROKER_PORT] = str(broker.port)
    env.update(proxy_environment(format_destination(broker.host, broker.port)))
    return env


def sandboxed(command: List[str], sandbox: str, broker: Broker) -> List[str]:
    if sandbox == "none":
        return command
    from .sandbox import netns

    assert broker.socket_path is not None
    return netns.netns_command(command, broker.port, broker.socket_path)


def resolve_sandbox(sandbox: str) -> str:
    """``auto`` -> ``netns`` where a namespace can be made here, else ``none``; ``netns`` checked."""
    if sandbox == "none":
        return sandbox
    try:
        from .sandbox import netns
    except ImportError:
        if sandbox == "netns":
            raise RunError("--sandbox netns is not available in this build") from None
        return "none"
    try:
        netns.find_backend()
    except netns.NetnsUnavailable as exc:
        if sandbox == "netns":
            raise RunError(str(exc)) from None
        _info("no network namespace here (%s): running with the in-process guard only" % exc)
        return "none"
    return "netns"


def run_child(argv: List[str], env: Dict[str, str]) -> int:
    """Run, forward signals, return the exit status (128+N for death by signal N, as shells do)."""
    try:
        proc = subprocess.Popen(argv, env=env)
    except OSError as exc:
        raise RunError("cannot run %s: %s" % (argv[0], exc)) from None
    names = list(FORWARDED)
    if not (sys.stdin is not None and sys.stdin.isatty()):
        names.append("SIGINT")
    previous = {}

    def forward(signum: int, frame: Any) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    for name in names:
        number = getattr(signal, name, None)
        if number is not None:
            previous[number] = signal.signal(number, forward)
    if "SIGINT" not in names:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal told COMMAND
    try:
        status = proc.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return 128 - status if status < 0 else status


def _warn(text: str) -> None:
    print("%s: warning: %s" % (PROG, text), file=sys.stderr, flush=True)


def _info(text: str) -> None:
    print("%s: %s" % (PROG, text), file=sys.stderr, flush=True)


def cli_run(argv: List[str]) -> int:
    args = parse_args(argv)
    try:
        host, port = configured_broker()
    except ShimConfigError as exc:
        print("%s: %s" % (PROG, exc), file=sys.stderr)
        return 2
    broker: Optional[Broker] = None
    with tempfile.TemporaryDirectory(prefix="agenshield-run-") as work:
        try:
            sandbox = resolve_sandbox(args.sandbox)
            broker = ensure_broker(args, host, port, sandbox == "netns", work)
            env = child_env(broker)
            warning = check_guarded(args.command, env)
            if warning and sandbox == "none":
                _warn(warning)
            return run_child(sandboxed(args.command, sandbox, broker), env)
        except RunError as exc:
            print("%s: %s" % (PROG, exc), file=sys.stderr)
            return 2 if broker is None else 127
        finally:
            if broker is not None:
                broker.stop()
