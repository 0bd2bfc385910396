"""``agenshield-shim broker`` / ``python -m agenshield_shim.broker``: flags -> BrokerConfig -> run.

On start it prints one line per listener on stdout, e.g.
``agenshield broker listening on http://127.0.0.1:6969`` (tools parse it; with ``--port 0`` it
carries the port picked), and writes ``--ready-file`` when set. SIGTERM and SIGINT stop it
gracefully (exit status 0). A bad flag or policy file exits with status 2 and one clear line on
stderr; a listen failure (port in use) exits with status 1.
"""

import argparse
import asyncio
import re
import signal
import sys
from typing import List, Optional

from .. import __version__
from ..cli_args import POLICY_EPILOG, Parser, check_input_file, check_output_file, first_problem
from .audit import AuditError
from .config import COMPAT_VERSIONS, LATEST_COMPAT, BrokerConfig
from .policy import PolicyError, build_policy
from .server import Broker

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.I)


def parse_size(text: str) -> int:
    """``65536``, ``64k``, ``64KiB``, ``10M``, ``1g`` -> bytes (binary multiples)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError("not a size: %r (e.g. 65536, 64KiB, 10MiB)" % text)
    mult = {"": 1, "b": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}[(m.group(2) or "")[:1].lower()]
    return int(m.group(1)) * mult


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number of seconds: %r (e.g. 10 or 0.5)" % text) from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("%r: give a number of seconds above 0 (e.g. 10 or 0.5)" % text)
    return value


def _port(text: str) -> int:
    if not (text.isdigit() and text.isascii()) or int(text) > 65535:
        raise argparse.ArgumentTypeError("%r is not a port; give a number from 0 (a free port) to 65535" % text)
    return int(text)


def _mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError("not an octal mode: %r (e.g. 0600 or 0660)" % text) from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError("mode out of range: %r (0000 to 0777, e.g. 0600)" % text)
    return value


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="agenshield-shim broker",
        description="Reference AgenShield broker: policy-checked JSON-RPC, forward proxy and CONNECT tunnels. "
                    "Sizes take k/M/G suffixes (binary: 64k = 65536), times are in seconds.",
        epilog=POLICY_EPILOG,
    )
    d = BrokerConfig()
    p.add_argument("--version", action="version", version="agenshield-shim broker " + __version__)
    p.add_argument("--host", default=None, help="address to listen on (default: %s)" % d.host)
    p.add_argument("--port", type=_port, default=None, help="TCP port, 0 for a free one (default: %d)" % d.port)
    p.add_argument("--unix", metavar="PATH", help="also (or, without --host/--port, only) listen on this Unix socket (default: none)")
    p.add_argument("--unix-mode", type=_mode, default=d.unix_mode, metavar="OCTAL", help="Unix socket mode (default: 0600)")
    p.add_argument("--policy", metavar="FILE", help="TOML policy file, format in docs/policy.md (default: none, so only loopback is allowed)")
    p.add_argument("--allow", action="append", default=[], metavar="HOST[:PORT]", help="allow a destination, added after the policy file's rules (repeatable; default: none, "
                   "so only loopback is allowed; see docs/policy.md)")
    p.add_argument("--audit", metavar="FILE", help="append one JSON line per decision to this file (default: stderr)")
    p.add_argument(
        "--compat", nargs="?", const=LATEST_COMPAT, default=None, choices=COMPAT_VERSIONS, metavar="VERSION",
        help="behave exactly like the AgenShield daemon's broker, no extensions: VERSION %s (given alone: the "
             "daemon's later source, with forward proxy and CONNECT) or 0.7.2 (the published daemon: /health and "
             "/rpc only) (default: off, extensions on)" % LATEST_COMPAT)
    p.add_argument("--connect-timeout", type=_seconds, default=d.connect_timeout, metavar="S",
                   help="connecting to an upstream host")
    p.add_argument("--idle-timeout", type=_seconds, default=d.idle_timeout, metavar="S",
                   help="a tunnel or forward with no byte moving either way is closed")
    p.add_argument("--head-timeout", type=_seconds, default=d.head_timeout, metavar="S", help="a client must send a whole request head within this (408)")
    p.add_argument("--keepalive-timeout", type=_seconds, default=d.keepalive_timeout, metavar="S",
                   help="an idle keep-alive client connection is closed")
    p.add_argument("--body-timeout", type=_seconds, default=d.body_timeout, metavar="S",
                   help="a /rpc or local-route body (a socket JSON-RPC line) must arrive within this (408)")
    p.add_argument("--max-connections", type=int, default=None, metavar="N",
                   help="client connections served at once; more wait in the listen backlog "
                        "(default: a quarter of the file-descriptor limit, at least 8)")
    p.add_argument("--max-head-size", type=parse_size, default=d.max_head_size, metavar="SIZE",
                   help="largest request line plus headers, in bytes (431 above)")
    p.add_argument("--max-body-size", type=parse_size, default=d.max_body_size, metavar="SIZE", help="largest /rpc request body, in bytes (413 above)")
    p.add_argument("--max-rpc-response", type=parse_size, default=d.max_rpc_response, metavar="SIZE",
                   help="largest upstream body buffered for one http_request call, in bytes (error 1004 above)")
    p.add_argument("--upstream-ca", metavar="PEM", help="extra CA bundle trusted for upstream TLS (default: the system store only)")
    p.add_argument("--shutdown-grace", type=_seconds, default=d.shutdown_grace, metavar="S",
                   help="on SIGTERM, requests in flight get this long to finish")
    p.add_argument("--ready-file", metavar="PATH", help="write host:port here once listening (default: none)")
    return p


def config_from_args(args: argparse.Namespace) -> BrokerConfig:
    d = BrokerConfig()
    tcp = args.unix is None or args.host is not None or args.port is not None
    return BrokerConfig(
        host=args.host if args.host is not None else d.host,
        port=args.port if args.port is not None else d.port,
        tcp=tcp,
        unix=args.unix,
        unix_mode=args.unix_mode,
        policy_file=args.policy,
        allow=tuple(args.allow),
        audit_file=args.audit,
        compat=args.compat is not None,
        compat_version=args.compat,
        connect_timeout=args.connect_timeout,
        idle_timeout=args.idle_timeout,
        head_timeout=args.head_timeout,
        body_timeout=args.body_timeout,
        max_connections=args.max_connections,
        keepalive_timeout=args.keepalive_timeout,
        max_head_size=args.max_head_size,
        max_body_size=args.max_body_size,
        max_rpc_response=args.max_rpc_response,
        upstream_ca_file=args.upstream_ca,
        shutdown_grace=args.shutdown_grace,
        ready_file=args.ready_file,
    )


def _raise_fd_limit() -> None:
    """A proxy holds two descriptors per tunnel: lift the soft limit to the hard one (best effort)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 1 << 20), hard))
    except (ImportError, ValueError, OSError):
        pass


async def _run(config: BrokerConfig) -> int:
    broker = Broker(config)
    try:
        await broker.start()
    except PolicyError as exc:
        print("agenshield-shim broker: %s" % exc, file=sys.stderr)
        return 2
    except AuditError as exc:
        print("agenshield-shim broker: %s" % exc, file=sys.stderr)
        return 1
    except OSError as exc:
        print("agenshield-shim broker: cannot listen: %s" % exc, file=sys.stderr)
        return 1
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(broker.stop()))
        except (NotImplementedError, RuntimeError):
            pass
    for line in broker.listening_lines():
        print(line)
    for warning in broker.warnings():
        print("agenshield-shim broker: warning: %s" % warning, file=sys.stderr)
    sys.stdout.flush()
    await broker.serve_forever()
    return 0


def _bad_paths(args: argparse.Namespace) -> Optional[str]:
    """A file flag that cannot work, as one line (checked before anything is bound or opened)."""
    return first_problem(
        check_input_file("--policy", args.policy),
        check_input_file("--upstream-ca", args.upstream_ca),
        check_output_file("--audit", args.audit),
        check_output_file("--ready-file", args.ready_file),
        check_output_file("--unix", args.unix),
    )


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    problem = _bad_paths(args)
    if problem:
        print("agenshield-shim broker: %s" % problem, file=sys.stderr)
        return 2
    try:
        build_policy(config.policy_file, config.allow)  # refuse a bad policy before binding anything
    except PolicyError as exc:
        print("agenshield-shim broker: %s" % exc, file=sys.stderr)
        return 2
    _raise_fd_limit()
    try:
        return asyncio.run(_run(config))
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        return 130
