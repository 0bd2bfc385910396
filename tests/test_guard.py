"""The guard's decision, called exactly as CPython calls the audit hook.

These tests call the real hook function with the arguments CPython passes
for each event; nothing is installed into the test runner's own interpreter
(an audit hook cannot be removed).
"""

import dis
import ipaddress
from typing import Any, Callable, List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agenshield_shim import NetworkBlockedError, _boot
from agenshield_shim._config import load


def make(env: Any = None) -> Tuple[Callable[[str, Tuple[Any, ...]], None], List[Tuple[str, str]]]:
    reports: List[Tuple[str, str]] = []
    policy = _boot.policy_from_config(load(env or {}))
    hook = _boot.seal(_boot.make_hook(policy, lambda event, target, policy: reports.append((event, target))))
    return hook, reports


def connect(hook: Callable[..., None], address: Any) -> None:
    hook("socket.connect", (object(), address))


def test_the_broker_and_its_loopback_spellings_pass() -> None:
    hook, reports = make()
    for host in ("localhost", "LOCALHOST.", "127.0.0.1", "::1", "0:0:0:0:0:0:0:1", "::ffff:127.0.0.1", b"localhost"):
        connect(hook, (host, 6969))
    connect(hook, ("::1", 6969, 0, 0))
    assert reports == []


@pytest.mark.parametrize(
    "address",
    [
        ("example.com", 80),
        ("localhost", 6970),
        ("127.0.0.2", 6969),
        ("127.1", 6969),  # inet_aton shorthand: refused rather than guessed
        ("127.0.0.01", 6969),  # leading zero: octal for inet_aton
        ("0.0.0.0", 6969),
        ("", 6969),
        ("::2", 6969),
        ("fe80::1%lo", 6969),
        (bytearray(b"localhost"), 6969),  # mutable: could change between the check and the use
        ("localhost\x00.evil.com", 6969),
    ],
)
def test_other_destinations_are_refused(address: Any) -> None:
    hook, reports = make()
    with pytest.raises(NetworkBlockedError) as info:
        connect(hook, address)
    assert "use the broker at localhost:6969" in str(info.value)
    assert str(info.value).startswith("AgenShield: direct connection to ")
    assert len(reports) == 1


def test_message_names_destination_and_broker() -> None:
    hook, _ = make({"AGENSHIELD_BROKER_PORT": "7000"})
    with pytest.raises(NetworkBlockedError) as info:
        connect(hook, ("example.com", 80))
    assert str(info.value) == "AgenShield: direct connection to example.com:80 blocked; use the broker at localhost:7000"
    assert info.value.destination == "example.com:80" and info.value.broker == "localhost:7000"
    assert isinstance(info.value, ConnectionRefusedError) and info.value.errno == 111


def test_unix_sockets_and_connected_sendmsg_pass() -> None:
    hook, reports = make()
    connect(hook, "/run/agenshield.sock")
    connect(hook, b"\x00abstract")
    hook("socket.sendmsg", (object(), None))
    assert reports == []


def test_lying_objects_are_never_called() -> None:
    calls: List[str] = []

    class Host(str):
        def __eq__(self, other: object) -> bool:
            calls.append("eq")
            return True

        def __hash__(self) -> int:
            calls.append("hash")
            return hash("localhost")

        def lower(self) -> str:
            calls.append("lower")
            return "localhost"

    class Port(int):
        def __index__(self) -> int:
            calls.append("index")
            return 6969

    class Address(tuple):  # type: ignore[type-arg]
        def __getitem__(self, index: Any) -> Any:
            calls.append("getitem")
            return ("localhost", 6969)[index]

        def __len__(self) -> int:
            calls.append("len")
            return 2

    hook, _ = make()
    for address in [(Host("example.com"), 6969), ("example.com", Port(80)), Address(("example.com", 80))]:
        with pytest.raises(NetworkBlockedError):
            connect(hook, address)
    # a real str subclass holding the broker's value is refused too, without calling it: the socket
    # C code converts a str subclass with the idna codec, so the kernel would get the codec's answer
    with pytest.raises(NetworkBlockedError):
        connect(hook, (Host("localhost"), Port(6969)))
    connect(hook, ("localhost", Port(6969)))  # a real int subclass is read by its value
    assert calls == []


def test_port_objects_that_are_not_ints_are_refused() -> None:
    class Index:
        def __index__(self) -> int:
            raise AssertionError("called")

    hook, _ = make()
    with pytest.raises(NetworkBlockedError):
        connect(hook, ("localhost", Index()))


def test_dns_rules() -> None:
    hook, _ = make({"AGENSHIELD_ALLOW": "db.internal:5432"})
    for args in [(b"localhost", 6969, 0, 0, 0), (None, 80, 0, 0, 0), (b"93.184.216.34", 80, 0, 0, 0), (b"db.internal", 5432, 0, 0, 0)]:
        hook("socket.getaddrinfo", args)
    hook("socket.gethostbyname", (b"localhost",))
    for host in (b"127.0.0.1", b"::1", b"localhost", b"db.internal"):  # reverse: these only
        hook("socket.gethostbyaddr", (host,))
    hook("socket.getnameinfo", (("127.0.0.1", 80),))  # read as UTF-8 in C, no codec: a str is fine
    hook("socket.getnameinfo", (("::1", 80, 0, 0),))
    # the same as str: C would convert them with the idna codec, which the guard cannot check
    for event, args in [("socket.getaddrinfo", ("localhost", 6969, 0, 0, 0)), ("socket.getaddrinfo", ("93.184.216.34", 80, 0, 0, 0)),
                        ("socket.gethostbyname", ("localhost",)), ("socket.gethostbyaddr", ("127.0.0.1",))]:
        with pytest.raises(NetworkBlockedError, match="idna codec"):
            hook(event, args)
    for event, args in [
        ("socket.gethostbyaddr", (b"127.0.0.2",)),  # a PTR query for 127.x.y.z carries 24 bits out
        ("socket.getnameinfo", (("127.0.0.2", 80),)),
        ("socket.getaddrinfo", ("example.com", 443, 0, 0, 0)),
        ("socket.getaddrinfo", (b"example.com", b"https", 0, 0, 0)),
        ("socket.gethostbyname", ("example.com",)),
        ("socket.gethostbyaddr", ("8.8.8.8",)),
        ("socket.getnameinfo", (("8.8.8.8", 53),)),
    ]:
        with pytest.raises(NetworkBlockedError):
            hook(event, args)


def test_socket_families() -> None:
    hook, _ = make()
    for family, kind in [(_boot.AF_INET, 1), (_boot.AF_INET6, 2), (_boot.AF_UNIX, 1), (-1, -1), (_boot.AF_INET, 1 | 0o4000)]:
        hook("socket.__new__", (object(), family, kind, 0))
    for family, kind in [(17, 3), (_boot.AF_INET, 3), (_boot.AF_INET6, 3 | 0o2000000), (16, 3), (40, 1)]:
        with pytest.raises(NetworkBlockedError):
            hook("socket.__new__", (object(), family, kind, 0))


def test_protected_functions_refuse_changes() -> None:
    hook, _ = make()
    raw = hook.__self__  # type: ignore[attr-defined]
    judge = raw.__defaults__[1]
    for target in (raw, judge) + _boot.PROTECTED_HELPERS:
        for event in ("object.__setattr__", "object.__delattr__"):
            with pytest.raises(PermissionError):
                hook(event, (target, "__code__", None))
    hook("object.__setattr__", (test_dns_rules, "__code__", None))  # other functions: not our business


def test_shim_variables_are_frozen() -> None:
    hook, _ = make()
    for event, args in [("os.putenv", ("AGENSHIELD_ENABLED", "false")), ("os.unsetenv", (b"AGENSHIELD_ALLOW",))]:
        with pytest.raises(PermissionError):
            hook(event, args)
    hook("os.putenv", ("PATH", "/usr/bin"))


def test_block_all_policy_refuses_the_broker_too() -> None:
    hook = _boot.seal(_boot.make_hook(_boot.block_all_policy("(unknown)", "invalid configuration: x"), lambda *a: None))
    with pytest.raises(NetworkBlockedError) as info:
        connect(hook, ("localhost", 6969))
    assert "network blocked (invalid configuration: x)" in str(info.value)


def test_unwatched_events_return_at_once() -> None:
    hook, reports = make()
    hook("open", ("/etc/passwd", "r", 0))
    hook("socket.bind", (object(), ("0.0.0.0", 80)))
    assert reports == []


def test_hook_is_registered_as_a_method_wrapper_that_takes_no_attributes() -> None:
    hook, _ = make()
    assert type(hook).__name__ == "method-wrapper" and hook.__self__.__name__ == "audit_hook"  # type: ignore[attr-defined]
    hook.__self__.__cantrace__ = True  # type: ignore[attr-defined]  # planted on the function: not looked at
    assert not hasattr(hook, "__cantrace__")
    with pytest.raises(AttributeError):
        hook.__cantrace__ = True  # type: ignore[attr-defined]


def _global_loads(function: Any) -> List[str]:
    names: List[str] = []
    codes = [function.__code__]
    while codes:
        code = codes.pop()
        codes.extend(c for c in code.co_consts if hasattr(c, "co_code"))
        names += [i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")]
    return names


def test_protected_functions_read_no_globals() -> None:
    hook, _ = make()
    raw = hook.__self__  # type: ignore[attr-defined]
    for function in (raw, raw.__defaults__[1]) + _boot.PROTECTED_HELPERS:
        assert _global_loads(function) == [], function.__name__


# -- canonical forms, against the standard library's ipaddress ----------------------------


@settings(max_examples=300)
@given(st.ip_addresses(v=4))
def test_ipv4_canonical_form(address: ipaddress.IPv4Address) -> None:
    assert _boot.canonical_host(str(address)) == str(address)
    mapped = ipaddress.IPv6Address("::ffff:" + str(address))
    assert _boot.canonical_host(str(mapped)) == str(address)
    assert _boot.canonical_host(mapped.exploded) == str(address)


@settings(max_examples=300)
@given(st.ip_addresses(v=6))
def test_ipv6_canonical_form(address: ipaddress.IPv6Address) -> None:
    canon = _boot.canonical_host(str(address))
    assert canon == _boot.canonical_host(address.exploded) == _boot.canonical_host(address.exploded.upper())
    if address.ipv4_mapped is None:
        assert canon == "v6:" + ":".join("%x" % int(g, 16) for g in address.exploded.split(":"))


@settings(max_examples=500)
@given(st.text(max_size=40))
def test_canonical_form_never_claims_loopback_for_something_else(text: str) -> None:
    canon = _boot.canonical_host(text)
    if canon in _boot.LOOPBACK_ALIASES:
        if canon == "name:localhost":
            assert text.lower().rstrip(".") == "localhost" or text.lower() == "[localhost]"
        else:
            assert ipaddress.ip_address(text.strip("[]")).is_loopback


def test_bind_takes_literals_and_allowed_names_only() -> None:
    hook, _ = make()
    for host in ["", "0.0.0.0", "::", "127.0.0.2", b"10.1.2.3", "localhost"]:
        hook("socket.bind", (object(), (host, 0)))
    for host in ["example.com", b"exfil.example", type("Host", (str,), {})("127.0.0.1"), bytearray(b"127.0.0.1")]:
        with pytest.raises(NetworkBlockedError, match="binding a socket"):
            hook("socket.bind", (object(), (host, 0)))
    hook("socket.bind", (object(), "/tmp/unix.sock"))


def test_modules_that_start_subinterpreters_are_refused() -> None:
    hook, _ = make()
    hook("import", ("json", None, [], [], []))
    for name in ["_testcapi", "_xxsubinterpreters", "_interpreters", "evil._testcapi", type("N", (str,), {})("_testinternalcapi")]:
        with pytest.raises(ImportError, match="subinterpreters"):
            hook("import", (name, None, [], [], []))
    with pytest.raises(PermissionError, match="subinterpreters"):
        hook("cpython.PyInterpreterState_New", ())


def test_a_locked_guard_checks_the_environment_of_children() -> None:
    policy = _boot.policy_for("localhost", 6969)
    inherited = frozenset({("PYTHONPATH", "/opt/app"), ("AGENSHIELD_LOG_LEVEL", "error")})
    hook = _boot.seal(_boot.make_hook(policy, lambda *a: None, True, inherited))
    fine = [None, {"FOO": "1"}, {"PYTHONPATH": "/opt/app", "AGENSHIELD_LOG_LEVEL": "error"},
            {b"PYTHONWARNINGS": b"ignore::DeprecationWarning,error::UserWarning"}]
    for env in fine:
        hook("subprocess.Popen", ("python", ["python"], None, env))
        hook("os.exec", ("python", ["python"], env))
    weak = [{"PYTHONPATH": "/tmp/x"}, {"AGENSHIELD_LOG_LEVEL": "debug"}, {"AGENSHIELD_ENABLED": "false"},
            {"PYTHONWARNINGS": "ignore::evil.W"}, {b"PYTHONPYCACHEPREFIX": b"/tmp/c"}, {"PYTHONHOME": "/"}]
    for env in weak:
        with pytest.raises(PermissionError, match="--lock"):
            hook("os.posix_spawn", ("python", ["python"], env))
    for env in [type("D", (dict,), {})(FOO="1"), {"FOO": 1}, [("FOO", "1")]]:  # read again, they could answer otherwise
        with pytest.raises(PermissionError, match="cannot be checked"):
            hook("subprocess.Popen", ("python", ["python"], None, env))
    hook("os.putenv", (b"FOO", b"1"))
    with pytest.raises(PermissionError, match="--lock"):
        hook("os.putenv", (b"PYTHONPATH", b"/tmp/x"))
    # unlocked, children are not checked (the README says what that leaves open)
    unlocked, _ = make()
    unlocked("subprocess.Popen", ("python", ["python"], None, {"PYTHONPATH": "/tmp/x"}))
    unlocked("os.putenv", (b"PYTHONPATH", b"/tmp/x"))


# -- teardown: the seccomp filter (installed only in child interpreters: it cannot be taken back) --


def _seccomp_tool() -> Any:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("seccomp_filter", Path(__file__).parents[1] / "tools" / "seccomp_filter.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_teardown_filters_are_what_the_tool_assembles() -> None:
    assert _boot.SECCOMP_FILTERS == _seccomp_tool().filters()


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_the_teardown_filter_is_a_well_formed_program(machine: str) -> None:
    tool = _seccomp_tool()
    program = tool.program(machine)
    assert len(program) % 8 == 0
    count = len(program) // 8
    instructions = [
        (int.from_bytes(program[i:i + 2], "little"), program[i + 2], program[i + 3], int.from_bytes(program[i + 4:i + 8], "little"))
        for i in range(0, len(program), 8)
    ]
    assert instructions[0] == (0x20, 0, 0, 4) and instructions[1][3] == tool.ARCHES[machine][0]  # the architecture first
    for index, (code, yes, no, _) in enumerate(instructions):
        if code & 0x07 == 0x05:  # a jump lands inside the program
            assert index + 1 + max(yes, no) < count
    assert instructions[-1] == (0x06, 0, 0, 0x00050001)  # ends refusing (EPERM)


FILTER_CHECK = """
import _socket, errno, os, sys
from agenshield_shim import _boot
unix = _socket.socket(1, 1)
udp = _socket.socket(2, 2)
left, right = _socket.socketpair()
_boot.prepare_teardown()
assert _boot.teardown() is True
def refused(call, *args):
    try:
        call(*args)
    except OSError as e:
        return e.errno == errno.EPERM
    return False
out = [
    refused(_socket.socket, 2, 1), refused(_socket.socket, 10, 2), refused(_socket.socket, 16, 3),
    refused(udp.sendto, b"x", ("127.0.0.1", 9)), refused(udp.connect, ("127.0.0.1", 9)),
    refused(udp.sendmsg, [b"x"], [], 0, ("127.0.0.1", 9)), refused(udp.bind, ("127.0.0.1", 0)),
    refused(unix.connect, "/nonexistent"),
]
_socket.socket(1, 1).close()  # Unix sockets can still be made, pairs still talk
left.send(b"ok")
out.append(right.recv(2) == b"ok")
pid = os.fork()  # children inherit it
if pid == 0:
    os._exit(0 if refused(_socket.socket, 2, 1) else 1)
out.append(os.waitpid(pid, 0)[1] == 0)
print(out)
"""


def _child(code: str) -> "subprocess.CompletedProcess[str]":
    import os
    import subprocess
    import sys

    if _boot.SECCOMP is None:
        pytest.skip("no seccomp filter for this system")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=root, AGENSHIELD_ENABLED="false"))


def test_the_teardown_filter_refuses_the_network_and_lets_the_process_finish() -> None:
    result = _child(FILTER_CHECK)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str([True] * 10), result.stdout


@pytest.mark.parametrize("fake", [
    "[]", "[_ctypes.dlopen, _ctypes.dlsym]", "[_ctypes.dlopen, _ctypes.dlsym, lambda *a: 0]",
    "[os.open, os.stat, os.close]", "(_ctypes.dlopen, _ctypes.dlsym, _ctypes.call_function)",
    "[_ctypes.dlsym, _ctypes.dlopen, _ctypes.call_function]", "None",
])
def test_only_ctypes_own_functions_install_the_teardown_filter(fake: str) -> None:
    # anything else in their place: no filter, and with _socket loaded the process ends (status 120)
    result = _child("import _ctypes, _socket, os\nfrom agenshield_shim import _boot\nprint(_boot.teardown(%s))" % fake)
    assert result.returncode == 120 and result.stdout == "", result.stdout + result.stderr
    assert "AgenShield: the network could not be closed" in result.stderr
