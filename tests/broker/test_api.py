"""The Python API other parts of the project use to run a broker: Broker, BrokerThread, BrokerProcess."""

import asyncio
import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from agenshield_shim.broker import config as config_mod
from agenshield_shim.broker.config import EXTENSIONS, BrokerConfig
from agenshield_shim.broker.policy import PolicyError
from agenshield_shim.broker.runner import BrokerProcess, BrokerThread
from agenshield_shim.broker.server import Broker

ROOT = Path(__file__).resolve().parents[2]


def _get(url: str) -> Any:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as r:
        return json.loads(r.read())


def test_async_broker_api() -> None:
    async def go() -> None:
        async with Broker(BrokerConfig(port=0, allow=("127.0.0.1",))) as b:
            host, port = b.address
            assert host == "127.0.0.1" and port == b.port > 0
            assert b.url == "http://127.0.0.1:%d" % port
            assert b.listening_lines() == ["agenshield broker listening on " + b.url]
            r, w = await asyncio.open_connection(host, port)
            w.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = await r.read()
            w.close()
            assert data.startswith(b"HTTP/1.1 200") and list(EXTENSIONS)[0].encode() in data
            assert b.stats()["connections"] in (0, 1)
        with pytest.raises(OSError):
            await asyncio.open_connection(host, port)

    asyncio.run(go())


def test_broker_start_refuses_bad_policy(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text('[[rules]]\naction = "allow"\nhosts = ["*bad"]\n')

    async def go() -> None:
        with pytest.raises(PolicyError, match="rule 0.*'hosts'"):
            await Broker(BrokerConfig(port=0, policy_file=str(f))).start()

    asyncio.run(go())


def test_broker_thread_own_loop() -> None:
    with BrokerThread(BrokerConfig(port=0)) as b:
        assert _get(b.url + "/health")["status"] == "ok"


def test_broker_process_and_module_help() -> None:
    with BrokerProcess(["--port", "0"]) as p:
        assert _get(p.url + "/health")["version"] == "0.1.0"
    out = subprocess.run([sys.executable, "-m", "agenshield_shim.broker", "--help"], capture_output=True,
                         text=True, cwd=str(ROOT), timeout=30)
    assert out.returncode == 0 and "--compat" in out.stdout and "--unix" in out.stdout


def test_config_defaults() -> None:
    c = BrokerConfig()
    assert (c.host, c.port, c.unix_mode, c.max_body_size) == ("127.0.0.1", 6969, 0o600, 10 * 1024 * 1024)
    assert c.extensions == EXTENSIONS and BrokerConfig(compat=True).extensions == ()
    assert config_mod.EXTENSIONS == ("tunnel", "body-base64", "redirect-policy", "connect-port-policy", "proxy-error-header")


def test_broker_does_not_import_shim_guard() -> None:
    code = ("import sys, agenshield_shim.broker.server, agenshield_shim.broker.cli; "
            "bad = [m for m in sys.modules if m.startswith('agenshield_shim._')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), timeout=30)
    assert out.stdout.strip() == "[]", out.stderr
