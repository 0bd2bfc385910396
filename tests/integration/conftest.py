"""Integration fixtures: the wheel built once, a fresh virtual environment per Python, real listeners.

Every test here runs a real interpreter with the wheel installed, as a user
would have it, and proves a refusal by a listener that received nothing.
"""

import glob
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from ..daemon import read_audit, stop_process

ROOT = Path(__file__).resolve().parents[2]
SUPPORTED = ("3.8", "3.9", "3.10", "3.11", "3.12", "3.13")


def _find_pythons() -> Dict[str, str]:
    """One interpreter per supported minor version: pyenv's, or AGENSHIELD_TEST_PYTHONS (paths, os.pathsep)."""
    found: Dict[str, str] = {}
    explicit = os.environ.get("AGENSHIELD_TEST_PYTHONS")
    candidates: List[str] = explicit.split(os.pathsep) if explicit else []
    if not explicit:
        root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
        for minor in SUPPORTED:
            candidates += sorted(glob.glob(os.path.join(root, "versions", minor + ".*", "bin", "python" + minor)))
        candidates.append(sys.executable)
    for path in candidates:
        try:
            out = subprocess.run(
                [path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True, text=True, timeout=30,
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out in SUPPORTED and out not in found:
            found[out] = path
    return found


PYTHONS = _find_pythons()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "shim" in metafunc.fixturenames:
        versions = sorted(PYTHONS, key=lambda v: tuple(map(int, v.split("."))))
        metafunc.parametrize("shim", versions, indirect=True, ids=["py" + v for v in versions])


def skip_unless_local(reason: str) -> None:
    """Skip on a developer's machine that lacks something; on CI the same gap is a failure."""
    if os.environ.get("CI"):
        pytest.fail("CI must have this: %s" % reason)
    pytest.skip(reason)


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.environ.get("CI") and set(PYTHONS) != set(SUPPORTED):
        missing = sorted(set(SUPPORTED) - set(PYTHONS))
        raise pytest.UsageError("integration tests need every supported Python; missing: %s" % missing)


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from this checkout once per test session."""
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    shutil.rmtree(ROOT / "build", ignore_errors=True)  # setuptools reuses it, deleted modules included
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True, cwd=str(build),
    )
    shutil.rmtree(ROOT / "build", ignore_errors=True)
    (wheel_path,) = out.glob("agenshield_shim-*-py3-none-any.whl")
    return wheel_path


class ShimEnv:
    """A virtual environment of one Python version with the wheel installed."""

    def __init__(self, version: str, root: Path) -> None:
        self.version = version
        self.root = root
        self.python = str(root / "bin" / "python")
        self.site_packages = Path(
            subprocess.run(
                [self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                env=clean_env(AGENSHIELD_ENABLED="false"), capture_output=True, text=True, check=True,
            ).stdout.strip()
        )

    def run(
        self, code: str, *args: str, env: Optional[Dict[str, str]] = None, timeout: float = 60,
        cwd: Optional[str] = None, python_args: Tuple[str, ...] = (),
    ) -> "subprocess.CompletedProcess[str]":
        return subprocess.run(
            [self.python, *python_args, "-c", code, *args],
            env=clean_env(**(env or {})), capture_output=True, text=True, timeout=timeout, cwd=cwd,
        )

    def pip(self, *args: str) -> "subprocess.CompletedProcess[str]":
        return subprocess.run(
            [self.python, "-m", "pip", "--disable-pip-version-check", "--no-input", *args],
            env=clean_env(), capture_output=True, text=True, timeout=300,
        )


def clean_env(**extra: str) -> Dict[str, str]:
    """The test runner's environment without any AGENSHIELD_* or PYTHON* setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENSHIELD_", "PYTHON", "PIP_"))}
    env.update(extra)
    return env


def make_venv(python: str, target: Path) -> None:
    subprocess.run([python, "-m", "venv", str(target)], check=True, env=clean_env(), timeout=300)


@pytest.fixture(scope="session")
def _envs(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Dict[str, ShimEnv]:
    return {}


@pytest.fixture
def shim(request: pytest.FixtureRequest, _envs: Dict[str, ShimEnv], wheel: Path,
         tmp_path_factory: pytest.TempPathFactory) -> ShimEnv:
    """The shared, shim-installed virtual environment for the test's Python version (read-only use)."""
    version = request.param
    if version not in _envs:
        root = tmp_path_factory.mktemp("venv-" + version)
        make_venv(PYTHONS[version], root)
        env = ShimEnv(version, root)
        result = env.pip("install", "--no-index", str(wheel))
        assert result.returncode == 0, result.stderr
        _envs[version] = env
    return _envs[version]


@pytest.fixture(scope="session")
def shim_env_factory(tmp_path_factory: pytest.TempPathFactory, wheel: Path):
    """``make(version, *requirements, pip_args=())``: a shim-installed venv with third-party packages, cached per session.

    The packages come from the package index, installed with the shim switched off for pip
    (pip itself would otherwise be refused the network). Use it for library versions:
    ``make("3.11", "urllib3<2", "requests")``; ``pip_args`` are pip's options (``--only-binary``, say).
    """
    cache: Dict[Tuple[str, Tuple[str, ...], Tuple[str, ...]], ShimEnv] = {}

    def make(version: str, *requirements: str, pip_args: Tuple[str, ...] = ()) -> ShimEnv:
        key = (version, tuple(sorted(requirements)), tuple(pip_args))
        if key not in cache:
            if version not in PYTHONS:
                raise pytest.UsageError("no Python %s on this machine" % version)
            root = tmp_path_factory.mktemp("venv-%s-%d" % (version, len(cache)))
            make_venv(PYTHONS[version], root)
            env = ShimEnv(version, root)
            result = subprocess.run(
                [env.python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *pip_args, str(wheel), *requirements],
                env=clean_env(AGENSHIELD_ENABLED="false"), capture_output=True, text=True, timeout=900,
            )
            assert result.returncode == 0, result.stdout + result.stderr
            cache[key] = env
        return cache[key]

    return make


@pytest.fixture(scope="session")
def env2(shim_env_factory) -> ShimEnv:
    """Python 3.11, requests on urllib3 2.x, botocore (the sync routing tests)."""
    return shim_env_factory("3.11", "requests", "urllib3>=2", "botocore")  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def env1(shim_env_factory) -> ShimEnv:
    """Python 3.11, requests on urllib3 1.26."""
    return shim_env_factory("3.11", "requests", "urllib3<2")  # type: ignore[no-any-return]


@pytest.fixture(params=["urllib3-2", "urllib3-1.26"])
def requests_env(request: pytest.FixtureRequest) -> ShimEnv:
    """requests on each urllib3 major version."""
    return request.getfixturevalue("env2" if request.param == "urllib3-2" else "env1")  # type: ignore[no-any-return]


@pytest.fixture
def fresh_shim(shim: ShimEnv, wheel: Path, tmp_path: Path) -> ShimEnv:
    """A private copy for tests that change the installation (break it, uninstall it)."""
    make_venv(PYTHONS[shim.version], tmp_path / "venv")
    env = ShimEnv(shim.version, tmp_path / "venv")
    result = env.pip("install", "--no-index", str(wheel))
    assert result.returncode == 0, result.stderr
    return env


@pytest.fixture(scope="session")
def bare_pythons(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, ShimEnv]:
    return {}


@pytest.fixture
def bare(shim: ShimEnv, bare_pythons: Dict[str, ShimEnv], tmp_path_factory: pytest.TempPathFactory) -> ShimEnv:
    """A virtual environment of the same Python without the shim, to compare against."""
    if shim.version not in bare_pythons:
        root = tmp_path_factory.mktemp("bare-" + shim.version)
        make_venv(PYTHONS[shim.version], root)
        bare_pythons[shim.version] = ShimEnv(shim.version, root)
    return bare_pythons[shim.version]


class Listener:
    """A TCP or UDP server on a loopback address that counts what reaches it."""

    def __init__(self, host: str, kind: int = socket.SOCK_STREAM) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, kind)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.host = host
        self.port: int = self.sock.getsockname()[1]
        self.kind = kind
        self.hits = 0
        self._stop = threading.Event()
        if kind == socket.SOCK_STREAM:
            self.sock.listen(64)
        self.sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                if self.kind == socket.SOCK_STREAM:
                    conn, _ = self.sock.accept()
                    self.hits += 1
                    conn.close()
                else:
                    self.sock.recvfrom(65536)
                    self.hits += 1
            except socket.timeout:
                continue
            except OSError:
                return

    def settle(self) -> int:
        """Wait out anything in flight, then report the count."""
        threading.Event().wait(0.3)
        return self.hits

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def tcp_listener() -> Iterator[Listener]:
    listener = Listener("127.0.0.2")
    yield listener
    listener.close()


@pytest.fixture
def tcp6_listener() -> Iterator[Listener]:
    listener = Listener("::1")
    yield listener
    listener.close()


@pytest.fixture
def udp_listener() -> Iterator[Listener]:
    listener = Listener("127.0.0.2", socket.SOCK_DGRAM)
    yield listener
    listener.close()


# --- routing fixtures: broker and upstream servers ---
# API (used by test_routing_sync.py and the aiohttp/httpx routing tests):
#
#   upstream          session: tests/integration/upstream.py's Upstream, started once in this
#                     process: .http_url (http://127.0.0.1:P), .https_url (https://localhost:P),
#                     .http_port, .https_port, .ca_file, .wrong_ca_file, .index_wheel,
#                     .connection_count(tag), .request_count(tag). Endpoints: see upstream.py.
#   broker            session: the reference broker (python -m agenshield_shim.broker, default
#                     policy: loopback only) as a subprocess -> BrokerHandle.
#   deny_broker       session: a broker whose policy denies the upstream's two ports (rule id
#                     "deny-upstream"; every other loopback destination is allowed).
#   unix_broker       session: a broker listening on 127.0.0.1:P and on a Unix socket;
#                     .env also carries AGENSHIELD_BROKER_SOCKET.
#   start_broker      session: start_broker(*cli_args) -> BrokerHandle, stopped at session end.
#   rpc_broker        session: a broker for AGENSHIELD_TRANSPORT=rpc (extensions on, trusts the
#                     upstream's CA with --upstream-ca: under rpc the broker makes the TLS connection);
#                     .rpc_env is .env plus AGENSHIELD_TRANSPORT=rpc.
#   compat_broker     session: the same with --compat (the daemon's behaviour: text bodies only).
#   dead_broker_port  a free TCP port on 127.0.0.1 with nothing listening (broker down).
#   silent_broker     a TCP port on 127.0.0.1 that accepts connections and never answers.
#   garbage_server    garbage_server(answer) -> a TCP port on 127.0.0.1 whose listener reads what
#                     a client sends and answers every connection with `answer` (not a broker).
#
# BrokerHandle: .host, .port, .url, .pid, .audit_file, .socket_path (or None),
#   .env  -> {"AGENSHIELD_BROKER_HOST": "127.0.0.1", "AGENSHIELD_BROKER_PORT": str(port)}
#            (pass to ShimEnv.run(..., env=broker.env); add your own keys with {**broker.env, ...}),
#   .audit()               -> every audit entry so far (list of dicts: operation, target, result, ...),
#   .mark() / .audit(mark) -> entries written after a mark,
#   .connects(target, mark=None) / .forwards(substring, mark=None) -> the matching entries
#            ("connect" entries whose target is exactly "host:port"; "forward" entries whose URL
#            contains the substring),
#   .calls(substring, mark=None) -> "http_request" entries (the rpc transport) whose URL contains it.
#
# The real AgenShield daemon (@agenshield/broker 0.7.2 from npm, tests/daemon.py; serves only
# /health and /rpc: the rpc transport, text bodies only, no extensions):
#   daemon_broker       session: the daemon through its HTTP fallback -> DaemonHandle; .env has no
#                       AGENSHIELD_BROKER_SOCKET. Trusts the upstream's CA (NODE_EXTRA_CA_CERTS).
#                       Built-in policy: http(s) to 127.0.0.1/localhost on an explicit port allowed,
#                       127.0.0.2 refused (error 1001 "Host '127.0.0.2' is not allowed"): a refusal test
#                       against the daemon uses a listener on 127.0.0.2 (tcp_listener).
#   daemon_unix_broker  session: the same daemon through its Unix socket (.env carries
#                       AGENSHIELD_BROKER_SOCKET; audit entries have channel "socket").
#   start_daemon        session: start_daemon(ca_file=None, unix=False) -> another daemon (one that does
#                       not trust the upstream's CA, say), stopped at session end.
# DaemonHandle offers BrokerHandle's API (.host .port .url .pid .audit_file .socket_path .env
# .rpc_env .mark .audit .calls .connects .forwards .stop); its audit has the same shape.
# A missing node/npm skips the daemon's tests on a developer's machine and fails them on CI.

import tempfile as _tempfile
import time as _time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # aiohttp loads only when a test asks for the upstream
    from ..daemon import Daemon

    from .upstream import Upstream


class AuditedBroker:
    """What every broker handle offers the tests: its address, the shim's environment for it, and
    its audit log (one JSON object a line: operation, target, allowed, result, channel, ...).

    Subclasses set ``host``, ``port``, ``pid``, ``audit_file`` and ``socket_path``.
    """

    host: str
    port: int
    pid: int
    audit_file: str
    socket_path: Optional[str]

    @property
    def url(self) -> str:
        return "http://%s:%d" % (self.host, self.port)

    @property
    def env(self) -> Dict[str, str]:
        env = {"AGENSHIELD_BROKER_HOST": self.host, "AGENSHIELD_BROKER_PORT": str(self.port)}
        if self.socket_path:
            env["AGENSHIELD_BROKER_SOCKET"] = self.socket_path
        return env

    @property
    def rpc_env(self) -> Dict[str, str]:
        return dict(self.env, AGENSHIELD_TRANSPORT="rpc")

    def mark(self) -> int:
        return len(self.audit())

    def calls(self, substring: str, mark: int = 0) -> List[Dict[str, object]]:
        """``http_request`` audit entries (the rpc transport) whose URL contains the substring."""
        return [e for e in self.audit(mark) if e.get("operation") == "http_request" and substring in str(e.get("target"))]

    def audit(self, mark: int = 0) -> List[Dict[str, object]]:
        return read_audit(self.audit_file, mark)

    def connects(self, target: str, mark: int = 0) -> List[Dict[str, object]]:
        return [e for e in self.audit(mark) if e.get("operation") == "connect" and e.get("target") == target]

    def forwards(self, substring: str, mark: int = 0) -> List[Dict[str, object]]:
        return [e for e in self.audit(mark) if e.get("operation") == "forward" and substring in str(e.get("target"))]


class BrokerHandle(AuditedBroker):
    """A running reference broker subprocess; see the API comment above."""

    def __init__(self, workdir: Path, args: Tuple[str, ...]) -> None:
        self.workdir = workdir
        self.ready_file = str(workdir / "ready")
        self.audit_file = str(workdir / "audit.jsonl")
        self.socket_path: Optional[str] = None
        if "--unix" in args:
            self.socket_path = args[args.index("--unix") + 1]
        env = clean_env(PYTHONPATH=str(ROOT))
        self._log = open(workdir / "broker.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agenshield_shim.broker", "--host", "127.0.0.1", "--port", "0",
             "--ready-file", self.ready_file, "--audit", self.audit_file, *args],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=str(workdir),
        )
        deadline = _time.monotonic() + 30
        while not os.path.exists(self.ready_file):
            if self.proc.poll() is not None or _time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("broker did not start: %s" % (workdir / "broker.log").read_text())
            _time.sleep(0.02)
        first = Path(self.ready_file).read_text().split()[0]
        self.host, _, port = first.rpartition(":")
        self.port = int(port)
        self.pid = self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc, self._log)


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> "Iterator[Upstream]":
    from .upstream import Upstream

    server = Upstream.start(tmp_path_factory.mktemp("upstream"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def start_broker(tmp_path_factory: pytest.TempPathFactory):
    """``start_broker(*cli_args)``: another reference broker (stopped at the end of the session)."""
    started: List[BrokerHandle] = []

    def start(*args: str) -> BrokerHandle:
        handle = BrokerHandle(tmp_path_factory.mktemp("broker"), tuple(args))
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


@pytest.fixture(scope="session")
def broker(start_broker) -> BrokerHandle:
    return start_broker()


@pytest.fixture(scope="session")
def deny_broker(start_broker, upstream: "Upstream", tmp_path_factory: pytest.TempPathFactory) -> BrokerHandle:
    policy = tmp_path_factory.mktemp("policy") / "deny-upstream.toml"
    policy.write_text(
        '[[rules]]\nid = "deny-upstream"\naction = "deny"\nhosts = ["127.0.0.1", "localhost", "::1"]\n'
        "ports = [%d, %d]\n\n"
        '[[rules]]\nid = "loopback"\naction = "allow"\nhosts = ["localhost", "127.0.0.0/8", "::1/128"]\n'
        % (upstream.http_port, upstream.https_port)
    )
    return start_broker("--policy", str(policy))


@pytest.fixture(scope="session")
def rpc_broker(start_broker, upstream: "Upstream") -> BrokerHandle:
    return start_broker("--upstream-ca", str(upstream.ca_file))


@pytest.fixture(scope="session")
def compat_broker(start_broker, upstream: "Upstream") -> BrokerHandle:
    return start_broker("--compat", "--upstream-ca", str(upstream.ca_file))


class DaemonHandle(AuditedBroker):
    """The AgenShield daemon (tests/daemon.py's ``Daemon``) seen as a broker handle: through its HTTP
    fallback, or (``unix=True``) through its Unix socket. Two handles may share one daemon."""

    def __init__(self, daemon: "Daemon", unix: bool) -> None:
        self.daemon = daemon
        self.host = daemon.host
        self.port = daemon.port
        self.pid = daemon.pid
        self.audit_file = daemon.audit_file
        self.socket_path = daemon.socket_path if unix else None

    def stop(self) -> None:
        self.daemon.stop()


def _daemon_class() -> "type":
    """tests/daemon.py's ``Daemon``, once the package is fetched: a missing node/npm skips locally, fails on CI."""
    from ..daemon import Daemon, DaemonUnavailable, fetch

    try:
        fetch()
    except DaemonUnavailable as exc:
        skip_unless_local(str(exc))
    return Daemon


@pytest.fixture(scope="session")
def start_daemon(tmp_path_factory: pytest.TempPathFactory):
    """``start_daemon(ca_file=None, unix=False)``: a running daemon's handle, stopped at session end."""
    started: List["Daemon"] = []

    def start(ca_file: Optional[str] = None, unix: bool = False) -> DaemonHandle:
        daemon = _daemon_class()(tmp_path_factory.mktemp("daemon"), ca_file=ca_file)
        started.append(daemon)
        return DaemonHandle(daemon, unix)

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture(scope="session")
def _daemon(start_daemon, upstream: "Upstream") -> DaemonHandle:
    """The one daemon both daemon fixtures use (trusting the upstream's CA)."""
    return start_daemon(ca_file=str(upstream.ca_file))  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def daemon_broker(_daemon: DaemonHandle) -> DaemonHandle:
    """The daemon through its HTTP fallback (``/rpc``)."""
    return DaemonHandle(_daemon.daemon, unix=False)


@pytest.fixture(scope="session")
def daemon_unix_broker(_daemon: DaemonHandle) -> DaemonHandle:
    """The daemon through its Unix socket (newline-delimited JSON-RPC)."""
    return DaemonHandle(_daemon.daemon, unix=True)


@pytest.fixture(scope="session")
def unix_broker(start_broker) -> BrokerHandle:
    # AF_UNIX paths are limited to ~107 bytes: pytest's tmp paths can be longer
    path = os.path.join(_tempfile.mkdtemp(prefix="agsb-"), "broker.sock")
    return start_broker("--unix", path)


@pytest.fixture
def dead_broker_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port: int = probe.getsockname()[1]
    probe.close()
    return port


@pytest.fixture
def silent_broker() -> Iterator[int]:
    """Accepts (the kernel completes the handshake from the backlog) and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    yield server.getsockname()[1]
    server.close()


@pytest.fixture
def garbage_server() -> Iterator[Callable[[bytes], int]]:
    """``garbage_server(answer)``: a listener that answers ``answer`` to anything (a broker impostor)."""
    servers: List[socket.socket] = []
    stop = threading.Event()

    def serve(server: socket.socket, answer: bytes) -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(65536)
                    conn.sendall(answer)
                except OSError:
                    pass

    def start(answer: bytes) -> int:
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        server.settimeout(0.2)
        servers.append(server)
        threading.Thread(target=serve, args=(server, answer), daemon=True).start()
        return server.getsockname()[1]  # type: ignore[no-any-return]

    yield start
    stop.set()
    for server in servers:
        server.close()
