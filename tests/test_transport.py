"""``AGENSHIELD_TRANSPORT=auto``: what the probe learns from real brokers, once per process.

Against the reference broker (in-process, extensions on and ``--compat``, over TCP and its Unix
socket), the real AgenShield daemon 0.7.2 from the npm registry (HTTP fallback and Unix socket),
a broker that is down, and impostors.
"""

import asyncio
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List

import pytest

from agenshield_shim import _rpc, _transport
from agenshield_shim._config import Config
from agenshield_shim.broker.config import BrokerConfig
from agenshield_shim.broker.runner import BrokerThread

from .daemon import Daemon, DaemonUnavailable


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    _rpc.forget_capabilities()
    _transport.forget()
    yield
    _rpc.forget_capabilities()
    _transport.forget()


class Reference:
    def __init__(self, **kwargs: Any) -> None:
        self.unix = os.path.join(tempfile.mkdtemp(prefix="agst-"), "b.sock")
        self.thread = BrokerThread(BrokerConfig(port=0, unix=self.unix, **kwargs), audit_stream=open(os.devnull, "w"))
        self.tcp = Config(broker_host="127.0.0.1", broker_port=self.thread.port)
        self.socket = Config(broker_host="127.0.0.1", broker_port=self.thread.port, broker_socket=self.unix)

    def stop(self) -> None:
        self.thread.stop()


@pytest.fixture(scope="module")
def reference() -> Iterator[Reference]:
    broker = Reference()
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def compat() -> Iterator[Reference]:
    broker = Reference(compat=True)
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    try:
        running = Daemon(tmp_path_factory.mktemp("daemon"))
    except DaemonUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail("CI must have this: %s" % exc)
        pytest.skip(str(exc))
    yield running
    running.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pings(daemon: Daemon, mark: int, expected: int) -> List[Any]:
    """The daemon's audited pings since ``mark``, once ``expected`` are written (it writes asynchronously)."""
    deadline = time.monotonic() + 5
    while True:
        found = [e for e in daemon.audit(mark) if e.get("operation") == "ping"]
        if len(found) >= expected or time.monotonic() > deadline:
            time.sleep(0.2)  # and nothing more arrives
            return [e for e in daemon.audit(mark) if e.get("operation") == "ping"]
        time.sleep(0.02)


def auto(**kwargs: Any) -> Config:
    return Config(transport="auto", **kwargs)


def test_reference_broker_advertises_the_tunnel(reference: Reference) -> None:
    for config in (auto(broker_host="127.0.0.1", broker_port=reference.thread.port),
                   auto(broker_host="127.0.0.1", broker_port=reference.thread.port, broker_socket=reference.unix)):
        assert _transport.choose(config) == "tunnel"
        choice = _transport.chosen(config)
        assert choice is not None and "tunnel extension" in choice.reason


def test_learned_follows_the_probe_and_forget(reference: Reference) -> None:
    """What a hook asks per request: nothing before the probe, the choice after it, nothing again
    once forgotten (the broker replaced), whichever way it was forgotten; explicit transports as set."""
    config = auto(broker_host="127.0.0.1", broker_port=reference.thread.port)
    other = auto(broker_host="127.0.0.1", broker_port=reference.thread.port, broker_socket=reference.unix)
    learned, learned_other = _transport.learned(config), _transport.learned(other)
    assert learned() is None and learned_other() is None
    assert _transport.choose(config) == "tunnel"
    assert learned() is _transport.chosen(config) and learned_other() is None  # one broker's, not the other's
    _transport.forget(config)
    assert learned() is None
    assert _transport.choose(config) == "tunnel" and learned() is not None
    _transport.forget()
    assert learned() is None
    for name in ("tunnel", "rpc"):
        assert _transport.learned(Config(transport=name))().transport == name  # type: ignore[union-attr]


def test_compat_broker_is_a_proxy_without_saying_so(compat: Reference) -> None:
    """``--compat`` (the daemon's later source) advertises nothing but serves CONNECT: learned by the probe."""
    config = auto(broker_host="127.0.0.1", broker_port=compat.thread.port)
    assert _transport.choose(config) == "tunnel"
    choice = _transport.chosen(config)
    assert choice is not None and "answered CONNECT (HTTP" in choice.reason


def test_published_daemon_serves_rpc_only(daemon: Daemon) -> None:
    config = auto(broker_host="127.0.0.1", broker_port=daemon.port)
    mark = len(daemon.audit())
    assert _transport.choose(config) == "rpc"
    choice = _transport.chosen(config)
    assert choice is not None and "closed the connection on CONNECT" in choice.reason
    # learned once: later requests ask nothing
    assert _transport.choose(config) == "rpc"
    found = pings(daemon, mark, 1)
    assert len(found) == 1 and found[0]["result"] == "success"  # params sent: the daemon answers pong


def test_published_daemon_over_its_unix_socket(daemon: Daemon) -> None:
    config = auto(broker_host="127.0.0.1", broker_port=free_port(), broker_socket=daemon.socket_path)
    mark = len(daemon.audit())
    assert _transport.choose(config) == "rpc"
    choice = _transport.chosen(config)
    assert choice is not None and "Unix socket" in choice.reason
    assert [e["channel"] for e in pings(daemon, mark, 1)] == ["socket"]


def test_explicit_transports_are_obeyed_without_asking() -> None:
    dead = free_port()
    for name in ("tunnel", "rpc"):
        config = Config(broker_host="127.0.0.1", broker_port=dead, transport=name)
        assert _transport.choose(config) == name
        assert _transport.chosen(config).reason == "AGENSHIELD_TRANSPORT=%s" % name  # type: ignore[union-attr]


def test_broker_down_decides_nothing_then_learns_once_up(tmp_path: Path) -> None:
    port = free_port()
    config = auto(broker_host="127.0.0.1", broker_port=port)
    assert _transport.choose(config, 1.0) == "tunnel"  # the tunnel's own error says the broker is down
    assert _transport.chosen(config) is None
    broker = BrokerThread(BrokerConfig(port=port), audit_stream=open(os.devnull, "w"))
    try:
        assert _transport.choose(config) == "tunnel"
        assert _transport.chosen(config) is not None
    finally:
        broker.stop()


def test_silent_broker_probe_honours_the_deadline() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        config = auto(broker_host="127.0.0.1", broker_port=server.getsockname()[1])
        loop = asyncio.new_event_loop()
        started = loop.time()
        assert _transport.choose(config, 0.3) == "tunnel"
        assert loop.time() - started < 2.0
        loop.close()
        assert _transport.chosen(config) is None
    finally:
        server.close()


def test_one_probe_for_many_threads_and_tasks(daemon: Daemon) -> None:
    config = auto(broker_host="127.0.0.1", broker_port=daemon.port)
    mark = len(daemon.audit())
    results: List[str] = []
    threads = [threading.Thread(target=lambda: results.append(_transport.choose(config))) for _ in range(20)]
    for t in threads:
        t.start()

    async def many() -> List[str]:
        return list(await asyncio.gather(*(_transport.choose_async(config) for _ in range(50))))

    results += asyncio.run(many())
    for t in threads:
        t.join(10)
    assert results == ["rpc"] * 70
    assert len(pings(daemon, mark, 1)) == 1


class Impostor:
    """A loopback server that answers each connection's first bytes with ``answer(data)``."""

    def __init__(self, answer: Callable[[bytes], bytes]) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.seen: List[bytes] = []
        self.answer = answer
        self.config = auto(broker_host="127.0.0.1", broker_port=self.server.getsockname()[1])
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                data = conn.recv(65536)
                self.seen.append(data)
                conn.sendall(self.answer(data))

    def close(self) -> None:
        self.server.close()


def test_odd_ping_is_no_extensions_not_no_routing() -> None:
    """A broker whose ping fails (the daemon 0.7.2 without params answers -32603) still routes by rpc."""
    def answer(data: bytes) -> bytes:
        if data.startswith(b"CONNECT"):
            return b"HTTP/1.1 404 Not Found\r\nContent-Length: 21\r\n\r\n{\"error\":\"Not found\"}"
        body = json.dumps({"jsonrpc": "2.0", "id": 0, "error": {"code": -32603, "message": "Internal error"}})
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body.encode())

    impostor = Impostor(answer)
    try:
        assert _transport.choose(impostor.config) == "rpc"
        assert "answered CONNECT with 404" in _transport.chosen(impostor.config).reason  # type: ignore[union-attr]
        assert _rpc.capabilities(impostor.config).extensions == frozenset()
        assert b'"params":{}' in impostor.seen[0]
    finally:
        impostor.close()


def test_garbage_answers_decide_nothing() -> None:
    impostor = Impostor(lambda data: b"SSH-2.0-OpenSSH_9.6\r\n")
    try:
        assert _transport.choose(impostor.config) == "tunnel"
        assert _transport.chosen(impostor.config) is None
    finally:
        impostor.close()


def test_unix_socket_broker_down_goes_the_way_that_names_the_socket(tmp_path: Path) -> None:
    config = auto(broker_host="127.0.0.1", broker_port=free_port(), broker_socket=str(tmp_path / "none.sock"))
    assert _transport.choose(config, 1.0) == "rpc"
    assert _transport.chosen(config) is None
    with pytest.raises(_rpc.RpcBrokerUnavailable, match="unix:%s" % (tmp_path / "none.sock")):
        _rpc.http_request(config, "GET", "http://127.0.0.1:9/")
