"""``AGENSHIELD_TRANSPORT=auto`` (the default) in real interpreters, against every kind of broker.

One script per broker makes requests with every hooked library (urllib.request, requests,
aiohttp, httpx sync and async) over HTTP and HTTPS to the loopback upstream, and one to a refused
destination (127.0.0.2, where a listener proves nothing arrived). The broker's audit log shows how
each request travelled: ``connect``/``forward`` entries for the tunnel, ``http_request`` for rpc.

- the reference broker (advertises ``tunnel``) and ``--compat`` (tunnels without saying so): tunnel;
- the AgenShield daemon 0.7.2 from the npm registry, over HTTP and over its Unix socket: rpc;
- an explicit ``AGENSHIELD_TRANSPORT=tunnel`` against the daemon: every library fails with an
  error that says the broker does not tunnel and names the fix.
"""

import json
import os
import uuid
from typing import Any, Dict

import pytest

from .conftest import Listener, ShimEnv

pytestmark = pytest.mark.integration

SCRIPT = r'''
import asyncio, json, os, sys
BASE_HTTP, BASE_HTTPS, CA, DENIED, TAG = sys.argv[1:6]
results = {}

def record(name, fn):
    try:
        results[name] = ["ok", fn()]
    except Exception as exc:
        chain, cur = [], exc
        while cur is not None and len(chain) < 6:
            chain.append("%s: %s" % (type(cur).__name__, cur))
            cur = cur.__cause__ or cur.__context__
        results[name] = ["error", " | ".join(chain)]

def arecord(name, coro_fn):
    record(name, lambda: asyncio.run(coro_fn()))

import urllib.request, urllib.error, ssl
ctx = ssl.create_default_context(cafile=CA)
def urllib_get(url):
    with urllib.request.urlopen(url, context=ctx, timeout=10) as r:
        return [r.status, json.loads(r.read())["query"]]
import requests
def requests_get(url):
    r = requests.get(url, verify=CA, timeout=10)
    return [r.status_code, r.json()["query"]]
import httpx
def httpx_get(url):
    with httpx.Client(verify=CA, timeout=10) as c:
        r = c.get(url)
        r.raise_for_status()  # a refusal is a 403 naming AgenShield
        return [r.status_code, r.json()["query"]]
async def httpx_aget(url):
    async with httpx.AsyncClient(verify=CA, timeout=10) as c:
        r = await c.get(url)
        r.raise_for_status()
        return [r.status_code, r.json()["query"]]
import aiohttp
async def aiohttp_get(url):
    async with aiohttp.ClientSession() as s:
        async with s.get(url, ssl=ctx, timeout=aiohttp.ClientTimeout(total=10)) as r:
            return [r.status, (await r.json())["query"]]

for scheme, base in (("http", BASE_HTTP), ("https", BASE_HTTPS), ("denied", DENIED)):
    url = base + "/echo?lib=%s&tag=" + TAG
    record("urllib:" + scheme, lambda: urllib_get(url % "urllib"))
    record("requests:" + scheme, lambda: requests_get(url % "requests"))
    record("httpx:" + scheme, lambda: httpx_get(url % "httpx"))
    arecord("httpx-async:" + scheme, lambda: httpx_aget(url % "httpx-async"))
    arecord("aiohttp:" + scheme, lambda: aiohttp_get(url % "aiohttp"))
# an upstream's own 403 (and 404) on plain HTTP is the upstream's: passed through, body intact
def urllib_status(url):
    try:
        urllib.request.urlopen(url, context=ctx, timeout=10)
    except urllib.error.HTTPError as exc:
        return [exc.code, exc.read().decode()]
def requests_status(url):
    r = requests.get(url, verify=CA, timeout=10)
    return [r.status_code, r.text]
def httpx_status(url):
    with httpx.Client(verify=CA, timeout=10) as c:
        r = c.get(url)
        return [r.status_code, r.text]
async def httpx_astatus(url):
    async with httpx.AsyncClient(verify=CA, timeout=10) as c:
        r = await c.get(url)
        return [r.status_code, r.text]
async def aiohttp_status(url):
    async with aiohttp.ClientSession() as s:
        async with s.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r:
            return [r.status, await r.text()]
for code in (403, 404):
    url = BASE_HTTP + "/status/%d?tag=" % code + TAG
    record("urllib:%d" % code, lambda: urllib_status(url))
    record("requests:%d" % code, lambda: requests_status(url))
    record("httpx:%d" % code, lambda: httpx_status(url))
    arecord("httpx-async:%d" % code, lambda: httpx_astatus(url))
    arecord("aiohttp:%d" % code, lambda: aiohttp_status(url))
print("RESULTS " + json.dumps(results))
'''

LIBS = ("urllib", "requests", "httpx", "httpx-async", "aiohttp")


@pytest.fixture(scope="module")
def env(shim_env_factory: Any) -> ShimEnv:
    return shim_env_factory("3.11", "requests", "aiohttp", "httpx")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def daemon(daemon_unix_broker: Any) -> Any:
    """The session's daemon itself (``tests.daemon.Daemon``: ``port``, ``socket_path``, ``audit()``)."""
    return daemon_unix_broker.daemon


def run(env: ShimEnv, upstream: Any, broker_env: Dict[str, str], denied: Listener) -> Dict[str, Any]:
    tag = uuid.uuid4().hex
    result = env.run(SCRIPT, upstream.http_url, upstream.https_url, str(upstream.ca_file),
                     "http://127.0.0.2:%d" % denied.port, tag, env=broker_env, timeout=180)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")]
    assert lines, "script failed (rc %s):\n%s\n%s" % (result.returncode, result.stdout[-3000:], result.stderr[-5000:])
    out: Dict[str, Any] = json.loads(lines[-1][len("RESULTS "):])
    out["_tag"] = tag
    return out


def assert_routed(results: Dict[str, Any]) -> None:
    for lib in LIBS:
        for scheme in ("http", "https"):
            status, value = results["%s:%s" % (lib, scheme)]
            assert status == "ok" and value[0] == 200 and ["lib", lib] in value[1], (lib, scheme, value)
        status, text = results[lib + ":denied"]
        assert status == "error" and "AgenShield" in text and "127.0.0.2" in text, (lib, text)
        for code in (403, 404):
            status, value = results["%s:%d" % (lib, code)]
            assert status == "ok" and value == [code, "status %d\n" % code], (lib, code, value)


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Like the daemon's built-in policy: 127.0.0.1 and localhost, not 127.0.0.2."""
    path = tmp_path_factory.mktemp("policy") / "local.toml"
    path.write_text('[[rules]]\nid = "local"\naction = "allow"\nhosts = ["127.0.0.1", "localhost"]\n')
    return str(path)


def test_reference_broker_tunnels(env: ShimEnv, start_broker: Any, policy: str, upstream: Any,
                                  tcp_listener: Listener) -> None:
    broker = start_broker("--policy", policy)
    mark = broker.mark()
    results = run(env, upstream, broker.env, tcp_listener)
    assert_routed(results)
    assert tcp_listener.settle() == 0
    entries = broker.audit(mark)
    assert broker.connects("localhost:%d" % upstream.https_port, mark)  # https: CONNECT tunnels
    assert not [e for e in entries if e.get("operation") == "http_request"]


def test_compat_broker_tunnels(env: ShimEnv, start_broker: Any, policy: str, upstream: Any,
                               tcp_listener: Listener) -> None:
    compat = start_broker("--compat", "--policy", policy)
    results = run(env, upstream, compat.env, tcp_listener)
    assert_routed(results)
    assert tcp_listener.settle() == 0
    assert compat.connects("localhost:%d" % upstream.https_port)


@pytest.mark.parametrize("via", ["http", "unix"])
def test_daemon_is_reached_by_rpc(env: ShimEnv, daemon: Any, upstream: Any, tcp_listener: Listener, via: str) -> None:
    broker_env = {"AGENSHIELD_BROKER_HOST": "127.0.0.1", "AGENSHIELD_BROKER_PORT": str(daemon.port),
                  "AGENSHIELD_LOG_LEVEL": "info"}
    if via == "unix":
        broker_env["AGENSHIELD_BROKER_SOCKET"] = daemon.socket_path
    mark = len(daemon.audit())
    results = run(env, upstream, broker_env, tcp_listener)
    assert_routed(results)
    for lib in LIBS:  # the daemon's own refusal, carried to the application
        assert "Host '127.0.0.2' is not allowed" in results[lib + ":denied"][1]
    assert tcp_listener.settle() == 0
    calls = [e for e in daemon.audit(mark) if e.get("operation") == "http_request"]
    tag = results["_tag"]
    for lib in LIBS:
        for base in (upstream.http_url, upstream.https_url):
            url = "%s/echo?lib=%s&tag=%s" % (base, lib, tag)
            assert [e for e in calls if e["target"] == url and e["allowed"]], (lib, base)
    assert {e["channel"] for e in calls} == {"socket" if via == "unix" else "http"}


def test_explicit_tunnel_against_the_daemon_says_so(env: ShimEnv, daemon: Any, upstream: Any,
                                                    tcp_listener: Listener) -> None:
    broker_env = {"AGENSHIELD_BROKER_HOST": "127.0.0.1", "AGENSHIELD_BROKER_PORT": str(daemon.port),
                  "AGENSHIELD_TRANSPORT": "tunnel"}
    results = run(env, upstream, broker_env, tcp_listener)
    for lib in LIBS:
        for scheme in ("http", "https"):
            status, text = results["%s:%s" % (lib, scheme)]
            assert status == "error", (lib, scheme, text)
            assert "does not tunnel" in text and "AGENSHIELD_TRANSPORT=auto" in text, (lib, scheme, text)
    assert tcp_listener.settle() == 0


def test_selftest_and_log_say_which_transport_and_why(env: ShimEnv, daemon: Any, broker: Any) -> None:
    daemon_env = {"AGENSHIELD_BROKER_HOST": "127.0.0.1", "AGENSHIELD_BROKER_PORT": str(daemon.port)}
    result = env.run("import sys; from agenshield_shim.selftest import main; sys.exit(main(['--json']))",
                     env=daemon_env, timeout=120)
    report = json.loads(result.stdout)
    assert report["transport"] == "rpc" and "auto" in report["transportReason"], report
    assert "serves /rpc only" in report["transportReason"]
    assert report["success"] and report["routed"], report  # every installed library, end to end, by rpc
    result = env.run("import sys; from agenshield_shim.selftest import main; sys.exit(main(['--json']))",
                     env=dict(daemon_env, AGENSHIELD_BROKER_SOCKET=daemon.socket_path), timeout=120)
    report = json.loads(result.stdout)
    assert report["success"] and report["transport"] == "rpc" and "Unix socket" in report["transportReason"], report
    result = env.run("import sys; from agenshield_shim.selftest import main; sys.exit(main(['--json']))",
                     env=broker.env, timeout=120)
    report = json.loads(result.stdout)
    assert report["transport"] == "tunnel" and "tunnel extension" in report["transportReason"], report
    # the info log names the choice, once, at the first hooked connection
    result = env.run("import urllib.request\ntry:\n    urllib.request.urlopen('http://127.0.0.2:9/', timeout=5)\n"
                     "except OSError:\n    pass", env=dict(daemon_env, AGENSHIELD_LOG_LEVEL="info"))
    assert result.stderr.count("transport rpc for the broker at 127.0.0.1:%d" % daemon.port) == 1, result.stderr
    assert os.path.exists(daemon.audit_file)


def test_os_layer_with_the_daemon(env: ShimEnv, daemon: Any, upstream: Any, tmp_path: Any) -> None:
    """``wrapper --sandbox netns`` with the daemon's Unix socket: the shim inside speaks rpc over it."""
    from .test_os_layer import _need_backend, make_wrapper, run as run_wrapped

    wrapper = make_wrapper(env, daemon, tmp_path / "agent-python", _need_backend())
    tag = uuid.uuid4().hex
    code = ("import json, ssl, sys, urllib.request\n"
            "ctx = ssl.create_default_context(cafile=sys.argv[3])\n"
            "for base in sys.argv[1:3]:\n"
            "    with urllib.request.urlopen(base + '/echo?tag=' + sys.argv[4], context=ctx, timeout=10) as r:\n"
            "        print(r.status, json.loads(r.read())['path'])\n")
    mark = len(daemon.audit())
    result = run_wrapped(wrapper, "-c", code, upstream.http_url, upstream.https_url, str(upstream.ca_file), tag)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == ["200 /echo", "200 /echo"]
    calls = [e for e in daemon.audit(mark) if e.get("operation") == "http_request" and tag in str(e.get("target"))]
    assert len(calls) == 2 and {e["channel"] for e in calls} == {"socket"}, calls
