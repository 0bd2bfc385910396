"""The proxy variables: what the boot sets, and what run, wrapper and the netns entry give COMMAND.

The end-to-end proof (curl, git and uv through the broker, in and out of a network namespace) is in
tests/integration/test_proxy_env.py; here each place that writes them is checked, in this process.
"""

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from agenshield_shim import _boot, run, wrapper
from agenshield_shim.sandbox import netns

NAMES = _boot.PROXY_VARIABLES + _boot.NO_PROXY_VARIABLES


@pytest.fixture
def clean_proxies() -> Iterator[None]:
    """This process's proxy variables, restored after the test (the boot writes os.environ; a
    variable left behind would send every later test's urllib to a proxy)."""
    saved = {name: os.environ.pop(name) for name in NAMES if name in os.environ}
    try:
        yield
    finally:
        for name in NAMES:
            os.environ.pop(name, None)
        os.environ.update(saved)


def test_every_standard_name_both_cases_and_npm() -> None:
    assert set(_boot.PROXY_VARIABLES) == {"HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                                          "all_proxy", "npm_config_proxy", "npm_config_https_proxy"}
    assert _boot.proxy_environment("[::1]:7000") == {name: "http://[::1]:7000" for name in _boot.PROXY_VARIABLES}


def test_boot_replaces_a_proxy_and_drops_no_proxy_in_the_real_environment(clean_proxies: None) -> None:
    os.environ.update(HTTP_PROXY="http://corporate:3128", NO_PROXY="*", no_proxy="localhost")
    _boot.set_proxy_environment(os.environ, "localhost:7001")
    for name in _boot.PROXY_VARIABLES:
        assert os.environ[name] == "http://localhost:7001", name
    assert "NO_PROXY" not in os.environ and "no_proxy" not in os.environ
    # putenv was called: a child sees the same
    out = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('https_proxy'), os.environ.get('NO_PROXY'))"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["http://localhost:7001", "None"]
    _boot.set_proxy_environment(os.environ, "localhost:7001")  # already set: nothing changes
    assert os.environ["ALL_PROXY"] == "http://localhost:7001"


def test_boot_on_a_mapping_without_a_store() -> None:
    env = {"https_proxy": "http://elsewhere:1", "no_proxy": "*", "OTHER": "kept"}
    _boot.set_proxy_environment(env, "127.0.0.1:6969")
    assert env == dict(_boot.proxy_environment("127.0.0.1:6969"), OTHER="kept")


def test_no_proxy_holds_exactly_what_the_guard_allows(clean_proxies: None) -> None:
    os.environ["NO_PROXY"] = "*"
    _boot.set_proxy_environment(os.environ, "localhost:7001", (("db.local", 5432), ("::1", 8080)))
    assert os.environ["NO_PROXY"] == os.environ["no_proxy"] == "db.local:5432,[::1]:8080"
    import urllib.request

    assert urllib.request.proxy_bypass_environment("db.local:5432")  # Python's libraries go direct there
    assert not urllib.request.proxy_bypass_environment("db.local:5433")
    assert not urllib.request.proxy_bypass_environment("example.com:443")


def test_run_gives_command_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "*")
    monkeypatch.setenv("HTTPS_PROXY", "http://elsewhere:1")
    env = run.child_env(run.Broker("localhost", 7002, None))
    assert env["HTTPS_PROXY"] == env["npm_config_proxy"] == "http://localhost:7002"
    assert "NO_PROXY" not in env and env["AGENSHIELD_BROKER_PORT"] == "7002"


def test_netns_entry_names_the_relay() -> None:
    env = netns.child_environment({"no_proxy": "*", "KEEP": "1", "http_proxy": "http://x:1"}, 7003)
    assert env == dict(_boot.proxy_environment("127.0.0.1:7003"), KEEP="1")


def test_wrapper_writes_them_and_reserves_them(tmp_path: Path) -> None:
    out = tmp_path / "py"
    text = wrapper.generate_python_wrapper(os.path.realpath(sys.executable), str(out), sandbox="none",
                                           broker_port=7004)
    assert "HTTPS_PROXY=http://localhost:7004; export HTTPS_PROXY" in text
    assert "unset NO_PROXY no_proxy" in text
    with pytest.raises(wrapper.WrapperError, match="proxy variables point at the broker"):
        wrapper.generate_python_wrapper(os.path.realpath(sys.executable), str(out), sandbox="none",
                                        env={"HTTP_PROXY": "http://x:1"})


def test_the_fixture_leaves_nothing_behind() -> None:
    """Runs after the tests above in this file: none of them left a proxy variable set."""
    assert not [name for name in NAMES if os.environ.get(name, "").startswith("http://localhost:700")]
