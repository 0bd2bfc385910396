"""Reference AgenShield broker: ``agenshield-shim broker`` (needs the ``[broker]`` extra: aiohttp).

A separate program from the shim: it never imports the shim's boot or guard, and normally runs
where the shim is not active. It speaks the AgenShield broker protocol (``GET /health``,
``POST /rpc`` JSON-RPC 2.0, absolute-form forward proxying, ``CONNECT`` tunnels), applies a
default-deny policy, writes one audit line per decision, and adds documented extensions (see
``PROTOCOL.md`` beside this file) that ``--compat`` turns off. ``--compat`` alone is the daemon's
later source (0.7.3 and on); ``--compat 0.7.2`` is the daemon published on the npm registry, which
serves ``/health`` and ``/rpc`` only (``legacy.py``).

Python API, for tests and the selftest::

    from agenshield_shim.broker.config import BrokerConfig
    from agenshield_shim.broker.server import Broker

    async with Broker(BrokerConfig(port=0, allow=("127.0.0.1",))) as broker:
        broker.port            # the port picked; broker.address -> (host, port)
        broker.url             # "http://127.0.0.1:PORT"
        broker.stats()         # {"connections", "upstreams", "pipes", counters...}

    # from synchronous code (tests), on a private event loop in a thread:
    from agenshield_shim.broker.runner import BrokerThread, BrokerProcess
    with BrokerThread(BrokerConfig(port=0)) as b:          # in-process
        b.port, b.url, b.broker
    with BrokerProcess(["--port", "0", "--allow", "127.0.0.1"]) as p:   # real CLI subprocess
        p.port, p.url, p.proc

``main(argv)`` is the command line (``agenshield-shim broker --help``).
"""

from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    try:
        from .cli import main as cli_main
    except ImportError as exc:  # aiohttp missing: say which extra brings it
        raise SystemExit(
            "agenshield-shim broker: %s; install it with: pip install 'agenshield-shim[broker]'" % exc
        ) from None
    return cli_main(argv)
