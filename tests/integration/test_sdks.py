"""The AI SDKs, each with its own default HTTP client, routed through the broker; refusals fast and clear.

openai (sync, async, streaming), anthropic, google-genai (sync), huggingface_hub's
``hf_hub_download`` (``HF_ENDPOINT``) and the mcp client (streamable HTTP and SSE), at their newest
releases, in one guarded environment; they talk to fake APIs and an MCP server on 127.0.0.1
(``sdk_server.py``), each pointed there by its base-URL setting, never given an HTTP client. Their
newest releases use httpx2, routed by the httpx hook. One interpreter run per broker exercises all
of them (``sdk_client.py``):

- the reference broker under the default transport (auto: the tunnel; plain-HTTP requests are
  forwarded and audited one by one);
- the AgenShield daemon 0.7.2 under the default transport (auto: rpc); MCP over SSE is left out
  there, because an SSE stream never ends and rpc carries whole bodies only.

Each broker's audit must show every request the fake server received. A destination the broker
refuses (127.0.0.2, where a listener proves nothing arrived) must fail within 1 s, with the SDK's
default retries, and "AgenShield" and the broker's reason must be in what the user sees (the
exception, its cause chain, or the exceptions inside a group).
"""

import json
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from .conftest import Listener, ShimEnv, clean_env, skip_unless_local

pytestmark = pytest.mark.timeout(900)

HERE = Path(__file__).resolve().parent
SDKS = ("openai", "anthropic", "mcp", "huggingface_hub", "google-genai")
MARK = "@@RESULTS@@"

#: check -> the text the SDK returns from the fake API
EXPECTED = {
    "openai:sync": "hello from fake openai", "openai:stream": "hello from fake openai",
    "openai:async": "hello from fake openai", "anthropic:sync": "hello from fake anthropic",
    "genai:sync": "hello from fake gemini", "hf:download": 19 * 64, "mcp:streamable": ["5"], "mcp:sse": ["5"],
}
#: refused check -> the exception type the user gets at the top
REFUSED = {
    "openai:denied:sync": "PermissionDeniedError", "anthropic:denied:sync": "PermissionDeniedError",
    "genai:denied:sync": "ClientError", "hf:denied:download": "LocalEntryNotFoundError",
    "mcp:denied:streamable": "ExceptionGroup", "mcp:denied:sse": "HTTPStatusError",
}


@pytest.fixture(scope="module")
def sdk_env(shim_env_factory: Any) -> ShimEnv:
    """Python 3.11 (google-genai 3 and httpx2 need it), every SDK at its newest release."""
    return shim_env_factory("3.11", *SDKS)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def sdk_server(sdk_env: ShimEnv) -> Iterator[Dict[str, str]]:
    """The fake APIs and MCP servers (outside the guard): base URLs ``api``, ``mcp``, ``sse``."""
    process = subprocess.Popen(
        [sdk_env.python, str(HERE / "sdk_server.py")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=clean_env(AGENSHIELD_ENABLED="false"),
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise AssertionError("sdk_server.py did not start: %s" % (process.stderr.read() if process.stderr else ""))
        ports = json.loads(line)
        yield {name: "http://127.0.0.1:%d" % port for name, port in ports.items()}
    finally:
        process.terminate()
        process.wait(15)


@pytest.fixture(scope="module")
def local_policy(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Like the daemon's built-in policy: 127.0.0.1 and localhost, not 127.0.0.2."""
    path = tmp_path_factory.mktemp("sdk-policy") / "local.toml"
    path.write_text('[[rules]]\nid = "local"\naction = "allow"\nhosts = ["127.0.0.1", "localhost"]\n')
    return str(path)


def seen(server: Dict[str, str]) -> List[str]:
    """What the fake API server received so far: ``"METHOD /path"``."""
    import urllib.request

    with urllib.request.urlopen(server["api"] + "/_seen", timeout=10) as answer:
        return json.loads(answer.read())  # type: ignore[no-any-return]


def run_client(env: ShimEnv, server: Dict[str, str], broker_env: Dict[str, str], denied: Listener,
               mcp_sse: bool = True) -> Dict[str, Any]:
    params = dict(server, denied="http://127.0.0.2:%d" % denied.port,
                  sdks=["openai", "anthropic", "genai", "hf", "mcp"], mcp_sse=mcp_sse)
    variables = dict(broker_env, HF_ENDPOINT=server["api"], HF_HUB_DISABLE_TELEMETRY="1",
                     HF_HUB_ETAG_TIMEOUT="10", HF_HUB_DOWNLOAD_TIMEOUT="10")
    result = env.run(open(HERE / "sdk_client.py").read(), json.dumps(params), env=variables, timeout=300)
    for line in result.stdout.splitlines():
        if line.startswith(MARK):
            results: Dict[str, Any] = json.loads(line[len(MARK):])
            return results
    raise AssertionError("client did not finish (rc %s):\n%s\n%s" % (result.returncode, result.stdout[-3000:],
                                                                    result.stderr[-6000:]))


def assert_sdks_work(results: Dict[str, Any], checks: Dict[str, Any]) -> None:
    failed = {name: results.get(name) for name, want in checks.items()
              if (results.get(name) or {}).get("value") != want}
    assert not failed, json.dumps(failed, indent=1)[:6000]


def assert_refusals(results: Dict[str, Any], refused: Dict[str, str], reason: str) -> None:
    """Each refusal: the SDK's own error at the top, within 1 s, AgenShield and the reason in view."""
    for name, exc_type in refused.items():
        entry = results.get(name)
        assert entry is not None and "error" in entry, (name, entry)
        assert entry["error"] == exc_type, (name, entry)
        assert entry["elapsed"] < 1.0, (name, entry)
        shown = "\n".join(entry["chain"])
        assert "AgenShield" in shown and reason in shown and "127.0.0.2" in shown, (name, shown)


def audited_paths(entries: List[Dict[str, Any]], base: str, operation: str) -> List[str]:
    """Paths of allowed requests to ``base`` in a broker's audit (``forward`` or ``http_request``)."""
    out = []
    for entry in entries:
        target = str(entry.get("target"))
        if entry.get("operation") == operation and entry.get("allowed") and target.startswith(base + "/"):
            out.append(target[len(base):].split("?", 1)[0])
    return out


def test_the_sdks_under_test_are_built_on_httpx2(sdk_env: ShimEnv) -> None:
    """What this module tests is httpx2's routing: each SDK's client module must be built on it."""
    code = ("import openai._base_client as o, anthropic._base_client as a, mcp.client.streamable_http as m\n"
            "print(*(getattr(x, 'httpx2', None) is not None for x in (o, a, m)))")
    result = sdk_env.run(code)
    assert result.stdout.split() == ["True", "True", "True"], result.stdout + result.stderr


def test_sdks_through_the_reference_broker(sdk_env: ShimEnv, sdk_server: Dict[str, str], start_broker: Any,
                                           local_policy: str, tcp_listener: Listener) -> None:
    broker = start_broker("--policy", local_policy)
    mark, before = broker.mark(), len(seen(sdk_server))
    results = run_client(sdk_env, sdk_server, broker.env, tcp_listener)
    print("versions:", results["versions"]["value"])
    assert_sdks_work(results, EXPECTED)
    assert_refusals(results, REFUSED, "not allowed")
    assert tcp_listener.settle() == 0
    audit = broker.audit(mark)
    # every request the fake API received went through the broker (plain HTTP: forwarded, one entry each)
    received = sorted(line.split(" ", 1)[1] for line in seen(sdk_server)[before:])
    assert received and sorted(audited_paths(audit, sdk_server["api"], "forward")) == received, audit[-20:]
    for name in ("mcp", "sse"):
        assert audited_paths(audit, sdk_server[name], "forward"), (name, audit[-20:])
    assert_not_retried(audit, "forward")


def assert_not_retried(audit: List[Dict[str, Any]], operation: str) -> None:
    """One refused request per call: no SDK retried the refusal (hf stops at its first request)."""
    denied = [str(e["target"]) for e in audit if e.get("operation") == operation and "127.0.0.2" in str(e.get("target"))]
    assert denied and not [e for e in audit if e.get("operation") == operation and "127.0.0.2" in str(e.get("target"))
                           and e.get("allowed")], audit[-20:]
    assert len(denied) == len(set(denied)), denied


def test_sdks_through_the_agenshield_daemon(sdk_env: ShimEnv, sdk_server: Dict[str, str], tcp_listener: Listener,
                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    """The published daemon serves only ``/rpc``: the default transport learns that and uses rpc."""
    from ..daemon import Daemon, DaemonUnavailable

    try:
        daemon = Daemon(tmp_path_factory.mktemp("sdk-daemon"))
    except DaemonUnavailable as exc:
        skip_unless_local(str(exc))
    try:
        mark, before = len(daemon.audit()), len(seen(sdk_server))
        env = {"AGENSHIELD_BROKER_HOST": "127.0.0.1", "AGENSHIELD_BROKER_PORT": str(daemon.port)}
        results = run_client(sdk_env, sdk_server, env, tcp_listener, mcp_sse=False)
        audit = daemon.audit(mark)
    finally:
        daemon.stop()
    assert_sdks_work(results, {k: v for k, v in EXPECTED.items() if k != "mcp:sse"})
    assert_refusals(results, {k: v for k, v in REFUSED.items() if k != "mcp:denied:sse"}, "is not allowed")
    assert tcp_listener.settle() == 0
    received = sorted(line.split(" ", 1)[1] for line in seen(sdk_server)[before:])
    assert received and sorted(audited_paths(audit, sdk_server["api"], "http_request")) == received, audit[-20:]
    assert audited_paths(audit, sdk_server["mcp"], "http_request"), audit[-20:]
    assert_not_retried(audit, "http_request")
