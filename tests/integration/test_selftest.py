"""``python -m agenshield_shim.selftest`` in real shim environments: passes, fails for the right reasons, under 3 s."""

import json
import socket
import subprocess
import time
from typing import Dict, Tuple

import pytest

from .conftest import skip_unless_local as _skip_unless_local, PYTHONS, ShimEnv, clean_env, make_venv

SELFTEST_VERSION = next((v for v in ("3.12", "3.11", "3.13") if v in PYTHONS), None)
LIBRARIES = ("aiohttp>=3.9", "requests", "httpx")


def free_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port: int = probe.getsockname()[1]
    probe.close()
    return port


def selftest(env: ShimEnv, *args: str, extra: Dict[str, str] = None) -> Tuple["subprocess.CompletedProcess[str]", float]:
    started = time.monotonic()
    result = subprocess.run([env.python, "-m", "agenshield_shim.selftest", *args], capture_output=True, text=True,
                            timeout=60, env=clean_env(**(extra or {})))
    return result, time.monotonic() - started


@pytest.fixture(scope="module")
def full_env(shim_env_factory) -> ShimEnv:
    """A shim venv with the broker extra and every routed library."""
    if SELFTEST_VERSION is None:
        _skip_unless_local("no Python 3.11-3.13 here")
    return shim_env_factory(SELFTEST_VERSION, *LIBRARIES)


def test_passes_and_starts_a_broker_in_under_3_seconds(full_env: ShimEnv) -> None:
    port = free_port()
    result, elapsed = selftest(full_env, extra={"AGENSHIELD_BROKER_PORT": str(port)})
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for name in ("shim active", "guard: direct TCP", "guard: UDP", "guard: DNS", "guard: _socket",
                 "routed: http.client", "routed: urllib.request", "routed: urllib3", "routed: requests",
                 "routed: httpx", "routed: aiohttp"):
        assert "PASS  %s:" % name in out, out
    assert "started the reference broker there" in out and "broker reachable (started for this run)" in out
    assert "FAIL" not in out
    assert elapsed < 3.0, "selftest took %.2f s" % elapsed
    # the broker it started is gone again
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_uses_a_running_broker(full_env: ShimEnv, broker) -> None:
    result, elapsed = selftest(full_env, "--json", extra=broker.env)
    data = json.loads(result.stdout)
    assert result.returncode == 0 and data["success"], result.stdout
    assert data["brokerAccessible"] and data["networkBlocked"] and data["routed"]
    assert not any("started" in n for n in data["notes"])
    assert data["broker"] == "%s:%d" % (broker.host, broker.port)
    assert elapsed < 3.0


@pytest.fixture(scope="module")
def plain_env(wheel, tmp_path_factory) -> ShimEnv:
    """A shim venv of the oldest Python with nothing else (no aiohttp: no broker extra)."""
    version = min(PYTHONS, key=lambda v: tuple(map(int, v.split("."))))
    root = tmp_path_factory.mktemp("plain")
    make_venv(PYTHONS[version], root)
    env = ShimEnv(version, root)
    assert env.pip("install", "--no-index", str(wheel)).returncode == 0
    return env


def test_without_the_broker_extra_says_how_to_install_it(plain_env: ShimEnv) -> None:
    result, _ = selftest(plain_env, extra={"AGENSHIELD_BROKER_PORT": str(free_port())})
    assert result.returncode == 1
    assert 'pip install "agenshield-shim[broker]"' in result.stdout
    assert "SKIP  routed: requests: not installed" in result.stdout
    assert "PASS  guard: DNS" in result.stdout


def test_reports_a_switched_off_shim(full_env: ShimEnv) -> None:
    result, _ = selftest(full_env, "--json", extra={"AGENSHIELD_ENABLED": "false"})
    data = json.loads(result.stdout)
    assert result.returncode == 1 and not data["success"] and not data["networkBlocked"]
    assert data["checks"][0]["status"] == "FAIL" and "AGENSHIELD_ENABLED=false" in data["checks"][0]["detail"]


def test_broker_port_busy_with_something_else(full_env: ShimEnv, silent_broker: int) -> None:
    result, _ = selftest(full_env, extra={"AGENSHIELD_BROKER_PORT": str(silent_broker)})
    assert result.returncode == 1
    assert "FAIL  broker reachable" in result.stdout and "no broker was started" in result.stdout


def test_passes_under_the_rpc_transport(full_env: ShimEnv, rpc_broker) -> None:
    """AGENSHIELD_TRANSPORT=rpc: the same checks pass, each library's request is one http_request call."""
    mark = rpc_broker.mark()
    result, elapsed = selftest(full_env, "--json", extra=rpc_broker.rpc_env)
    data = json.loads(result.stdout)
    assert result.returncode == 0 and data["success"], result.stdout + result.stderr
    assert data["transport"] == "rpc" and data["routed"]
    calls = rpc_broker.calls("/selftest/", mark)
    libraries = {str(e["target"]).rsplit("/", 1)[-1] for e in calls}
    assert libraries == {"http.client", "urllib.request", "urllib3", "requests", "httpx", "aiohttp"}, calls
    assert elapsed < 3.0
