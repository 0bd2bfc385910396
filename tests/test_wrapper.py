"""Wrapper scripts: what is written, how it is quoted, and that restore removes only our own files.

The scripts are run here with ``sandbox=none`` (and netns where the machine can create a
namespace); the sandboxed runs with a real broker are in tests/integration/test_os_layer.py.
"""

import io
import os
import shlex
import stat
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from agenshield_shim import wrapper
from agenshield_shim.sandbox import netns
from agenshield_shim.wrapper import WrapperError, generate_python_wrapper, is_wrapper, restore_wrapper

PY = os.path.realpath(sys.executable)


def run(script: Path, *args: str, **env: str) -> "subprocess.CompletedProcess[str]":
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AGENSHIELD_", "PYTHON"))}
    base["AGENSHIELD_ENABLED"] = "false"  # this interpreter has no shim; keep the test about the script
    base.update(env)
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=60, env=base)


def test_none_sets_the_configuration_and_passes_arguments(tmp_path: Path) -> None:
    out = tmp_path / "py"
    text = generate_python_wrapper(PY, str(out), sandbox="none", env={"FOO": "a b'c\"$HOME`x`"},
                                   broker_port=7001, broker_socket="/run/a b.sock")
    assert text == out.read_text()
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert is_wrapper(str(out))
    code = "import os, sys; print(repr([os.environ.get(k) for k in ('AGENSHIELD_BROKER_HOST', 'AGENSHIELD_BROKER_PORT', 'AGENSHIELD_BROKER_SOCKET', 'FOO')] + sys.argv[1:]))"
    result = run(out, "-c", code, "x y", "$HOME", "'", "")
    assert result.returncode == 0, result.stderr
    assert eval(result.stdout) == ["localhost", "7001", "/run/a b.sock", "a b'c\"$HOME`x`", "x y", "$HOME", "'", ""]


def test_exit_status_passes_through(tmp_path: Path) -> None:
    out = tmp_path / "py"
    generate_python_wrapper(PY, str(out), sandbox="none")
    assert run(out, "-c", "raise SystemExit(7)").returncode == 7


def test_every_word_is_quoted(tmp_path: Path) -> None:
    weird = tmp_path / "dir with space; $(touch pwned) 'q'"
    weird.mkdir()
    exe = weird / "python"
    exe.symlink_to(PY)
    out = weird / "wrap `x`"
    text = generate_python_wrapper(str(exe), str(out), sandbox="none", env={"A": "$(touch pwned2)\nnext"})
    lines = text.splitlines()
    assert lines[0] == "#!/bin/sh" and lines[1] == wrapper.MARKER
    exec_line = lines[-1]
    assert exec_line.startswith("exec ") and exec_line.endswith(' "$@"')
    assert shlex.split(exec_line[len("exec "):-len(' "$@"')]) == [str(exe)]
    result = run(out, "-c", "import os; print(repr(os.environ['A']))")
    assert result.returncode == 0, result.stderr
    assert eval(result.stdout) == "$(touch pwned2)\nnext"
    assert not list(tmp_path.rglob("pwned*")) and not Path("pwned").exists()


def test_restore_removes_only_our_wrapper(tmp_path: Path) -> None:
    out = tmp_path / "py"
    generate_python_wrapper(PY, str(out), sandbox="none")
    assert restore_wrapper(str(out)) == [str(out)]
    assert not out.exists()
    with pytest.raises(WrapperError, match="no such file"):
        restore_wrapper(str(out))


@pytest.mark.parametrize("content", [
    "#!/bin/sh\necho hi\n",
    "#!/bin/sh\n# agenshield-shim wrapper\n",  # close, but not the marker line
    "#!/bin/bash\n" + wrapper.MARKER + "\n",
    "echo\n" + wrapper.MARKER + "\n",
])
def test_restore_refuses_other_files(tmp_path: Path, content: str) -> None:
    other = tmp_path / "script"
    other.write_text(content)
    with pytest.raises(WrapperError, match="not written by"):
        restore_wrapper(str(other))
    assert other.read_text() == content


def test_restore_refuses_a_symlink_to_a_wrapper(tmp_path: Path) -> None:
    out = tmp_path / "py"
    generate_python_wrapper(PY, str(out), sandbox="none")
    link = tmp_path / "link"
    link.symlink_to(out)
    with pytest.raises(WrapperError):
        restore_wrapper(str(link))
    assert out.exists()


def test_generate_refuses_to_replace_other_files(tmp_path: Path) -> None:
    other = tmp_path / "py"
    other.write_text("precious\n")
    with pytest.raises(WrapperError, match="refusing to replace"):
        generate_python_wrapper(PY, str(other), sandbox="none")
    assert other.read_text() == "precious\n"
    with pytest.raises(WrapperError, match="interpreter itself"):
        generate_python_wrapper(PY, PY, sandbox="none")


def test_generate_replaces_its_own_wrapper(tmp_path: Path) -> None:
    out = tmp_path / "py"
    generate_python_wrapper(PY, str(out), sandbox="none", broker_port=1)
    generate_python_wrapper(PY, str(out), sandbox="none", broker_port=2)
    assert "AGENSHIELD_BROKER_PORT=2;" in out.read_text()


@pytest.mark.parametrize("kwargs, match", [
    ({"sandbox": "chroot"}, "--sandbox"),
    ({"env": {"BAD NAME": "x"}}, "shell variable"),
    ({"env": {"AGENSHIELD_BROKER_PORT": "1"}}, "its own option"),
    ({"broker_port": 0}, "1-65535"),
    ({"broker_socket": "relative.sock"}, "absolute"),
    ({"sandbox": "netns"}, "Unix socket"),
    ({"sandbox": "netns", "broker_socket": "/run/b.sock", "broker_host": "10.0.0.1"}, "loopback"),
])
def test_bad_arguments(tmp_path: Path, kwargs: Any, match: str) -> None:
    with pytest.raises(WrapperError, match=match):
        generate_python_wrapper(PY, str(tmp_path / "py"), **kwargs)
    assert not (tmp_path / "py").exists()


def test_seatbelt_wrapper_and_profile(tmp_path: Path) -> None:
    out = tmp_path / "py"
    ws = tmp_path / "ws"
    ws.mkdir()
    text = generate_python_wrapper(PY, str(out), sandbox="seatbelt", broker_port=7002,
                                   broker_socket="/run/b.sock", workspace=str(ws))
    profile = tmp_path / "py.sb"
    assert profile.exists()
    exec_words = shlex.split(text.splitlines()[-1][len("exec "):-len(' "$@"')])
    assert exec_words == ["/usr/bin/sandbox-exec", "-f", str(profile), PY]
    assert "AGENSHIELD_BROKER_HOST=127.0.0.1;" in text  # no resolver needed under seatbelt
    profile_text = profile.read_text()
    assert '(remote ip "localhost:7002")' in profile_text and str(ws) in profile_text
    assert sorted(restore_wrapper(str(out))) == sorted([str(out), str(profile)])
    assert not profile.exists()


def test_restore_keeps_a_foreign_file_at_the_profile_path(tmp_path: Path) -> None:
    out = tmp_path / "py"
    generate_python_wrapper(PY, str(out), sandbox="none")
    (tmp_path / "py.sb").write_text("not ours\n")
    assert restore_wrapper(str(out)) == [str(out)]
    assert (tmp_path / "py.sb").read_text() == "not ours\n"


def test_auto_on_linux_without_socket_falls_back_with_a_warning(tmp_path: Path) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("checks the Linux choice of sandbox; this is %s" % sys.platform)
    err = io.StringIO()
    with redirect_stderr(err):
        text = generate_python_wrapper(PY, str(tmp_path / "py"), sandbox="auto")
    assert "sandbox: none (auto:" in text
    assert "no OS sandbox" in err.getvalue()


def test_netns_wrapper_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The words of a netns wrapper, without needing a namespace (the backend probe is faked)."""
    monkeypatch.setattr(netns, "why_unavailable", lambda backend: None)
    monkeypatch.setattr(wrapper, "_relay_file", lambda python: "/opt/relay dir/relay.py")
    text = generate_python_wrapper(PY, str(tmp_path / "py"), sandbox="netns", broker_port=7003,
                                   broker_socket="/run/b.sock", netns_backend="unshare")
    words = shlex.split(text.splitlines()[-1][len("exec "):-len(' "$@"')])
    tail = [PY, "-I", "-S", "/opt/relay dir/relay.py", "--listen", "127.0.0.1:7003",
            "--listen-optional", "[::1]:7003", "--unix", "/run/b.sock", "--drop-caps", "--lo-up", "--", PY]
    assert words[-len(tail):] == tail
    assert os.path.basename(words[0]) == "unshare" and words[1:3] == ["--net", "--"]


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "py"
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        assert wrapper.cli_wrapper(["--python", PY, "--out", str(out), "--sandbox", "none",
                                    "--env", "A=1", "--env", "B=x=y", "--broker-port", "7004"]) == 0
        assert wrapper.cli_wrapper(["--python", PY, "--out", str(out), "--env", "nope"]) == 2
    assert "sandbox: none" in stdout.getvalue()
    text = out.read_text()
    assert "A=1; export A" in text and "B=x=y; export B" in text
    stdout = io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        assert wrapper.cli_restore(["--out", str(out)]) == 0
        assert wrapper.cli_restore(["--out", str(out)]) == 2
    assert "removed %s" % out in stdout.getvalue()


def test_cli_through_the_command_table(tmp_path: Path) -> None:
    from agenshield_shim.cli import main

    out = tmp_path / "py"
    with redirect_stdout(io.StringIO()):
        assert main(["wrapper", "--python", PY, "--out", str(out), "--sandbox", "none"]) == 0
        assert main(["restore", "--out", str(out)]) == 0
    assert not out.exists()
