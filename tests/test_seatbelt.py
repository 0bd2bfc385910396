"""The seatbelt profile, checked by parsing it: sandbox-exec exists only on macOS.

A small reader for the SBPL subset we emit (lists, symbols, numbers, string literals with ``\\\\``
and ``\\"`` escapes, ``;`` comments) turns the profile back into a tree; the tests then check the
tree, not the text: deny by default, only known operations and filters, no IP-literal hosts, every
path literal decoding back to exactly the path given, and no path able to add or change a rule.
"""

import io
import os
import re
import sys
from contextlib import redirect_stderr, redirect_stdout
from typing import Any, List, Set, Tuple, Union

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from agenshield_shim.sandbox import seatbelt
from agenshield_shim.sandbox.seatbelt import ProfileError, cli_profile, generate_sandbox_profile


class Str(str):
    """A string literal read from the profile (as opposed to a symbol)."""


Node = Union[Str, str, List[Any]]


def read_sbpl(text: str) -> List[Node]:
    """Parse SBPL into nested lists; raise ValueError on anything outside the subset we emit."""
    pos = 0
    n = len(text)

    def skip() -> None:
        nonlocal pos
        while pos < n:
            if text[pos] in " \t\n":
                pos += 1
            elif text[pos] == ";":
                end = text.find("\n", pos)
                pos = n if end < 0 else end + 1
            else:
                return

    def item() -> Node:
        nonlocal pos
        skip()
        if pos >= n:
            raise ValueError("unexpected end of profile")
        ch = text[pos]
        if ch == "(":
            pos += 1
            out: List[Node] = []
            while True:
                skip()
                if pos >= n:
                    raise ValueError("unbalanced parenthesis")
                if text[pos] == ")":
                    pos += 1
                    return out
                out.append(item())
        if ch == ")":
            raise ValueError("unexpected ) at %d" % pos)
        if ch == '"':
            pos += 1
            chars = []
            while True:
                if pos >= n:
                    raise ValueError("unterminated string")
                c = text[pos]
                if c == "\\":
                    if pos + 1 >= n or text[pos + 1] not in '\\"':
                        raise ValueError("unknown escape at %d" % pos)
                    chars.append(text[pos + 1])
                    pos += 2
                    continue
                if c == '"':
                    pos += 1
                    return Str("".join(chars))
                if ord(c) < 0x20:
                    raise ValueError("control character inside a string at %d" % pos)
                chars.append(c)
                pos += 1
        m = re.compile(r"[A-Za-z0-9*_.:-]+").match(text, pos)
        if not m:
            raise ValueError("unexpected character %r at %d" % (ch, pos))
        pos = m.end()
        return m.group(0)

    forms = []
    while True:
        skip()
        if pos >= n:
            return forms
        forms.append(item())


OPERATIONS = {
    "process-fork", "process-exec", "process-info*", "signal", "sysctl-read", "mach-lookup",
    "ipc-posix-sem", "ipc-posix-shm", "file-read-metadata", "file-read*", "file-write*",
    "file-write-data", "file-ioctl", "network-outbound", "network-bind", "system-socket",
}
PATH_FILTERS = {"literal", "subpath"}


def check_filter(node: Node, paths: List[str]) -> None:
    """Validate one filter form; collect the path strings it carries."""
    assert isinstance(node, list) and node and isinstance(node[0], str) and not isinstance(node[0], Str), node
    head, args = node[0], node[1:]
    if head in PATH_FILTERS:
        assert len(args) == 1 and isinstance(args[0], Str), node
        paths.append(args[0])
    elif head == "global-name":
        assert len(args) == 1 and isinstance(args[0], Str) and args[0] in seatbelt.MACH_SERVICES, node
    elif head == "target":
        assert args == ["same-sandbox"], node
    elif head == "socket-domain":
        assert args == ["AF_UNIX"], node
    elif head == "remote" and args and args[0] == "ip":
        assert len(args) == 2 and isinstance(args[1], Str), node
        # seatbelt accepts only localhost or * as the host; we never emit *
        assert re.match(r"^localhost:\d{1,5}$", args[1]), "not a localhost:PORT host: %r" % args[1]
    elif head in ("remote", "local") and args and args[0] == "unix-socket":
        assert len(args) == 2 and isinstance(args[1], list) and len(args[1]) == 2, node
        kind, path = args[1]
        assert kind in (("path-literal", "subpath") if head == "remote" else ("subpath",)), node
        assert isinstance(path, Str)
        paths.append(path)
    else:
        raise AssertionError("unknown filter %r" % (node,))


def check_profile(text: str) -> Tuple[List[Node], List[str]]:
    """Validate the whole profile; return the tree and every path it names."""
    tree = read_sbpl(text)
    assert tree[0] == ["version", "1"]
    assert tree[1] == ["deny", "default"]
    paths: List[str] = []
    for form in tree[2:]:
        assert isinstance(form, list) and form[0] == "allow", "only allow rules after (deny default): %r" % (form,)
        ops = [x for x in form[1:] if isinstance(x, str) and not isinstance(x, Str)]
        filters = [x for x in form[1:] if isinstance(x, list)]
        assert ops and len(ops) + len(filters) == len(form) - 1, form
        assert set(ops) <= OPERATIONS, set(ops) - OPERATIONS
        for flt in filters:
            check_filter(flt, paths)
    return tree, paths


def no_ip_literals(text: str) -> None:
    assert not re.search(r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b", text)
    assert "::1" not in text and "[::" not in text


# -- the profile's content ----------------------------------------------------------------------------------


def test_profile_shape(tmp_path: Any) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    text = generate_sandbox_profile(str(ws), broker_port=7777)
    tree, paths = check_profile(text)
    no_ip_literals(text)
    rules = [f for f in tree[2:]]
    ops: Set[str] = {op for f in rules for op in f[1:] if isinstance(op, str)}
    for needed in ("process-exec", "process-fork", "sysctl-read", "mach-lookup", "ipc-posix-sem", "ipc-posix-shm"):
        assert needed in ops
    network = [f for f in rules if "network-outbound" in f]
    assert ["allow", "network-outbound", ["remote", "ip", "localhost:7777"]] in network
    ip_rules = [f for f in network if any(isinstance(x, list) and x[:2] == ["remote", "ip"] for x in f)]
    assert len(ip_rules) == 1  # the broker is the only IP destination
    # the workspace and the temporary folders are read-write, the Python installation readable
    rw = [f for f in rules if f[1:3] == ["file-read*", "file-write*"]]
    assert len(rw) == 1
    rw_paths = {x[1] for x in rw[0][3:]}
    assert str(ws) in rw_paths and os.path.realpath("/tmp") in rw_paths
    read = [f for f in rules if f[1:] and f[1] == "file-read*" and len(f) > 2 and f[2] != "file-write-data"]
    read_paths = {x[1] for f in read for x in f[2:] if isinstance(x, list)}
    assert os.path.realpath(sys.base_prefix) in read_paths or sys.base_prefix in read_paths
    assert sys.prefix in read_paths
    assert {"/dev/null", "/dev/urandom"} <= set(paths)
    assert "/" not in read_paths


def test_no_broker_socket_no_unix_socket_broker_rules(tmp_path: Any) -> None:
    text = generate_sandbox_profile(str(tmp_path))
    assert "path-literal" not in text
    assert '"localhost:6969"' in text


def test_unix_socket_broker_rules(tmp_path: Any) -> None:
    sock = str(tmp_path / "broker.sock")
    text = generate_sandbox_profile(str(tmp_path / "ws"), broker_socket=sock)
    tree, _ = check_profile(text)
    assert ["allow", "network-outbound", ["remote", "unix-socket", ["path-literal", sock]]] in tree
    assert ["allow", "file-read*", ["literal", sock]] in tree
    assert ["allow", "file-write-data", ["literal", sock]] in tree
    # no rule lets the agent remove or replace the broker's socket
    for form in tree[2:]:
        if "file-write*" in form:
            assert ["literal", sock] not in form


def test_allow_read_and_write(tmp_path: Any) -> None:
    text = generate_sandbox_profile(str(tmp_path / "ws"), allow_read=["/opt/data"], allow_write=["/srv/out"])
    tree, _ = check_profile(text)
    read_rule = next(f for f in tree[2:] if f[1] == "file-read*" and len(f) > 2 and isinstance(f[2], list))
    assert ["subpath", "/opt/data"] in read_rule
    rw = next(f for f in tree[2:] if f[1:3] == ["file-read*", "file-write*"])
    assert ["subpath", "/srv/out"] in rw and ["subpath", "/opt/data"] not in rw


def test_symlinked_dirs_are_written_resolved_too(tmp_path: Any) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    _, paths = check_profile(generate_sandbox_profile(str(link)))
    assert str(link) in paths and str(real) in paths


def test_python_of_a_venv(tmp_path: Any) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    exe = venv / "bin" / "python"
    exe.symlink_to(sys.executable)
    (venv / "pyvenv.cfg").write_text("home = /opt/py/bin\nversion = 3.11\n")
    _, paths = check_profile(generate_sandbox_profile(str(tmp_path / "ws"), python=str(exe)))
    assert str(venv) in paths and "/opt/py" in paths
    assert os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))) in paths


@pytest.mark.parametrize("port", [0, 65536, -1, True, "6969"])
def test_bad_port_refused(tmp_path: Any, port: Any) -> None:
    with pytest.raises(ProfileError):
        generate_sandbox_profile(str(tmp_path), broker_port=port)


# -- quoting: no path can add or change a rule --------------------------------------------------------------

ROOT = "/nonexistent-agenshield-test"


def _strip(node: Node, secret: str) -> Node:
    if isinstance(node, list):
        return [_strip(x, secret) for x in node]
    if isinstance(node, Str) and node == secret:
        return Str("<PATH>")
    return node


def _assert_only_the_path_differs(path: str, **kwargs: Any) -> None:
    benign = ROOT + "/benign"
    key = next(iter(kwargs))
    as_list = key in ("allow_read", "allow_write")
    args_bad = {key: [path] if as_list else path}
    args_ok = {key: [benign] if as_list else benign}
    ws_bad = path if key == "workspace" else ROOT + "/ws"
    ws_ok = benign if key == "workspace" else ROOT + "/ws"
    args_bad.pop("workspace", None)
    args_ok.pop("workspace", None)
    bad_text = generate_sandbox_profile(ws_bad, **args_bad)
    ok_text = generate_sandbox_profile(ws_ok, **args_ok)
    bad_tree, bad_paths = check_profile(bad_text)
    ok_tree, _ = check_profile(ok_text)
    assert path in bad_paths  # decodes back exactly
    assert _strip(bad_tree, path) == _strip(ok_tree, benign)


MALICIOUS = [
    ROOT + '/a"b',
    ROOT + '/a\\b',
    ROOT + '/a\\"b',
    ROOT + '/x")) (allow default) ((literal "y',
    ROOT + '/x\\")) (allow network-outbound) ;',
    ROOT + "/ ; (allow default)",
    ROOT + "/é ü 名前",
    ROOT + "/trailing\\",
]


@pytest.mark.parametrize("path", MALICIOUS)
@pytest.mark.parametrize("key", ["workspace", "allow_read", "allow_write", "broker_socket"])
def test_malicious_paths_add_no_rule(path: str, key: str) -> None:
    _assert_only_the_path_differs(path, **{key: path})


@pytest.mark.parametrize("bad", ["\n", "\r", "\x00", "\x1b", "\x7f", "\t"])
@pytest.mark.parametrize("key", ["workspace", "allow_read", "allow_write", "broker_socket"])
def test_control_characters_refused(bad: str, key: str) -> None:
    path = ROOT + "/a" + bad + '(allow default)"'
    kwargs: Any = {key: [path] if key.startswith("allow") else path}
    ws = kwargs.pop("workspace", ROOT + "/ws")
    with pytest.raises(ProfileError, match="control character|NUL"):
        generate_sandbox_profile(ws, **kwargs)


names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1, max_size=40
)


@settings(max_examples=300, deadline=None)
@given(name=names, key=st.sampled_from(["workspace", "allow_read", "allow_write", "broker_socket"]))
def test_any_path_is_quoted_or_refused(name: str, key: str) -> None:
    path = ROOT + "/" + name
    assume(os.path.normpath(path) == path)  # "." and ".." are normalised away, by design
    assume(name not in ("ws", "benign"))  # the fixed workspace and the benign twin: a duplicate rule is dropped
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        kwargs: Any = {key: [path] if key.startswith("allow") else path}
        ws = kwargs.pop("workspace", ROOT + "/ws")
        with pytest.raises(ProfileError):
            generate_sandbox_profile(ws, **kwargs)
        return
    _assert_only_the_path_differs(path, **{key: path})


def test_sbpl_string() -> None:
    assert seatbelt.sbpl_string('a"b\\c') == '"a\\"b\\\\c"'
    with pytest.raises(ProfileError):
        seatbelt.sbpl_string("a\nb")


def test_reader_rejects_what_it_should() -> None:
    for bad in ["(allow", "(allow))", '(literal "x)', '(literal "a\\nb")', "#\"regex\""]:
        with pytest.raises(ValueError):
            read_sbpl(bad)


# -- the command line ---------------------------------------------------------------------------------------


def test_cli_prints_the_profile(tmp_path: Any) -> None:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = cli_profile(["--workspace", str(tmp_path), "--allow-read", "/opt", "--allow-write", "/srv",
                              "--broker-port", "7000", "--broker-socket", "/run/agenshield.sock"])
    assert status == 0, err.getvalue()
    text = out.getvalue()
    check_profile(text)
    assert '"localhost:7000"' in text and '(path-literal "/run/agenshield.sock")' in text


def test_cli_refuses_a_newline(tmp_path: Any) -> None:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = cli_profile(["--workspace", str(tmp_path) + "/x\n(allow default)"])
    assert status == 2 and out.getvalue() == ""
    assert "control character" in err.getvalue()


def test_cli_through_the_command_table(tmp_path: Any) -> None:
    from agenshield_shim.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["sandbox-profile", "--workspace", str(tmp_path)]) == 0
    check_profile(out.getvalue())
