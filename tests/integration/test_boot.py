"""The boot: disabled means untouched, bad configuration and a broken install fail closed."""

import json
import shutil
import textwrap
from pathlib import Path
from typing import Set

import pytest

from .conftest import Listener, ShimEnv

CONNECT = textwrap.dedent(
    """
    import socket, sys
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close(); print("CONNECTED")
    except OSError as e:
        print("BLOCKED", type(e).__name__, e)
    """
)

SNAPSHOT = textwrap.dedent(
    """
    import json, sys, socket
    print(json.dumps({
        "modules": sorted(sys.modules),
        "meta_path": [type(f).__name__ for f in sys.meta_path],
        "create_connection": socket.create_connection.__module__,
        "patched": hasattr(socket.create_connection, "__agenshield_original__"),
    }))
    """
)


def test_disabled_interpreter_is_untouched(shim: ShimEnv, bare: ShimEnv, tcp_listener: Listener) -> None:
    for value in ("false", "0", "no", "off", " FALSE "):
        disabled = json.loads(shim.run(SNAPSHOT, env={"AGENSHIELD_ENABLED": value}).stdout)
        plain = json.loads(bare.run(SNAPSHOT).stdout)
        # nothing of ours; only the codec site uses to read any .pth (bare venvs of 3.12+ have none)
        assert set(disabled["modules"]) - set(plain["modules"]) <= {"encodings.utf_8_sig"}
        assert set(plain["modules"]) - set(disabled["modules"]) == set()
        assert disabled["meta_path"] == plain["meta_path"]
        assert disabled["patched"] is False
        result = shim.run(CONNECT, tcp_listener.host, str(tcp_listener.port), env={"AGENSHIELD_ENABLED": value})
        assert result.stdout.strip() == "CONNECTED", result.stdout + result.stderr
        assert result.stderr == ""
    assert tcp_listener.settle() == 5


def imported(env: ShimEnv, imports: str = "") -> Set[str]:
    """``sys.modules`` of a new interpreter of ``env`` once it has run ``import json`` and ``imports``."""
    code = "import sys, json%s; print(json.dumps(sorted(sys.modules)))" % (", " + imports if imports else "")
    return set(json.loads(env.run(code).stdout))


def test_enabled_boot_imports_no_socket_asyncio_or_wrapt(shim: ShimEnv) -> None:
    modules = imported(shim)
    assert not modules & {"socket", "_socket", "asyncio", "wrapt", "logging", "ssl", "selectors"}, modules
    assert "agenshield_shim._boot" in modules
    # the boot is one module: each module imported at start costs every process (benchmarks/startup.py)
    assert sorted(m for m in modules if m.startswith("agenshield_shim")) == ["agenshield_shim", "agenshield_shim._boot"]
    # what closes the network at teardown loads with _socket (_ctypes), at exit only with --lock (atexit)
    assert "_ctypes" not in modules and "atexit" not in modules, modules


def test_hooks_bring_no_other_module_with_them(shim: ShimEnv, bare: ShimEnv) -> None:
    """A library's hook loads our modules and nothing the library itself does not: ``typing``
    alone costs 3.3-4.3 ms, which a program importing only ``socket`` does not otherwise pay."""
    hooked = imported(shim, "socket, http.client")
    plain = imported(bare, "socket, http.client")
    assert "agenshield_shim.hooks.http_client" in hooked
    # beside ours, only the codec site uses to read any .pth (bare venvs of 3.12+ have none),
    # __future__ (0.1 ms), for the ``from __future__ import annotations`` of the http.client hook,
    # and _ctypes, which the guard fetches at _socket's import to close the network at teardown
    # (_boot's teardown section)
    extra = {m for m in hooked - plain if m.partition(".")[0] != "agenshield_shim"}
    assert extra <= {"encodings.utf_8_sig", "__future__", "_ctypes"}, extra
    assert "_ctypes" in extra, extra


@pytest.mark.parametrize(
    "variable, value",
    [
        ("AGENSHIELD_BROKER_PORT", "abc"),
        ("AGENSHIELD_BROKER_PORT", "70000"),
        ("AGENSHIELD_LOG_LEVEL", "loud"),
        ("AGENSHIELD_ENABLED", "maybe"),
        ("AGENSHIELD_BROKER_HOST", "exa mple"),
        ("AGENSHIELD_ALLOW", "127.0.0.2"),
        ("AGENSHIELD_TRANSPORT", "carrier-pigeon"),
        ("AGENSHIELD_AUDIT_LOG", "relative.log"),
    ],
)
def test_malformed_configuration_blocks_everything(
    shim: ShimEnv, tcp_listener: Listener, variable: str, value: str
) -> None:
    result = shim.run(CONNECT, tcp_listener.host, str(tcp_listener.port), env={variable: value})
    lines = [line for line in result.stderr.splitlines() if line.startswith("agenshield-shim:")]
    assert len(lines) == 1, result.stderr
    assert variable in lines[0] and "blocked" in lines[0]
    assert result.stdout.startswith("BLOCKED NetworkBlockedError AgenShield: network blocked (invalid configuration")
    assert result.returncode == 0
    # even the would-be broker is refused: nobody can vouch for this configuration
    broker = Listener("127.0.0.1")
    try:
        out = shim.run(CONNECT, "127.0.0.1", str(broker.port), env={"AGENSHIELD_BROKER_PORT": str(broker.port), variable: value})
        assert out.stdout.startswith("BLOCKED"), out.stdout
        assert broker.settle() == 0
    finally:
        broker.close()
    assert tcp_listener.settle() == 0


def _site_packages_boot(env: ShimEnv) -> Path:
    return env.site_packages / "agenshield_shim" / "_boot.py"


@pytest.mark.parametrize("breakage", ["boot raises", "boot() raises", "package missing", "boot has a syntax error"])
def test_broken_install_fails_closed_and_can_be_uninstalled(
    fresh_shim: ShimEnv, tcp_listener: Listener, breakage: str
) -> None:
    boot = _site_packages_boot(fresh_shim)
    shutil.rmtree(boot.parent / "__pycache__", ignore_errors=True)
    if breakage == "boot raises":
        boot.write_text("raise RuntimeError('broken on purpose')\n")
    elif breakage == "boot() raises":
        boot.write_text("def boot():\n    raise RuntimeError('broken on purpose')\n")
    elif breakage == "boot has a syntax error":
        boot.write_text("def boot(:\n")
    else:
        shutil.rmtree(boot.parent)
    result = fresh_shim.run(CONNECT, tcp_listener.host, str(tcp_listener.port))
    lines = [line for line in result.stderr.splitlines() if line.startswith("agenshield-shim:")]
    assert len(lines) == 1, result.stderr
    assert "failed to start" in lines[0] and "all network access is blocked" in lines[0]
    assert result.stdout.startswith("BLOCKED ConnectionRefusedError AgenShield: network blocked"), result.stdout
    # DNS is refused as well
    dns = fresh_shim.run("import socket\ntry:\n socket.getaddrinfo('agenshield-test.invalid', 80)\nexcept OSError as e: print(type(e).__name__)")
    assert dns.stdout.strip() == "ConnectionRefusedError"
    # the .pth put site-packages first on sys.path to import the boot; it is gone again
    path = fresh_shim.run("import sys; print(sys.path.count(sys.argv[1]), sys.path.index(sys.argv[1]) > 0)",
                          str(fresh_shim.site_packages))
    assert path.stdout.split() == ["1", "True"], path.stdout + path.stderr
    # explicit opt-out still works, and pip can repair or remove the package
    off = fresh_shim.run(CONNECT, tcp_listener.host, str(tcp_listener.port), env={"AGENSHIELD_ENABLED": "false"})
    assert off.stdout.strip() == "CONNECTED"
    if breakage != "package missing":
        removed = fresh_shim.pip("uninstall", "-y", "agenshield-shim")
        assert removed.returncode == 0, removed.stderr
        assert not (fresh_shim.site_packages / "agenshield_shim.pth").exists()
        after = fresh_shim.run(CONNECT, tcp_listener.host, str(tcp_listener.port))
        assert after.stdout.strip() == "CONNECTED" and after.stderr == ""
        assert tcp_listener.settle() == 2
    else:
        assert tcp_listener.settle() == 1


def test_boot_is_idempotent(shim: ShimEnv) -> None:
    code = textwrap.dedent(
        """
        import site, sys
        from agenshield_shim import _boot
        site.addsitedir(sys.argv[1])  # runs every .pth line of site-packages again
        site.addsitedir(sys.argv[1])
        print(_boot._installs, sum(isinstance(f, _boot.PostImportFinder) for f in sys.meta_path))
        """
    )
    result = shim.run(code, str(shim.site_packages))
    assert result.stdout.split() == ["1", "1"], result.stderr


def test_shadowing_the_package_on_pythonpath_does_not_disable_the_guard(
    shim: ShimEnv, tcp_listener: Listener, tmp_path: Path
) -> None:
    fake = tmp_path / "agenshield_shim"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "_boot.py").write_text("def boot():\n    pass\n")
    code = "import agenshield_shim; print(agenshield_shim.__file__)\n" + CONNECT
    result = shim.run(code, tcp_listener.host, str(tcp_listener.port), env={"PYTHONPATH": str(tmp_path)})
    first, second = result.stdout.splitlines()[:2]
    assert first.startswith(str(shim.site_packages)), result.stdout
    assert second.startswith("BLOCKED NetworkBlockedError")
    assert tcp_listener.settle() == 0


def test_logging_levels_and_application_handlers(shim: ShimEnv, tcp_listener: Listener) -> None:
    args = (tcp_listener.host, str(tcp_listener.port))
    default = shim.run(CONNECT, *args)
    assert default.stderr.count("agenshield_shim: WARNING: direct connection to 127.0.0.2") == 1, default.stderr
    quiet = shim.run(CONNECT, *args, env={"AGENSHIELD_LOG_LEVEL": "error"})
    assert quiet.stderr == "" and quiet.stdout.startswith("BLOCKED")
    debug = shim.run("import logging\n" + CONNECT, *args, env={"AGENSHIELD_LOG_LEVEL": "debug"})
    assert "agenshield_shim: DEBUG: agenshield-shim active" in debug.stderr
    app = textwrap.dedent(
        """
        import logging, sys
        logging.basicConfig(stream=sys.stdout, format="APP %(name)s %(levelname)s %(message)s")
        """
    ) + CONNECT
    routed = shim.run(app, *args)
    assert "APP agenshield_shim WARNING direct connection to 127.0.0.2" in routed.stdout
    assert routed.stderr == ""  # the application's handler took it: no second copy
    assert tcp_listener.settle() == 0


def test_audit_log_has_one_json_line_per_refusal(shim: ShimEnv, tcp_listener: Listener, tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    code = CONNECT + "\nimport socket\ntry:\n    socket.getaddrinfo('agenshield-test.invalid', 443)\nexcept OSError: pass\n"
    shim.run(code, tcp_listener.host, str(tcp_listener.port), env={"AGENSHIELD_AUDIT_LOG": str(log)})
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["target"] for r in records] == ["127.0.0.2:%d" % tcp_listener.port, "agenshield-test.invalid:443"]
    for record in records:
        assert record["allowed"] is False and record["result"] == "blocked"
        assert set(record) >= {"id", "timestamp", "operation", "channel", "policyId", "durationMs", "metadata"}
    assert log.stat().st_mode & 0o777 == 0o600


def test_lock_file_cannot_be_overridden_by_the_environment(fresh_shim: ShimEnv, tcp_listener: Listener) -> None:
    (fresh_shim.site_packages / "agenshield_shim.lock").write_text("AGENSHIELD_BROKER_PORT=7000\n")
    args = (tcp_listener.host, str(tcp_listener.port))
    for env in ({"AGENSHIELD_ENABLED": "false"}, {"AGENSHIELD_ALLOW": "127.0.0.2:%d" % tcp_listener.port}):
        result = fresh_shim.run(CONNECT, *args, env=env)
        assert result.stdout.startswith("BLOCKED NetworkBlockedError"), result.stdout + result.stderr
        assert "use the broker at localhost:7000" in result.stdout
    assert tcp_listener.settle() == 0
    (fresh_shim.site_packages / "agenshield_shim.lock").unlink()
    assert fresh_shim.run(CONNECT, *args, env={"AGENSHIELD_ENABLED": "false"}).stdout.strip() == "CONNECTED"
