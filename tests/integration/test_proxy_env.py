"""The proxy environment: what no hook knows (child processes above all) goes through the broker.

A guarded interpreter points ``HTTP(S)_PROXY``/``ALL_PROXY`` (both cases) and npm's proxy settings at
the broker and drops ``NO_PROXY``, whatever its parent had set. Its children inherit them: ``curl``,
``git clone`` over HTTP from a local smart-HTTP server (tests/integration/git_http.py) and
``uv pip install`` from the upstream's PEP 503 index reach loopback upstreams only through the broker
(its audit log shows each request), and a destination the broker refuses is refused. The same under
``agenshield-shim run --sandbox netns``, where the variables name the relay inside the namespace.
"""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from .conftest import ROOT, PYTHONS, ShimEnv, clean_env, make_venv, skip_unless_local
from .git_http import CONTENT, GitServer

MARK = "@@PROXYENV@@"
VERSION = next((v for v in ("3.11", "3.12", "3.13", "3.10") if v in PYTHONS), None)
NAMES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
         "npm_config_proxy", "npm_config_https_proxy", "NO_PROXY", "no_proxy")

#: Run in the guarded interpreter: its environment, and each child command's outcome.
CHILDREN = textwrap.dedent(
    '''
    import json, os, subprocess, sys
    P = json.loads(sys.argv[1])
    out = {"env": {k: os.environ.get(k) for k in P["names"]}}
    for name, argv in P["commands"]:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=180)
        out[name] = [r.returncode, r.stdout[-3000:], r.stderr[-3000:]]
    print(P["mark"] + json.dumps(out))
    '''
)


@pytest.fixture(scope="module")
def agent(shim_env_factory: Any) -> ShimEnv:
    if VERSION is None:
        skip_unless_local("no Python 3.10+")
    return shim_env_factory(VERSION)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitServer]:
    if shutil.which("git") is None:
        skip_unless_local("git is not installed")
    server = GitServer.start(tmp_path_factory.mktemp("git"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def uv(tmp_path_factory: pytest.TempPathFactory) -> str:
    """uv from the package index, in a venv of its own (no shim there: pip must reach the index)."""
    root = tmp_path_factory.mktemp("uv-venv")
    make_venv(sys.executable, root)
    result = subprocess.run([str(root / "bin" / "python"), "-m", "pip", "install", "-q", "uv"],
                            env=clean_env(AGENSHIELD_ENABLED="false"), capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        skip_unless_local("uv cannot be installed here: %s" % result.stderr[-500:])
    return str(root / "bin" / "uv")


def _curl(url: str, *extra: str) -> List[str]:
    return ["curl", "-sS", "-m", "30", "-w", "\\n%{http_code}", *extra, url]


def _commands(upstream: Any, git_server: GitServer, uv: str, target: Path, tag: str) -> List[Any]:
    return [
        ("curl_http", _curl(upstream.http_url + "/echo?tag=" + tag)),
        ("curl_https", _curl(upstream.https_url + "/echo?tag=" + tag, "--cacert", str(upstream.ca_file))),
        ("git", ["git", "-c", "http.lowSpeedTime=30", "clone", "-q", git_server.url, str(target / "clone")]),
        ("uv", [uv, "pip", "install", "--no-cache", "--python", sys.executable, "--target", str(target / "site"),
                "--index-url", upstream.http_url + "/simple/", "agenshield-probe"]),
    ]


def _run_children(agent: ShimEnv, env: Dict[str, str], commands: List[Any]) -> Dict[str, Any]:
    payload = json.dumps({"names": NAMES, "commands": commands, "mark": MARK})
    result = agent.run(CHILDREN, payload, env=env, timeout=600)
    for line in result.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])  # type: ignore[no-any-return]
    raise AssertionError("no result (rc %s):\n%s\n%s" % (result.returncode, result.stdout[-3000:], result.stderr[-3000:]))


def _ok(results: Dict[str, Any], name: str) -> List[Any]:
    code, out, err = results[name]
    assert code == 0, "%s failed (%d): %s %s" % (name, code, out, err)
    return [code, out, err]


def _assert_children_worked(results: Dict[str, Any], target: Path, tag: str) -> None:
    for name in ("curl_http", "curl_https"):
        out = _ok(results, name)[1]
        assert out.rstrip().endswith("200"), (name, out)
        assert json.loads(out.rstrip()[:-3])["query"] == [["tag", tag]], out
    _ok(results, "git")
    assert (target / "clone" / "hello.txt").read_text() == CONTENT
    _ok(results, "uv")
    assert list((target / "site").glob("agenshield_probe*")), list((target / "site").iterdir())


def _assert_broker_saw(audit: List[Dict[str, Any]], upstream: Any, git_server: GitServer, tag: str) -> None:
    """Every child's request is in the broker's audit log, allowed."""
    def seen(operation: str, needle: str) -> bool:
        return any(e.get("operation") == operation and needle in str(e.get("target")) and e.get("allowed")
                   for e in audit)

    assert seen("forward", "/echo?tag=" + tag), audit  # curl, http://: the broker forwards it
    assert seen("connect", "localhost:%d" % upstream.https_port), audit  # curl, https://: a CONNECT tunnel
    assert seen("forward", "127.0.0.1:%d/repo.git/info/refs" % git_server.port), audit  # git
    assert seen("forward", "/simple/agenshield-probe/"), audit  # uv


def test_guarded_interpreter_carries_the_proxy_environment(agent: ShimEnv, broker: Any) -> None:
    """Whatever the parent had set: the broker, in every variable; NO_PROXY gone."""
    env = dict(broker.env, HTTP_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               NO_PROXY="*", no_proxy="localhost,127.0.0.1")
    results = _run_children(agent, env, [("child", [agent.python, "-c", "import os; print(os.environ['ALL_PROXY'])"])])
    url = "http://127.0.0.1:%d" % broker.port
    assert results["env"] == dict({n: url for n in NAMES[:8]}, NO_PROXY=None, no_proxy=None), results["env"]
    assert results["child"][1].strip() == url  # a child Python inherits them (and sets nothing)
    off = _run_children(agent, dict(env, AGENSHIELD_ENABLED="false"), [])
    assert off["env"]["HTTP_PROXY"] == "http://127.0.0.1:9" and off["env"]["NO_PROXY"] == "*"  # shim off: untouched


def test_children_reach_the_network_through_the_broker(agent: ShimEnv, broker: Any, upstream: Any,
                                                       git_server: GitServer, uv: str, tmp_path: Path) -> None:
    mark = broker.mark()
    tag = "proxyenv-children"
    results = _run_children(agent, dict(broker.env, UV_NO_CONFIG="1"),
                            _commands(upstream, git_server, uv, tmp_path, tag))
    _assert_children_worked(results, tmp_path, tag)
    _assert_broker_saw(broker.audit(mark), upstream, git_server, tag)


def test_children_refused_by_the_broker(agent: ShimEnv, deny_broker: Any, upstream: Any) -> None:
    """deny_broker refuses the upstream's ports: the children hear it from the broker."""
    mark = deny_broker.mark()
    results = _run_children(agent, deny_broker.env, [
        ("http", _curl(upstream.http_url + "/echo?tag=proxyenv-refused", "-i")),
        ("https", _curl(upstream.https_url + "/echo?tag=proxyenv-refused", "--cacert", str(upstream.ca_file))),
    ])
    code, out, err = results["http"]
    assert out.rstrip().endswith("403") and "X-Proxy-Error: blocked-by-policy" in out, (code, out, err)
    code, out, err = results["https"]
    assert code == 56 and "403" in err, (code, out, err)  # curl: CONNECT tunnel failed, response 403
    assert upstream.request_count("proxyenv-refused") == 0
    refused = [e for e in deny_broker.audit(mark) if not e.get("allowed")]
    assert len(refused) == 2, deny_broker.audit(mark)


def test_children_under_run_sandbox_netns(agent: ShimEnv, upstream: Any, git_server: GitServer, uv: str,
                                          tmp_path: Path) -> None:
    """Inside the namespace only the relay leads out: the children find it through the variables."""
    from agenshield_shim.sandbox import netns

    try:
        netns.find_backend()
    except netns.NetnsUnavailable as exc:
        skip_unless_local(str(exc))
    import socket

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused_port = closed.getsockname()[1]  # denied by the policy below, and nothing listens: nothing to reach
    policy = tmp_path / "policy.toml"
    policy.write_text('[[rules]]\nid = "deny-one"\naction = "deny"\nhosts = ["127.0.0.1"]\nports = [%d]\n\n'
                      '[[rules]]\nid = "loopback"\naction = "allow"\nhosts = ["localhost", "127.0.0.0/8", "::1/128"]\n'
                      % refused_port)
    tag = "proxyenv-netns"
    target = tmp_path / "out"
    target.mkdir()
    commands = _commands(upstream, git_server, uv, target, tag)
    commands.append(("refused", _curl("http://127.0.0.1:%d/x" % refused_port)))
    script = "; ".join("%s >%s 2>&1; echo $? >%s.rc" % (" ".join(_quote(w) for w in argv), target / name, target / name)
                       for name, argv in commands)
    audit = tmp_path / "audit.jsonl"
    with closed:
        result = subprocess.run(
            [sys.executable, "-m", "agenshield_shim", "run", "--sandbox", "netns", "--policy", str(policy),
             "--audit", str(audit), "--", "sh", "-c", "env | grep -i _proxy >%s; %s" % (target / "env", script)],
            capture_output=True, text=True, timeout=600, cwd=str(ROOT),
            env=clean_env(PYTHONPATH=str(ROOT), UV_NO_CONFIG="1", AGENSHIELD_BROKER_PORT=str(_free_port())),
        )
    assert result.returncode == 0, result.stdout + result.stderr
    variables = dict(line.split("=", 1) for line in (target / "env").read_text().splitlines())
    assert variables["HTTPS_PROXY"].startswith("http://localhost:") and "NO_PROXY" not in variables, variables
    outcomes = {name: (int((target / (name + ".rc")).read_text()), (target / name).read_text()) for name, _ in commands}
    results = {name: [rc, text, ""] for name, (rc, text) in outcomes.items()}
    _assert_children_worked(results, target, tag)
    assert outcomes["refused"][1].rstrip().endswith("403"), outcomes["refused"]
    entries = [json.loads(line) for line in audit.read_text().splitlines() if line.strip()]
    _assert_broker_saw(entries, upstream, git_server, tag)
    assert any(not e.get("allowed") and str(refused_port) in str(e.get("target")) for e in entries), entries


def _quote(word: str) -> str:
    import shlex

    return shlex.quote(word)


def _free_port() -> int:
    import socket

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port: int = probe.getsockname()[1]
    probe.close()
    return port


def test_run_warns_once_when_the_broker_does_not_tunnel(start_broker: Any, upstream: Any) -> None:
    """The published daemon's protocol (/health and /rpc only): curl would say only "Empty reply"; run says why."""
    legacy = start_broker("--compat", "0.7.2")
    result = subprocess.run(
        [sys.executable, "-m", "agenshield_shim", "run", "--", "sh", "-c", "echo $HTTPS_PROXY; " +
         " ".join(_quote(w) for w in _curl(upstream.http_url + "/echo?tag=proxyenv-legacy"))],
        capture_output=True, text=True, timeout=120, cwd=str(ROOT),
        env=clean_env(PYTHONPATH=str(ROOT), AGENSHIELD_BROKER_HOST=legacy.host, AGENSHIELD_BROKER_PORT=str(legacy.port)),
    )
    assert result.stdout.splitlines()[0] == "http://%s:%d" % (legacy.host, legacy.port), result.stdout
    assert result.stderr.count("does not tunnel") == 1 and "curl" in result.stderr, result.stderr
    assert upstream.request_count("proxyenv-legacy") == 0


def test_hooked_libraries_do_not_see_the_broker_as_their_proxy(agent: ShimEnv, broker: Any) -> None:
    """urllib's ProxyHandler (a hook routes urllib) gets no proxy; a library without a hook gets the broker."""
    code = ("import json, urllib.request; print(json.dumps([urllib.request.ProxyHandler().proxies, "
            "urllib.request.getproxies()]))")
    result = agent.run(code, env=dict(broker.env, AGENSHIELD_ALLOW="127.0.0.1:5432"))
    assert result.returncode == 0, result.stderr
    handler, unknown = json.loads(result.stdout)
    url = "http://127.0.0.1:%d" % broker.port
    assert handler == {"no": "127.0.0.1:5432"}, handler
    # (npm_config_proxy reads as a scheme "npm_config" to urllib: harmless, no URL has that scheme)
    assert {k: unknown[k] for k in ("http", "https", "all", "no")} == {"http": url, "https": url, "all": url,
                                                                       "no": "127.0.0.1:5432"}, unknown
