"""selftest lists the HTTP stacks installed in the environment and says how each is routed, truthfully.

The environment has httpx2 (what openai 3.x and the other new SDKs use), websockets, httplib2 and
tornado besides the usual ones. Whether httpx2 is "routed by a hook" is read from the shim's own
``_boot.HOOKS`` in that environment, not assumed: without a hook it goes through the proxy
environment, and either way selftest fetches a page through the broker with it. tornado's default
client has no proxy support and no hook: that is a failure selftest must report, not hide.
Against a broker that does not tunnel (``broker --compat 0.7.2``, the published daemon's protocol),
the proxy environment is a warning, in selftest and in ``verify``.
"""

import json
import subprocess
from typing import Any, Dict, List, Tuple

import pytest

from .conftest import PYTHONS, ShimEnv, clean_env, skip_unless_local

VERSION = next((v for v in ("3.12", "3.11", "3.13", "3.10") if v in PYTHONS), None)
PACKAGES = ("aiohttp>=3.9", "requests", "httpx", "httpx2", "websockets", "httplib2", "tornado")


@pytest.fixture(scope="module")
def stacks_env(shim_env_factory: Any) -> ShimEnv:
    if VERSION is None:
        skip_unless_local("no Python 3.10+ here")
    return shim_env_factory(VERSION, *PACKAGES)  # type: ignore[no-any-return]


def selftest(env: ShimEnv, extra: Dict[str, str]) -> Tuple[int, Dict[str, Any]]:
    result = subprocess.run([env.python, "-m", "agenshield_shim.selftest", "--json"], capture_output=True, text=True,
                            timeout=60, env=clean_env(**extra))
    return result.returncode, json.loads(result.stdout)


def checks(data: Dict[str, Any]) -> Dict[str, Dict[str, str]]:
    return {c["name"]: c for c in data["checks"]}


def hooked_in(env: ShimEnv) -> List[str]:
    out = env.run("from agenshield_shim import _boot; print(' '.join(m for m, _ in _boot.HOOKS))")
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_lists_every_installed_stack_and_how_it_is_routed(stacks_env: ShimEnv, broker: Any) -> None:
    mark = broker.mark()
    code, data = selftest(stacks_env, broker.env)
    found = checks(data)
    # routed by a hook, checked end to end through the broker
    for name in ("routed: http.client", "routed: urllib.request", "routed: urllib3", "routed: requests",
                 "routed: httpx", "routed: aiohttp", "routed: websockets"):
        assert found[name]["status"] == "PASS", found[name]
        assert found[name]["detail"].startswith(("GET", "by a hook")), found[name]
    assert "websockets" in found["routed: websockets"]["detail"]
    # httpx2: by a hook only if the shim's table registers one; through the proxy environment otherwise
    httpx2 = found["routed: httpx2"]
    assert httpx2["status"] == "PASS", httpx2
    expected = "by a hook" if any(m.split(".")[0] == "httpx2" for m in hooked_in(stacks_env)) else \
        "through the proxy environment"
    assert httpx2["detail"].startswith(expected + ": GET"), httpx2
    # honours the proxy variables, no hook, no end-to-end fetcher here
    assert found["routed: httplib2"]["status"] == "PASS", found["routed: httplib2"]
    assert found["routed: httplib2"]["detail"].startswith("through the proxy environment"), found["routed: httplib2"]
    # no hook and no proxy support: its requests fail, and selftest says so
    assert found["routed: tornado"]["status"] == "FAIL" and "not routed" in found["routed: tornado"]["detail"]
    assert code == 1 and not data["success"]
    assert [c["name"] for c in data["checks"] if c["status"] == "FAIL"] == ["routed: tornado"], data["checks"]
    # stacks that are not installed are not listed (the four that always were still say so)
    assert "routed: pycurl" not in found and "routed: grpcio" not in found and "routed: niquests" not in found
    assert found["proxy environment"]["status"] == "PASS", found["proxy environment"]
    assert any(e.get("operation") in ("connect", "forward") for e in broker.audit(mark))


def test_a_broker_that_does_not_tunnel_is_a_warning(stacks_env: ShimEnv, start_broker: Any) -> None:
    legacy = start_broker("--compat", "0.7.2")
    code, data = selftest(stacks_env, legacy.env)
    found = checks(data)
    assert found["transport"]["status"] == "PASS" and data["transport"] == "rpc", found["transport"]
    proxy = found["proxy environment"]
    assert proxy["status"] == "WARN" and "does not tunnel" in proxy["detail"] and "curl" in proxy["detail"], proxy
    # what only the proxy environment routes cannot work here: said, as a warning
    assert found["routed: httplib2"]["status"] == "WARN" and "does not tunnel" in found["routed: httplib2"]["detail"]
    # verify shows the same line
    result = subprocess.run([stacks_env.python, "-m", "agenshield_shim", "verify", "--python", stacks_env.python,
                             "--broker-port", str(legacy.port), "--broker-host", legacy.host],
                            capture_output=True, text=True, timeout=60, env=clean_env(**legacy.env))
    assert "WARN proxy environment" in result.stdout and "does not tunnel" in result.stdout, result.stdout + result.stderr
