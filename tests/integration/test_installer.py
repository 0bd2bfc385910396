"""install / verify / uninstall against real target interpreters, a real broker and real listeners.

The installer runs from this checkout (``python -m agenshield_shim``) in the test runner's Python;
each target is a fresh virtual environment without the shim.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from agenshield_shim.installer import LEGACY_SUFFIX

from .conftest import skip_unless_local as _skip_unless_local, PYTHONS, ROOT, Listener, ShimEnv, clean_env, make_venv

VERSIONS = [v for v in ("3.8", "3.11", "3.13") if v in PYTHONS]
LEGACY = "# AgenShield Python Network Isolation\n_agenshield_patched = True\nLEGACY_RAN = True\n"
CONNECT = "import socket, sys; socket.create_connection(('127.0.0.2', int(sys.argv[1])), timeout=5).close(); print('connected')"


def cli(*args: str, env: Dict[str, str] = None, python: str = sys.executable) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(
        [python, "-m", "agenshield_shim", *args], capture_output=True, text=True, timeout=600, cwd=str(ROOT),
        env=clean_env(PYTHONPATH=str(ROOT), **(env or {})) if python == sys.executable else clean_env(**(env or {})),
    )


@pytest.fixture(params=VERSIONS, ids=["py" + v for v in VERSIONS])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> ShimEnv:
    """A fresh virtual environment without the shim."""
    make_venv(PYTHONS[request.param], tmp_path / "target")
    return ShimEnv(request.param, tmp_path / "target")


@pytest.fixture
def listener() -> "Listener":
    server = Listener("127.0.0.2")
    yield server
    server.close()


def test_install_verify_lock_uninstall(target: ShimEnv, wheel: Path, broker, listener: Listener) -> None:
    result = cli("install", "--python", target.python, "--wheel", str(wheel), "--lock",
                 "--broker-host", broker.host, "--broker-port", str(broker.port))
    assert result.returncode == 0, result.stderr
    assert "installed" in result.stdout and "locked to broker" in result.stdout
    lock = target.site_packages / "agenshield_shim.lock"
    assert lock.is_file() and (target.site_packages / "agenshield_shim.pth").is_file()

    verified = cli("verify", "--python", target.python, "--json", env=broker.env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    data = json.loads(verified.stdout)
    assert data["success"] and data["shimInstalled"] and data["networkBlocked"] and data["brokerAccessible"]
    assert data["pythonVersion"].startswith("Python " + target.version)
    assert any("routed request" in d and d.startswith("PASS") for d in data["details"]), data["details"]
    assert data["locked"] is True

    # the lock: the environment cannot switch the shim off, nor point it elsewhere
    off = target.run(CONNECT, str(listener.port), env={"AGENSHIELD_ENABLED": "false", "AGENSHIELD_BROKER_PORT": "1"})
    assert off.returncode != 0 and "NetworkBlockedError" in off.stderr, off.stdout + off.stderr
    assert "use the broker at %s:%d" % (broker.host, broker.port) in off.stderr
    assert listener.settle() == 0

    removed = cli("uninstall", "--python", target.python)
    assert removed.returncode == 0, removed.stderr
    leftovers = [p.name for p in target.site_packages.iterdir() if p.name.startswith("agenshield")]
    assert leftovers == []
    opened = target.run(CONNECT, str(listener.port))
    assert opened.returncode == 0 and "connected" in opened.stdout, opened.stderr
    assert listener.settle() == 1


def test_verify_fails_when_the_broker_is_down(target: ShimEnv, wheel: Path, dead_broker_port: int) -> None:
    assert cli("install", "--python", target.python, "--wheel", str(wheel)).returncode == 0
    result = cli("verify", "--python", target.python, "--broker-port", str(dead_broker_port))
    assert result.returncode == 1
    assert "FAIL broker reachable: localhost:%d: ConnectionRefusedError" % dead_broker_port in result.stdout
    assert "PASS guard: direct TCP" in result.stdout and "verify: FAILED" in result.stdout
    data = json.loads(cli("verify", "--python", target.python, "--json", "--broker-port", str(dead_broker_port)).stdout)
    assert data["success"] is False and data["brokerAccessible"] is False and data["networkBlocked"] is True


def test_verify_fails_without_the_shim(tmp_path: Path, broker) -> None:
    version = VERSIONS[-1]
    make_venv(PYTHONS[version], tmp_path / "bare")
    bare = ShimEnv(version, tmp_path / "bare")
    result = cli("verify", "--python", bare.python, "--json", env=broker.env)
    data = json.loads(result.stdout)
    assert result.returncode == 1 and not data["shimInstalled"] and not data["networkBlocked"]
    assert any("not installed" in d for d in data["details"]), data["details"]


def test_install_with_the_shim_switched_off_in_the_caller(target: ShimEnv, wheel: Path, broker) -> None:
    """The caller's AGENSHIELD_ENABLED=false must not leak into verify (it would test nothing)."""
    assert cli("install", "--python", target.python, "--wheel", str(wheel)).returncode == 0
    result = cli("verify", "--python", target.python, env=dict(broker.env, AGENSHIELD_ENABLED="false"))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("old", ["3.7", "3.6"])
def test_old_python_refused(old: str, tmp_path: Path) -> None:
    found = sorted(Path(os.path.expanduser("~/.pyenv/versions")).glob("%s.*/bin/python%s" % (old, old)))
    if not found:
        _skip_unless_local("no Python %s here" % old)
    result = cli("install", "--python", str(found[0]))  # refused before any wheel is looked for
    assert result.returncode == 1
    assert "is Python %s." % old in result.stderr and "needs Python 3.8 or newer" in result.stderr


def test_legacy_sitecustomize(target: ShimEnv, wheel: Path) -> None:
    legacy = target.site_packages / "sitecustomize.py"
    legacy.write_text(LEGACY)
    result = cli("install", "--python", target.python, "--wheel", str(wheel))
    assert result.returncode == 0
    assert "old AgenShield patcher" in result.stderr and "--replace-legacy" in result.stderr and str(legacy) in result.stderr
    assert legacy.is_file()

    result = cli("install", "--python", target.python, "--wheel", str(wheel), "--replace-legacy")
    assert result.returncode == 0 and "moved the old AgenShield sitecustomize.py aside" in result.stderr
    assert not legacy.exists() and (target.site_packages / ("sitecustomize.py" + LEGACY_SUFFIX)).is_file()
    ran = target.run("import sys; print(getattr(sys.modules.get('sitecustomize'), 'LEGACY_RAN', False))",
                     env={"AGENSHIELD_ENABLED": "false"})
    assert ran.stdout.strip() == "False"

    result = cli("uninstall", "--python", target.python, "--restore-original")
    assert result.returncode == 0, result.stderr
    assert [p.name for p in target.site_packages.iterdir() if p.name.startswith(("sitecustomize", "agenshield"))] == []


def test_python_api(tmp_path: Path, wheel: Path, broker) -> None:
    from agenshield_shim.api import PythonPatcher

    version = VERSIONS[len(VERSIONS) // 2]
    make_venv(PYTHONS[version], tmp_path / "t")
    env = ShimEnv(version, tmp_path / "t")
    patcher = PythonPatcher(env.python, broker_host=broker.host, broker_port=broker.port, wheel=str(wheel))
    installed = patcher.install()
    assert installed.success and installed.lock_file is None and installed.site_packages == str(env.site_packages)
    checked = patcher.verify()
    assert checked.success, checked.details
    assert set(checked.as_json()) >= {"success", "pythonVersion", "shimInstalled", "networkBlocked",
                                      "brokerAccessible", "details"}
    assert patcher.restore_original().success
    assert not PythonPatcher(env.python, broker_host=broker.host, broker_port=broker.port).verify().success


def test_wheel_built_from_the_checkout(tmp_path: Path, broker) -> None:
    """No --wheel, running from the source tree: the installer builds the wheel itself (and leaves the tree alone)."""
    version = VERSIONS[0]
    make_venv(PYTHONS[version], tmp_path / "t")
    env = ShimEnv(version, tmp_path / "t")
    before = {p.name for p in ROOT.iterdir()}
    result = cli("install", "--python", env.python)
    assert result.returncode == 0, result.stderr
    # other work may add files to the tree meanwhile: only build output of ours would be wrong
    assert not {p.name for p in ROOT.iterdir()} - before & {"build", "dist", "agenshield_shim.egg-info"}
    assert cli("verify", "--python", env.python, env=broker.env).returncode == 0


def test_wheel_repacked_from_an_installation(tmp_path: Path, wheel: Path, broker) -> None:
    """Installer run from an installed (and guarded) shim whose original wheel is gone: it repacks its own files."""
    version = VERSIONS[-1]
    gone = tmp_path / "gone" / wheel.name
    gone.parent.mkdir()
    shutil.copy(str(wheel), str(gone))
    make_venv(PYTHONS[version], tmp_path / "host")
    host = ShimEnv(version, tmp_path / "host")
    assert host.pip("install", "--no-index", str(gone)).returncode == 0
    shutil.rmtree(str(gone.parent))
    make_venv(PYTHONS[version], tmp_path / "t")
    env = ShimEnv(version, tmp_path / "t")
    result = cli("install", "--python", env.python, python=host.python)  # the host interpreter is guarded itself
    assert result.returncode == 0, result.stderr
    assert cli("verify", "--python", env.python, env=broker.env, python=host.python).returncode == 0
    names: List[str] = sorted(p.name for p in env.site_packages.iterdir() if p.name.startswith("agenshield"))
    assert names == ["agenshield_shim", "agenshield_shim-%s.dist-info" % wheel.name.split("-")[1], "agenshield_shim.pth"]
    assert (env.root / "bin" / "agenshield-shim").exists()  # console script regenerated from entry_points.txt
