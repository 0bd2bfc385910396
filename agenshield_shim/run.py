"""``agenshield-shim run [--allow HOST[:PORT] ...] [--policy FILE] [--audit FILE] [--sandbox none|netns|auto] -- COMMAND ...``

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
5. Say what the started broker refused, one sentence per destination with its reason and the
   ``--allow`` that would let it through, as the last lines of the output. The broker's audit goes
   to ``--audit FILE`` (or a temporary file), never to the terminal: raw JSON lines in the middle
   of COMMAND's output bury what matters (see ``agenshield-shim audit`` to read such a file).

Bad input (a missing program, a policy or ``--allow`` the broker would refuse, a malformed
``AGENSHIELD_*`` variable in the environment COMMAND would inherit) is refused before anything
starts: one line naming it, exit status 2.
"""

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional, Tuple

from .authority import authority, bracketed
from .cli_args import POLICY_EPILOG, Parser, check_input_file, check_output_file, shown
from ._config import (
    DEFAULT_BROKER_HOST, DEFAULT_BROKER_PORT, ENV_BROKER_HOST, ENV_BROKER_PORT, ENV_BROKER_SOCKET, ShimConfigError,
    _parse_host, _parse_port, load,
)

PROG = "agenshield-shim run"
SANDBOXES = ("none", "netns", "auto")
FORWARDED = ("SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH", "SIGCONT")
_PYTHON_NAME = re.compile(r"^python(\d+(\.\d+)?)?$")
_LOOPBACK = ("localhost", "127.0.0.1", "::1")
#: Read by the rpc transport (``_rpc.trace_context``), which drops a malformed value silently.
ENV_TRACE_ID = "AGENSHIELD_TRACE_ID"
ENV_DEPTH = "AGENSHIELD_DEPTH"
#: At most this many refusals are spelled out after COMMAND; the rest are counted.
SHOWN_REFUSALS = 5


class RunError(Exception):
    """run cannot start COMMAND as asked; the message says why."""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description="Run COMMAND with the shim active, through the configured broker (AGENSHIELD_BROKER_HOST/"
                    "_PORT, default localhost:6969) if it answers, else through a reference broker started for "
                    "its lifetime. Exits with COMMAND's status; what the broker refused is summarised at the end.",
        usage="%(prog)s [--allow HOST[:PORT] ...] [--policy FILE] [--audit FILE] [--sandbox none|netns|auto] "
              "-- COMMAND ...",
        epilog=POLICY_EPILOG,
    )
    parser.add_argument("--allow", action="append", default=[], metavar="HOST[:PORT]",
                        help="allow a destination in the broker run starts, after the policy's rules (repeatable; "
                             "default: none, so only loopback is allowed)")
    parser.add_argument("--policy", metavar="FILE",
                        help="TOML policy file for the broker run starts, format in docs/policy.md (default: none)")
    parser.add_argument("--sandbox", choices=SANDBOXES, default="none",
                        help="none: the in-process guard only; netns: also a Linux network namespace (stops native "
                             "code and non-Python children); auto: netns where it can be created")
    parser.add_argument("--audit", metavar="FILE",
                        help="append the started broker's audit log (JSON lines) to FILE; read it with "
                             "'agenshield-shim audit FILE' (default: a temporary file, summarised at the end)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments, after --")
    return parser


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --, e.g. %s -- python agent.py" % PROG)
    args.command = command
    problem = (check_input_file("--policy", args.policy) or check_output_file("--audit", args.audit)
               or _program_problem(command[0]) or _policy_problem(args.policy, args.allow))
    if problem:
        parser.error(problem)
    return args


def _program_problem(program: str) -> Optional[str]:
    """Why COMMAND cannot be started, before a broker is started for it; None if it can."""
    if shutil.which(program) is not None:
        return None
    program = shown(program)
    if os.sep in program:
        if os.path.isdir(program):
            return "%s: is a directory, not a program; give the program to run after --" % program
        if os.path.exists(program):
            return "%s: not executable; make it executable (chmod +x) or run it with its interpreter" % program
        return "%s: no such program; check the path" % program
    return "%s: no such program in PATH; give its path or install it" % program


def _policy_problem(policy: Optional[str], allow: List[str]) -> Optional[str]:
    """The broker's own verdict on --policy/--allow, so a bad rule is one line here, not a dead broker."""
    if policy is None and not allow:
        return None
    try:
        from .broker.policy import PolicyError, build_policy
    except ImportError:  # no broker code here: the broker's own start reports it
        return None
    try:
        build_policy(policy, allow)
    except PolicyError as exc:
        return str(exc)
    except ImportError as exc:  # tomli on Python < 3.11
        return "--policy %s: cannot read TOML here (%s); install it with: pip install \"agenshield-shim[broker]\"" % (
            policy, exc)
    return None


def environment_problem(env: Dict[str, str]) -> Optional[str]:
    """A malformed ``AGENSHIELD_*`` variable COMMAND would inherit, as one line; None if all are sound.

    The shim would refuse every connection of COMMAND over it (fail closed); saying so before
    COMMAND starts is kinder. ``AGENSHIELD_DEPTH``/``_TRACE_ID`` are read by the rpc transport,
    which leaves a malformed depth out of its calls silently: checked here too.
    """
    try:
        load(env)
    except ShimConfigError as exc:
        return "%s; fix or unset it" % exc
    depth = env.get(ENV_DEPTH)
    if depth is not None and depth.strip() and not (depth.strip().isdigit() and depth.strip().isascii()):
        return ("%s=%r is not a depth; use a whole number (0 for a top-level agent, 1 for its sub-agent, ...) "
                "or unset it" % (ENV_DEPTH, depth))
    trace = env.get(ENV_TRACE_ID)
    if trace is not None and not all(ch.isprintable() for ch in trace):
        return "%s=%r holds control characters; use printable text (an id such as a UUID) or unset it" % (
            ENV_TRACE_ID, trace)
    return None


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
    """The broker COMMAND uses: a running one, or one started here (``process`` and ``audit`` set).

    ``audit_offset`` is where this run's lines start in the audit file (``--audit`` appends).
    """

    def __init__(self, host: str, port: int, socket_path: Optional[str], process: Any = None,
                 audit: Optional[str] = None, audit_offset: int = 0) -> None:
        self.host = host
        self.port = port
        self.socket_path = socket_path
        self.process = process
        self.audit = audit
        self.audit_offset = audit_offset

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def start_broker(port: int, allow: List[str], policy: Optional[str], audit: str, unix: Optional[str],
                 log: str) -> Broker:
    """The reference broker as a subprocess, shim off, on ``port`` if free else on a free port.

    Its audit goes to ``audit``, its stderr to the file ``log``: nothing of it reaches the terminal
    unless it fails to start, and then its own last words are the message.
    """
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
    args += ["--audit", audit]
    if unix:
        args += ["--unix", unix]
    env = dict(os.environ)
    env["AGENSHIELD_ENABLED"] = "false"
    offset = os.path.getsize(audit) if os.path.isfile(audit) else 0
    try:
        with open(log, "ab") as log_file:
            process = BrokerProcess(args, env=env, stderr=log_file)
    except (RuntimeError, OSError) as exc:
        said = _last_line(log)
        raise RunError("the reference broker did not start: %s" % (said or exc)) from None
    return Broker("localhost", process.port, unix, process, audit, offset)


def _last_line(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = [line.strip() for line in handle if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


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
    audit = args.audit or os.path.join(work, "audit.jsonl")
    broker = start_broker(port, args.allow, args.policy, audit, unix, os.path.join(work, "broker.log"))
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
    from ._boot import NO_PROXY_VARIABLES, proxy_environment

    env = {k: v for k, v in os.environ.items() if k != "AGENSHIELD_ENABLED" and k not in NO_PROXY_VARIABLES}
    env[ENV_BROKER_HOST] = broker.host
    env[ENV_BROKER_PORT] = str(broker.port)
    env.update(proxy_environment(authority(broker.host, broker.port)))
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


def refusal_lines(broker: Broker, user_audit: Optional[str], default_policy: bool = False) -> List[str]:
    """One sentence per destination the started broker refused: its reason and the ``--allow`` for it.

    ``default_policy``: the broker ran without --policy/--allow (loopback only), which the
    sentence says, since a newcomer does not know that default.
    """
    if broker.audit is None:
        return []
    from .audit_report import reason_of, split_target

    try:
        with open(broker.audit, "rb") as handle:
            handle.seek(broker.audit_offset)
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return []
    refused: Dict[str, Tuple[Optional[str], Optional[str], int]] = {}
    loopback: List[str] = []  # hosts the loopback default let through: --allow would shut them out
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("target"), str):
            continue
        policy_id = entry.get("policyId")
        host, port = split_target(entry["target"])
        if entry.get("allowed") is not False:
            if policy_id == "default-loopback" and host is not None and host not in loopback:
                loopback.append(host)
            continue
        if host is None:
            continue
        spec = authority(host, port)
        reason, rule, count = refused.get(spec, (None, None, 0))
        refused[spec] = (reason or reason_of(entry), rule or (policy_id if isinstance(policy_id, str) else None),
                         count + 1)
    lines: List[str] = []
    allowable = []
    for spec, (reason, rule, count) in refused.items():
        if rule is None:
            allowable.append(spec)
        if len(lines) == SHOWN_REFUSALS:
            continue
        times = "" if count == 1 else " (%d times)" % count
        if rule is not None:
            lines.append("the broker refused %s%s by deny rule '%s' of the policy: %s; --allow cannot override a "
                         "deny rule: change the policy" % (spec, times, rule, reason or "no reason given"))
        else:
            why = reason or "not allowed by the policy"
            if default_policy:
                why += " (the default policy allows loopback only)"
            lines.append("the broker refused %s%s: %s" % (spec, times, why))
    if len(refused) > SHOWN_REFUSALS:
        where = ("agenshield-shim audit %s" % shlex.quote(user_audit)) if user_audit else \
            "run with --audit FILE, then: agenshield-shim audit FILE"
        lines.append("and %d more destinations; to see them all: %s" % (len(refused) - SHOWN_REFUSALS, where))
    if allowable:
        flags = " ".join("--allow %s" % shlex.quote(spec) for spec in allowable)
        if default_policy:  # --allow replaces the loopback default: keep what COMMAND reached through it
            flags += "".join(" --allow %s" % shlex.quote(bracketed(h)) for h in loopback)
        lines.append("to let %s through, run again with %s" % ("it" if len(allowable) == 1 else "them", flags))
    return lines


def cli_run(argv: List[str]) -> int:
    args = parse_args(argv)
    try:
        host, port = configured_broker()
    except ShimConfigError as exc:
        print("%s: %s; fix or unset it" % (PROG, exc), file=sys.stderr)
        return 2
    problem = environment_problem({k: v for k, v in os.environ.items() if k != "AGENSHIELD_ENABLED"})
    if problem:
        print("%s: %s" % (PROG, problem), file=sys.stderr)
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
                for line in refusal_lines(broker, args.audit, not (args.policy or args.allow)):
                    _info(line)
