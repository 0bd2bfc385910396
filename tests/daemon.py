"""The AgenShield daemon's broker from the npm registry, fetched once and run for the tests.

``@agenshield/broker`` is published bundled, but its two dependencies are not on the registry, so
``npm install`` fails; ``npm pack`` and unpacking it is enough (``node package/main.js``). The
unpacked package is cached under ``tests/.cache/`` (or ``$AGENSHIELD_DAEMON_CACHE``), so the
fetch happens once per machine; ``.ci/run`` does it before the tests with ``python3 tests/daemon.py``.

The daemon is configured by environment only (measured on 0.7.2): ``AGENSHIELD_CONFIG`` (a file
that need not exist), ``AGENSHIELD_SOCKET`` (its Unix socket: newline-delimited JSON-RPC),
``AGENSHIELD_HTTP_HOST``/``AGENSHIELD_HTTP_PORT`` (its HTTP fallback: ``/health`` and ``/rpc``),
``AGENSHIELD_POLICIES`` (an empty folder: the built-in policies, which allow loopback URLs with
an explicit port), ``AGENSHIELD_AUDIT_LOG`` (one JSON line per decision) and
``NODE_EXTRA_CA_CERTS`` (the CA it trusts for upstream TLS).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional

DAEMON_PACKAGE = "@agenshield/broker"
DAEMON_VERSION = "0.7.2"
ROOT = Path(__file__).resolve().parents[1]


class DaemonUnavailable(RuntimeError):
    """node or npm is missing, or the package could not be fetched: the message says which."""


def cache_dir() -> Path:
    base = os.environ.get("AGENSHIELD_DAEMON_CACHE") or str(ROOT / "tests" / ".cache")
    return Path(base) / ("agenshield-broker-" + DAEMON_VERSION)


def fetch(quiet: bool = True) -> Path:
    """The unpacked package's ``main.js``, fetched with ``npm pack`` the first time."""
    main = cache_dir() / "package" / "main.js"
    if main.exists():
        return main
    npm = shutil.which("npm")
    if shutil.which("node") is None or npm is None:
        raise DaemonUnavailable("node and npm are needed to run the AgenShield daemon (apt-get install nodejs npm)")
    target = cache_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="daemon-", dir=str(target.parent)))
    try:
        result = subprocess.run(
            [npm, "pack", "--silent", "%s@%s" % (DAEMON_PACKAGE, DAEMON_VERSION)],
            cwd=str(work), capture_output=True, text=True, timeout=300,
        )
        tarballs = list(work.glob("*.tgz"))
        if result.returncode != 0 or len(tarballs) != 1:
            raise DaemonUnavailable("npm pack %s@%s failed: %s" % (DAEMON_PACKAGE, DAEMON_VERSION,
                                                                  (result.stderr or result.stdout).strip()[-2000:]))
        with tarfile.open(str(tarballs[0])) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith("package/") and ".." not in m.name]
            archive.extractall(str(work / "unpacked"), members=members)
        if target.exists():
            shutil.rmtree(str(target))
        os.replace(str(work / "unpacked"), str(target))
    finally:
        shutil.rmtree(str(work), ignore_errors=True)
    if not quiet:
        print("fetched %s@%s into %s" % (DAEMON_PACKAGE, DAEMON_VERSION, target))
    return main


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Daemon:
    """One running daemon: HTTP fallback on ``127.0.0.1:port``, Unix socket at ``socket_path``.

    ``env`` adds variables to the daemon's own environment (``AGENSHIELD_*`` of the daemon, not of
    the shim). Stopped with :meth:`stop`.
    """

    def __init__(self, workdir: Path, ca_file: Optional[str] = None, env: Optional[Dict[str, str]] = None) -> None:
        main = fetch()
        self.workdir = workdir
        self.audit_file = str(workdir / "audit.jsonl")
        policies = workdir / "policies"
        policies.mkdir(parents=True, exist_ok=True)
        # AF_UNIX paths are limited to ~107 bytes: pytest's tmp paths can be longer
        self.socket_path = os.path.join(tempfile.mkdtemp(prefix="agsd-"), "daemon.sock")
        self.host = "127.0.0.1"
        child_env = {k: v for k, v in os.environ.items()
                     if not k.startswith(("AGENSHIELD_", "NODE_")) and k.lower() not in (
                         "http_proxy", "https_proxy", "all_proxy", "no_proxy")}
        child_env.update(
            AGENSHIELD_CONFIG=str(workdir / "config.json"),  # need not exist: defaults
            AGENSHIELD_SOCKET=self.socket_path,
            AGENSHIELD_HTTP_HOST=self.host,
            AGENSHIELD_POLICIES=str(policies),
            AGENSHIELD_AUDIT_LOG=self.audit_file,
        )
        if ca_file:
            child_env["NODE_EXTRA_CA_CERTS"] = ca_file
        child_env.update(env or {})
        last = ""
        for _ in range(5):  # the port is chosen before the daemon binds it: retry on a lost race
            self.port = _free_port()
            child_env["AGENSHIELD_HTTP_PORT"] = str(self.port)
            self._log_path = workdir / "daemon.log"
            self._log = open(str(self._log_path), "w")
            self.proc = subprocess.Popen(["node", str(main)], env=child_env, stdout=self._log,
                                         stderr=subprocess.STDOUT, cwd=str(workdir))
            if self._wait_ready(30):
                self.pid = self.proc.pid
                return
            last = self._log_path.read_text()
            self.stop()
        raise RuntimeError("the AgenShield daemon did not start:\n" + last[-3000:])

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen("http://%s:%d/health" % (self.host, self.port), timeout=2) as answer:
                    if answer.status == 200 and os.path.exists(self.socket_path):
                        return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    @property
    def url(self) -> str:
        return "http://%s:%d" % (self.host, self.port)

    def audit(self, mark: int = 0) -> List[Dict[str, object]]:
        return read_audit(self.audit_file, mark)

    def stop(self) -> None:
        stop_process(self.proc, self._log)


def read_audit(path: str, mark: int = 0) -> List[Dict[str, object]]:
    """The entries of a broker's audit log (one JSON object a line) after the first ``mark``: the
    reference broker's and the daemon's have one shape."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines[mark:] if line.strip()]


def stop_process(proc: "subprocess.Popen[bytes]", log: Any) -> None:
    """Terminate a broker's process (killed after 15 s) and close its log file."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log.close()


if __name__ == "__main__":  # .ci/run: fetch once before the tests
    try:
        print(fetch(quiet=False))
    except DaemonUnavailable as exc:
        sys.exit("tests/daemon.py: %s" % exc)
