"""httpx2 (the maintained fork of httpx, its own module names) is routed exactly like httpx.

httpx2 is one line of ``_boot.HOOKS``: the httpx hook patches whichever module object it is given.
So the proof is the httpx tests themselves: the same client suites (``test_routing_async``'s for
the tunnel, ``test_rpc_httpx``'s for rpc) run here with ``import httpx2 as httpx``, and every httpx
test of those modules that reads only a suite's results is asserted again on httpx2's, one test
each; HTTP/2 through the tunnel too. Then the version matrix: the oldest httpx2 (2.0.0, on the oldest
Python it supports) and the newest, under both transports.
"""

import inspect
import socket
import subprocess
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

from . import test_routing_async as tunnel_tests
from . import test_rpc_httpx as rpc_tests
from .conftest import ShimEnv, clean_env
from .test_routing_async import (HTTP2_SUITE, HTTPX_SUITE, H2_SERVER, SMOKE_SUITE, assert_refusal, echo_query, error,
                                 run_suite, upload_sha, value)
from .test_rpc_httpx import RPC, RPC_SUITE

pytestmark = pytest.mark.timeout(600)

NEWEST = ("3.11", "httpx2[http2]")


def as_httpx2(code: str) -> str:
    """A suite written for httpx, run on httpx2 (same API, its own module name)."""
    out = code.replace("import httpx\n", "import httpx2 as httpx\n")
    assert out != code and "httpx2" in out
    return out


def reused(module: Any, *fixtures: str) -> List[Any]:
    """The tests of ``module`` that read only one of ``fixtures`` (a suite's results), ``tag`` and
    ``upstream``, with their ``tag`` parameters: ``pytest.param(test, fixture, tag)``."""
    cases = []
    for name, test in sorted(vars(module).items()):
        if not name.startswith("test_") or not callable(test):
            continue
        params = set(inspect.signature(test).parameters)
        fixture = next((f for f in fixtures if f in params), None)
        if fixture is None or params - {fixture, "tag", "upstream"}:
            continue
        tags: List[Optional[str]] = [None]
        for mark in getattr(test, "pytestmark", []):
            if mark.name == "parametrize" and mark.args[0] == "tag":
                tags = list(mark.args[1])
        for tag in tags:
            cases.append(pytest.param(test, fixture, tag, id=name + ("" if tag is None else "[%s]" % tag)))
    assert len(cases) > 10, "the httpx tests to reuse were not found in %s" % module.__name__
    return cases


def call(test: Callable[..., None], fixture: str, results: Dict[str, Any], tag: Optional[str], upstream: Any) -> None:
    kwargs: Dict[str, Any] = {fixture: results}
    params = inspect.signature(test).parameters
    if tag is not None:
        kwargs["tag"] = tag
    if "upstream" in params:
        kwargs["upstream"] = upstream
    test(**kwargs)


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hx2_env(shim_env_factory: Any) -> ShimEnv:
    return shim_env_factory(*NEWEST)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def hx2_tunnel_results(hx2_env: ShimEnv, broker: Any, upstream: Any) -> Dict[str, Any]:
    mark = broker.mark()
    results = run_suite(hx2_env, as_httpx2(HTTPX_SUITE), broker, upstream)
    results["audit"] = broker.audit(mark)
    return results


@pytest.fixture(scope="module")
def hx2_rpc_results(hx2_env: ShimEnv, rpc_broker: Any, upstream: Any) -> Dict[str, Any]:
    mark = rpc_broker.mark()
    results = run_suite(hx2_env, as_httpx2(HTTPX_SUITE), rpc_broker, upstream, extra_env=RPC)
    results["audit"] = rpc_broker.audit(mark)
    results["mode"], results["broker"] = "rpc", rpc_broker  # what test_rpc_httpx's suite fixtures carry
    return results


@pytest.fixture(scope="module")
def hx2_rpc_extra_results(hx2_env: ShimEnv, rpc_broker: Any, upstream: Any) -> Dict[str, Any]:
    probe = socket.socket()  # a loopback port nothing listens on: the upstream the broker cannot reach
    probe.bind(("127.0.0.1", 0))
    dead_port = probe.getsockname()[1]
    probe.close()
    mark = rpc_broker.mark()
    results = run_suite(hx2_env, as_httpx2(RPC_SUITE), rpc_broker, upstream, extra_env=RPC, dead_port=dead_port)
    results["audit"] = rpc_broker.audit(mark)
    return results


# -- the httpx tests, on httpx2 -------------------------------------------------------------------


@pytest.mark.parametrize("test, fixture, tag", reused(tunnel_tests, "httpx_results"))
def test_httpx2_tunnel(test: Callable[..., None], fixture: str, tag: Optional[str],
                       hx2_tunnel_results: Dict[str, Any], upstream: Any) -> None:
    call(test, fixture, hx2_tunnel_results, tag, upstream)


@pytest.mark.parametrize("test, fixture, tag", reused(rpc_tests, "rpc_results", "suite_results"))
def test_httpx2_rpc(test: Callable[..., None], fixture: str, tag: Optional[str], hx2_rpc_results: Dict[str, Any],
                    upstream: Any) -> None:
    call(test, fixture, hx2_rpc_results, tag, upstream)


@pytest.mark.parametrize("test, fixture, tag", reused(rpc_tests, "extra_results"))
def test_httpx2_rpc_extra(test: Callable[..., None], fixture: str, tag: Optional[str],
                          hx2_rpc_extra_results: Dict[str, Any], upstream: Any) -> None:
    call(test, fixture, hx2_rpc_extra_results, tag, upstream)


@pytest.fixture(scope="module")
def hx2_h2_upstream(hx2_env: ShimEnv, upstream: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    pem = tmp_path_factory.mktemp("hx2-h2") / "server.pem"
    upstream.ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    process = subprocess.Popen([hx2_env.python, "-c", H2_SERVER, str(pem)], stdout=subprocess.PIPE, text=True,
                               env=clean_env(AGENSHIELD_ENABLED="false"))
    try:
        assert process.stdout is not None
        yield int(process.stdout.readline())
    finally:
        process.terminate()
        process.wait(10)


def test_httpx2_http2_through_the_tunnel(hx2_env: ShimEnv, broker: Any, upstream: Any, hx2_h2_upstream: int) -> None:
    """``http2=True``: HTTP/2 negotiated with the real host inside the broker's tunnel (ALPN)."""
    mark = broker.mark()
    results = run_suite(hx2_env, as_httpx2(HTTP2_SUITE), broker, upstream, h2_url="https://localhost:%d" % hx2_h2_upstream)
    answers = value(results, "async")
    assert [a[0] for a in answers] == ["HTTP/2"] * 20
    assert [echo_query(a[2]) for a in answers] == [{"h2": [str(i)]} for i in range(20)]
    version, status, echo = value(results, "sync")
    assert (version, status, echo_query(echo)) == ("HTTP/2", 200, {"h2": ["sync"]})
    assert broker.connects("localhost:%d" % hx2_h2_upstream, mark)


def test_httpx2_is_one_line_of_registration() -> None:
    """The fork is registered to the httpx hook itself, not to a module of its own."""
    from agenshield_shim import _boot

    hooks = dict(_boot.HOOKS)
    assert hooks["httpx2"] == hooks["httpx"] == "agenshield_shim.hooks.httpx:install"


# -- versions -------------------------------------------------------------------------------------

MATRIX = [
    pytest.param("3.9", "httpx2==2.0.0", "2.0.0", id="httpx2-2.0.0-oldest-py3.9"),
    pytest.param(*NEWEST, "2.", id="httpx2-newest-py3.11"),
    pytest.param("3.13", "httpx2", "2.", id="httpx2-newest-py3.13"),
]


@pytest.mark.parametrize("transport", ["auto", "rpc"])
@pytest.mark.parametrize("version, requirement, prefix", MATRIX)
def test_httpx2_version_smoke(shim_env_factory: Any, broker: Any, rpc_broker: Any, upstream: Any, version: str,
                              requirement: str, prefix: str, transport: str) -> None:
    """GET and POST over HTTPS through the broker (sync and async), a refusal over HTTPS and HTTP."""
    env = shim_env_factory(version, requirement)
    chosen = broker if transport == "auto" else rpc_broker
    results = run_suite(env, as_httpx2(SMOKE_SUITE), chosen, upstream, libs=["httpx"],
                        extra_env={} if transport == "auto" else RPC)
    assert value(results, "httpx:version").startswith(prefix)
    status, echo = value(results, "httpx:get")
    assert status == 200 and echo_query(echo) == {"smoke": ["1"]}
    sent, answer = value(results, "httpx:post")
    assert upload_sha(answer) == sent
    status, echo = value(results, "httpx_async:get")
    assert status == 200 and echo_query(echo) == {"smoke": ["async"]}
    for check in ("httpx:refused", "httpx:refused_http"):
        entry = error(results, check)
        assert_refusal(entry, "HTTPStatusError", "example.com")
        assert entry["mro"][0].startswith("httpx2."), entry
