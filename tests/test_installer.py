"""Unit tests for the pure parts of install/verify/uninstall, the selftest and run (no interpreters started)."""

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agenshield_shim import _config, api, installer, run, selftest

LEGACY = textwrap.dedent('''\
    # AgenShield Python Network Isolation
    # Auto-generated - do not edit
    _AGENSHIELD_ENABLED = True
    _AGENSHIELD_BROKER_HOST = 'localhost'
    _AGENSHIELD_BROKER_PORT = 5200
    import socket
    _agenshield_patched = True
''')


# -- legacy sitecustomize ---------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    (LEGACY, True),
    ("# AgenShield Python Network Isolation\n", True),
    ("_agenshield_patched = True\n_AGENSHIELD_BROKER_PORT = 6969\n", True),  # header edited away
    ("_agenshield_patched = True\n", False),
    ("# my own sitecustomize\nimport os\n", False),
    ("# mentions AgenShield, but is not its patch\n", False),
])
def test_legacy_marker(text: str, expected: bool) -> None:
    assert installer.is_legacy_sitecustomize(text) is expected


def test_find_legacy_and_move_aside(tmp_path: Path) -> None:
    legacy_dir = tmp_path / "a"
    own_dir = tmp_path / "b"
    legacy_dir.mkdir()
    own_dir.mkdir()
    (legacy_dir / "sitecustomize.py").write_text(LEGACY)
    (own_dir / "sitecustomize.py").write_text("import os\n")
    cache = legacy_dir / "__pycache__"
    cache.mkdir()
    (cache / "sitecustomize.cpython-311.pyc").write_bytes(b"x")
    (cache / "other.cpython-311.pyc").write_bytes(b"x")
    candidates = [str(legacy_dir / "sitecustomize.py"), str(own_dir / "sitecustomize.py"),
                  str(legacy_dir / "sitecustomize.py"), str(tmp_path / "missing" / "sitecustomize.py"), ""]
    found = installer.find_legacy(candidates)
    assert [p.path for p in found] == [str(legacy_dir / "sitecustomize.py")]
    hint = found[0].removal_hint("/venv/bin/python")
    assert "--replace-legacy" in hint and "rm " in hint and "/api/proxy" in hint
    found[0].remove()
    assert not (legacy_dir / "sitecustomize.py").exists()
    assert (legacy_dir / ("sitecustomize.py" + installer.LEGACY_SUFFIX)).read_text() == LEGACY
    assert sorted(os.listdir(cache)) == ["other.cpython-311.pyc"]
    assert installer.find_legacy(candidates) == []


# -- lock file --------------------------------------------------------------------------------


def test_lock_file_is_what_the_boot_reads(tmp_path: Path) -> None:
    path = installer.write_lock(str(tmp_path), "LocalHost", 7000, "/venv/bin/python")
    assert os.path.basename(path) == _config.LOCK_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert _config.read_lock(path) == {"AGENSHIELD_BROKER_HOST": "localhost", "AGENSHIELD_BROKER_PORT": "7000"}
    config = _config.load({"AGENSHIELD_ENABLED": "false", "AGENSHIELD_BROKER_PORT": "1"}, path)
    assert config.enabled and config.broker_port == 7000
    assert [p.name for p in tmp_path.iterdir()] == [_config.LOCK_FILE]  # no temporary file left


def test_lock_rejects_bad_values_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(_config.ShimConfigError):
        installer.write_lock(str(tmp_path), "bad host!", 6969)
    with pytest.raises(_config.ShimConfigError):
        installer.write_lock(str(tmp_path), "localhost", 70000)
    assert list(tmp_path.iterdir()) == []


def test_lock_comment_cannot_inject_a_setting(tmp_path: Path) -> None:
    path = installer.write_lock(str(tmp_path), "localhost", 6969, "/x\nAGENSHIELD_ALLOW=evil.example:443")
    assert "AGENSHIELD_ALLOW" not in _config.read_lock(path)


# -- argument parsing -------------------------------------------------------------------------


def test_install_arguments() -> None:
    args = installer.install_parser().parse_args(
        ["--python", "/v/bin/python", "--broker-host", "127.0.0.1", "--broker-port", "7001", "--lock",
         "--replace-legacy", "--wheel", "x.whl"])
    assert (args.python, args.broker_host, args.broker_port, args.lock, args.replace_legacy, args.wheel) == (
        "/v/bin/python", "127.0.0.1", 7001, True, True, "x.whl")
    defaults = installer.install_parser().parse_args(["--python", "p"])
    assert (defaults.broker_host, defaults.broker_port, defaults.lock, defaults.wheel) == (None, None, False, None)


@pytest.mark.parametrize("argv", [[], ["--python", "p", "--broker-port", "0"], ["--python", "p", "--broker-port", "x"],
                                  ["--python", "p", "--broker-host", "a b"]])
def test_install_arguments_refused(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        installer.install_parser().parse_args(argv)
    assert exc.value.code == 2


def test_cli_defaults_come_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("AGENSHIELD_BROKER_HOST", "127.0.0.1")
    monkeypatch.setenv("AGENSHIELD_BROKER_PORT", "7002")
    patcher = installer._patcher(installer.verify_parser().parse_args(["--python", "p"]))
    assert (patcher.broker_host, patcher.broker_port) == ("127.0.0.1", 7002)
    patcher = installer._patcher(installer.verify_parser().parse_args(["--python", "p", "--broker-port", "1"]))
    assert patcher.broker_port == 1


def test_run_arguments() -> None:
    args = run.parse_args(["--allow", "api.example.com:443", "--allow", "x", "--sandbox", "auto", "--",
                           "python", "-c", "pass", "--allow"])
    assert args.allow == ["api.example.com:443", "x"] and args.sandbox == "auto"
    assert args.command == ["python", "-c", "pass", "--allow"]
    assert run.parse_args(["echo", "hi"]).command == ["echo", "hi"]


@pytest.mark.parametrize("argv", [[], ["--"], ["--sandbox", "seatbelt", "--", "x"], ["--policy", "/nonexistent", "--", "x"]])
def test_run_arguments_refused(argv) -> None:
    with pytest.raises(SystemExit) as exc:
        run.parse_args(argv)
    assert exc.value.code == 2


def test_run_configured_broker_is_strict() -> None:
    assert run.configured_broker({}) == ("localhost", 6969)
    assert run.configured_broker({"AGENSHIELD_BROKER_PORT": "7003"}) == ("localhost", 7003)
    with pytest.raises(_config.ShimConfigError):
        run.configured_broker({"AGENSHIELD_BROKER_PORT": "0"})


# -- JSON shapes ------------------------------------------------------------------------------


SEED_FIELDS = {"success", "pythonVersion", "shimInstalled", "networkBlocked", "brokerAccessible", "details"}


def test_verify_payload_has_the_seed_fields() -> None:
    report = {
        "success": True, "pythonVersion": "Python 3.11.7", "shimActive": True, "shimVersion": "0.1.0",
        "networkBlocked": True, "brokerAccessible": True, "routed": True, "broker": "localhost:6969",
        "checks": [{"name": "shim active", "status": "PASS", "detail": "agenshield-shim 0.1.0"}],
    }
    payload = installer.verify_payload(report, 0, "")
    assert SEED_FIELDS <= set(payload)
    assert payload["success"] is True and payload["details"] == ["PASS shim active: agenshield-shim 0.1.0"]
    assert installer.verify_payload(dict(report, routed=False), 0, "")["success"] is False
    assert installer.verify_payload(report, 1, "")["success"] is False
    json.dumps(payload)


def test_verify_payload_when_the_checks_did_not_run() -> None:
    payload = installer.verify_payload({}, 1, "Traceback ...\nSyntaxError: invalid syntax")
    assert payload["success"] is False and payload["pythonVersion"] == "unknown"
    assert "SyntaxError" in payload["details"][0]
    result = installer.VerifyResult(payload, 1)
    assert not result.success and not result.shim_installed and result.python_version == "unknown"


def test_selftest_report_shape() -> None:
    shim = selftest.ShimState("localhost", 6969)
    report = selftest.Report(shim)
    report.add(selftest.Check("guard: direct TCP", selftest.PASS, "refused"))
    report.add(selftest.Check("broker reachable", selftest.FAIL, "down"))
    report.add(selftest.Check("routed: httpx", selftest.SKIP, "not installed"))
    data = report.as_dict()
    assert SEED_FIELDS - {"details"} <= set(data)
    assert data["networkBlocked"] is True and data["brokerAccessible"] is False and data["success"] is False
    assert [c["status"] for c in data["checks"]] == ["PASS", "FAIL", "SKIP"]
    assert report.checks[1].line() == "FAIL  broker reachable: down"


def test_selftest_source_runs_on_python_38() -> None:
    """verify runs selftest.py's source in the target: it must compile as 3.8 code."""
    import ast

    source = Path(selftest.__file__).read_text(encoding="utf-8")
    ast.parse(source, feature_version=(3, 8))


def test_unchunk() -> None:
    assert selftest._unchunk(b"4\r\nWiki\r\n5;x=y\r\npedia\r\n0\r\n\r\n") == b"Wikipedia"


# -- run helpers ------------------------------------------------------------------------------


def test_python_of_a_command(tmp_path: Path) -> None:
    assert run._python_of([sys.executable]) == sys.executable
    script = tmp_path / "tool"
    script.write_text("#!%s\nprint(1)\n" % sys.executable)
    script.chmod(0o755)
    assert run._python_of([str(script)]) == sys.executable
    env_script = tmp_path / "tool2"
    env_script.write_text("#!/usr/bin/env python3\n")
    env_script.chmod(0o755)
    assert run._python_of([str(env_script)]) is not None
    shell = tmp_path / "tool3"
    shell.write_text("#!/bin/sh\necho\n")
    shell.chmod(0o755)
    assert run._python_of([str(shell)]) is None
    assert run._python_of(["/nonexistent/thing"]) is None


def test_run_child_status() -> None:
    assert run.run_child([sys.executable, "-c", "raise SystemExit(5)"], dict(os.environ)) == 5
    killed = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    assert run.run_child([sys.executable, "-c", killed], dict(os.environ)) == 128 + 9


def test_child_env_switches_the_shim_on(monkeypatch) -> None:
    monkeypatch.setenv("AGENSHIELD_ENABLED", "false")
    env = run.child_env(run.Broker("localhost", 7004, None))
    assert "AGENSHIELD_ENABLED" not in env
    assert env["AGENSHIELD_BROKER_PORT"] == "7004" and env["AGENSHIELD_BROKER_HOST"] == "localhost"


# -- the Python API ---------------------------------------------------------------------------


def test_api_names_and_lazy_loading() -> None:
    code = ("import sys; from agenshield_shim import api; "
            "assert 'agenshield_shim.wrapper' not in sys.modules and 'agenshield_shim.sandbox.seatbelt' not in sys.modules; "
            "assert callable(api.generate_python_wrapper) and callable(api.generate_sandbox_profile); "
            "assert api.PythonPatcher.__name__ == 'PythonPatcher'")
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root, AGENSHIELD_ENABLED="false")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root)
    assert set(api.__all__) >= {"PythonPatcher", "generate_python_wrapper", "generate_sandbox_profile"}
    with pytest.raises(AttributeError):
        api.nothing_here  # noqa: B018


def test_patcher_validates_its_arguments() -> None:
    with pytest.raises(_config.ShimConfigError):
        installer.PythonPatcher("/p", broker_port=0)
    patcher = installer.PythonPatcher("/p")
    assert (patcher.broker_host, patcher.broker_port, patcher.lock) == ("localhost", 6969, False)


def test_old_python_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nprintf 3.7.16\n")
    fake.chmod(0o755)
    with pytest.raises(installer.InstallError, match=r"Python 3\.7\.16; agenshield-shim needs Python 3\.8"):
        installer.Target(str(fake))
