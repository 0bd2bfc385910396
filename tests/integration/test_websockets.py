"""websockets (PyPI ``websockets``) routed through the broker's ``CONNECT`` tunnel.

A real shim venv with the newest websockets for each Python runs the client suite below against
the upstream's ``/ws`` echo (tests/integration/upstream.py), through the reference broker. Routing
is proven from the broker's side (one ``connect`` audit entry for the upstream's port per
connection); TLS end to end by a ``wss://`` connection that a wrong CA fails. websockets before 15
(the newest for Python 3.8 is 13.1) has no proxy support: there the guard's refusal is the answer.
"""

import hashlib
import textwrap
from typing import Any, Dict, Tuple

import pytest

from .conftest import ShimEnv
from .test_routing_async import PRELUDE, error, run_suite, value

SUITE = PRELUDE + textwrap.dedent(
    '''
    import websockets
    from websockets.version import version
    R["version"] = {"value": version}
    WS = P["http_url"].replace("http", "ws", 1) + "/ws"
    WSS = P["https_url"].replace("https", "wss", 1) + "/ws"
    WRONG = ssl.create_default_context(cafile=P["wrong_ca_file"])
    MODERN = int(version.split(".")[0]) >= 15

    def sync_echo(url, message, **kwargs):
        from websockets.sync.client import connect
        with connect(url, open_timeout=5, **kwargs) as ws:
            ws.send(message)
            return ws.recv(timeout=5)

    async def async_echo(connect, url, message, **kwargs):
        async with connect(url, open_timeout=5, **kwargs) as ws:
            await ws.send(message)
            return await asyncio.wait_for(ws.recv(), 5)

    rec_sync("sync:ws", lambda: sync_echo(WS, "hello sync"))
    rec_sync("sync:wss", lambda: sync_echo(WSS, "hello sync tls", ssl=CTX))
    rec_sync("sync:binary", lambda: sha(sync_echo(WS, bytes(range(256)) * 40)))
    rec_sync("sync:proxy_none", lambda: sync_echo(WS, "no proxy asked", proxy=None))
    rec_sync("sync:wrong_ca", lambda: sync_echo(WSS, "x", ssl=WRONG))
    rec_sync("sync:refused", lambda: sync_echo(P["refused_url"], "x"))

    async def main():
        if MODERN:
            from websockets.asyncio.client import connect
        else:
            from websockets import connect
        await rec("async:ws", lambda: async_echo(connect, WS, "hello async"))
        await rec("async:wss", lambda: async_echo(connect, WSS, "hello async tls", ssl=CTX))
        await rec("async:top_level", lambda: async_echo(websockets.connect, WS, "top level"))
        await rec("async:proxy_other", lambda: async_echo(connect, WS, "other proxy", proxy="http://127.0.0.1:9"))
        await rec("async:wrong_ca", lambda: async_echo(connect, WSS, "x", ssl=WRONG))
        await rec("async:refused", lambda: async_echo(connect, P["refused_url"], "x"))
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated since websockets 14
            from websockets.legacy.client import connect as legacy
        await rec("legacy:ws", lambda: async_echo(legacy, WS, "hello legacy"))
        await rec("legacy:wss", lambda: async_echo(legacy, WSS, "hello legacy tls", ssl=CTX))
        await rec("legacy:wrong_ca", lambda: async_echo(legacy, WSS, "x", ssl=WRONG))
        await rec("legacy:refused", lambda: async_echo(legacy, P["refused_url"], "x"))
    asyncio.run(main())
    done()
    '''
)


@pytest.fixture
def ws_env(shim: ShimEnv, shim_env_factory: Any) -> ShimEnv:
    """The shim and the newest websockets this Python can have."""
    return shim_env_factory(shim.version, "websockets")  # type: ignore[no-any-return]


def _run(env: ShimEnv, broker: Any, upstream: Any, refused_url: str = "ws://127.0.0.1:9/ws",
         extra_env: Dict[str, str] = None) -> Dict[str, Any]:
    return run_suite(env, SUITE, broker, upstream, extra_env=extra_env, refused_url=refused_url, timeout=120)


def _modern(results: Dict[str, Any]) -> bool:
    return int(value(results, "version").split(".")[0]) >= 15


def test_websockets_routed_through_the_broker(ws_env: ShimEnv, broker: Any, upstream: Any) -> None:
    mark = broker.mark()
    results = _run(ws_env, broker, upstream)
    if tuple(map(int, ws_env.version.split("."))) >= (3, 10):
        assert _modern(results), value(results, "version")  # the proxy-based path is exercised here
    # the legacy client (websockets.connect before 14): the hook opens the tunnel itself
    assert value(results, "legacy:ws") == "hello legacy"
    assert value(results, "legacy:wss") == "hello legacy tls"
    wrong_ca = ["legacy:wrong_ca"]
    if not _modern(results):  # 13/14: the new clients have no proxy support, so the guard refuses them
        entry = error(results, "sync:ws")
        assert "AgenShield" in entry["message"] and "blocked" in entry["message"], entry
        assert value(results, "async:ws") == "hello async"  # websockets.connect is the legacy client there
    else:
        assert value(results, "sync:ws") == "hello sync"
        assert value(results, "sync:wss") == "hello sync tls"
        assert value(results, "sync:binary") == hashlib.sha256(bytes(range(256)) * 40).hexdigest()
        assert value(results, "sync:proxy_none") == "no proxy asked"
        assert value(results, "async:ws") == "hello async"
        assert value(results, "async:wss") == "hello async tls"
        assert value(results, "async:top_level") == "top level"
        assert value(results, "async:proxy_other") == "other proxy"
        wrong_ca += ["sync:wrong_ca", "async:wrong_ca"]
        # every connection went through the broker's tunnel: 7 to the plain port, 3 (+3 failed TLS) to the TLS port
        plain = broker.connects("127.0.0.1:%d" % upstream.http_port, mark)
        tls = broker.connects("localhost:%d" % upstream.https_port, mark)
        assert len(plain) == 7, broker.audit(mark)
        assert len(tls) == 6, broker.audit(mark)
        assert all(e["allowed"] is True for e in plain + tls), plain + tls
    # TLS is the client's own, end to end: a CA that did not sign the upstream's certificate fails
    for name in wrong_ca:
        entry = error(results, name)
        assert "CERTIFICATE_VERIFY_FAILED" in entry["message"] or "certificate verify failed" in entry["message"], entry
    assert broker.connects("localhost:%d" % upstream.https_port, mark)


def _routed_names(results: Dict[str, Any]) -> Tuple[str, ...]:
    return ("sync:", "async:", "legacy:") if _modern(results) else ("legacy:",)


def test_websockets_refusal_names_agenshield_and_the_reason(ws_env: ShimEnv, deny_broker: Any, upstream: Any) -> None:
    results = _run(ws_env, deny_broker, upstream, refused_url="ws://127.0.0.1:%d/ws" % upstream.http_port)
    for prefix in _routed_names(results):
        entry = error(results, prefix + "refused")
        assert entry["error"] == "BrokerRefusal", entry
        base = "InvalidProxyStatus" if _modern(results) else "InvalidHandshake"
        assert "websockets.exceptions." + base in entry["mro"], entry
        assert "AgenShield" in entry["message"] and "403" in entry["message"], entry
        assert "deny-upstream" in entry["message"], entry  # the broker's reason: its rule
        assert entry["elapsed"] < 1.0, entry


def test_websockets_under_rpc_is_a_clear_tunnel_only_error(ws_env: ShimEnv, rpc_broker: Any, upstream: Any) -> None:
    results = _run(ws_env, rpc_broker, upstream, extra_env={"AGENSHIELD_TRANSPORT": "rpc"})
    names = ("sync:ws", "async:ws", "async:wss", "legacy:ws") if _modern(results) else ("legacy:ws", "legacy:wss")
    for name in names:
        entry = error(results, name)
        assert entry["error"] == "TunnelOnlyError", entry
        assert "websockets.exceptions.InvalidHandshake" in entry["mro"], entry
        assert "agenshield_shim.errors.TunnelOnlyError" in entry["mro"], entry  # the one every library shares
        assert "AgenShield" in entry["message"] and "tunnel" in entry["message"], entry


def test_websockets_broker_down_says_so(ws_env: ShimEnv, broker: Any, upstream: Any, dead_broker_port: int) -> None:
    results = _run(ws_env, broker, upstream, extra_env={"AGENSHIELD_BROKER_PORT": str(dead_broker_port)})
    names = ("sync:ws", "async:ws", "legacy:ws") if _modern(results) else ("legacy:ws",)
    for name in names:
        entry = error(results, name)
        assert "builtins.OSError" in entry["mro"], entry
        assert "AgenShield" in entry["message"] and str(dead_broker_port) in entry["message"], entry
        assert entry["elapsed"] < 2.0, entry
