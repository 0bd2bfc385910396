"""Side-by-side proxy runs for ``benchmarks/broker.py --vs-proxypy``: the processes and the meters.

Each proxy (this checkout's broker, optionally another checkout's, and proxy.py) runs as its own
process on loopback in front of one upstream: nginx when it is installed (what the figures in
issue 15 were taken against), else the benchmark's aiohttp upstream. Small keep-alive forwards are
driven by ``wrk`` when installed (a Lua script puts the absolute-form target in the request line),
else by the benchmark's asyncio client. Broker CPU is read from ``/proc`` for the proxy's whole
process tree (proxy.py runs one process per worker), so ``CPU µs per request`` compares like with
like however many cores a proxy uses.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

HOST = "127.0.0.1"
_TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: "subprocess.Popen[bytes]", timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("process exited (%s) before listening on %d" % (proc.returncode, port))
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nothing listening on %d after %g s" % (port, timeout))


def start(cmd: List[str], marker: str, env: Dict[str, str]) -> Tuple["subprocess.Popen[str]", str]:
    """Start ``cmd`` and wait (30 s at most) for the stdout line holding ``marker``; returns it too."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    deadline = time.time() + 30
    while time.time() < deadline:
        line = proc.stdout.readline()
        if marker in line:
            return proc, line.strip()
    proc.kill()
    raise RuntimeError("%s did not start" % cmd)


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and every live descendant (from ``/proc``)."""
    stats: Dict[int, Tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, "rb") as fh:
                raw = fh.read()
        except OSError:
            continue
        fields = raw[raw.rindex(b")") + 2:].split()
        stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK)
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += stats.get(p, (0, 0.0))[1]
        todo.extend(c for c, (ppid, _cpu) in stats.items() if ppid == p)
    return total


class Proc:
    """A proxy or upstream process on ``port``, stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, name: str, argv: Sequence[str], port: int, env: Optional[Dict[str, str]] = None,
                 cwd: Optional[str] = None) -> None:
        self.name, self.port = name, port
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(list(argv), stdout=self.log, stderr=self.log, env=env, cwd=cwd,
                                     start_new_session=True)
        try:
            wait_listening(port, self.proc)
        except BaseException:
            self.stop()
            raise

    def cpu(self) -> float:
        return tree_cpu(self.proc.pid)

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait()
        self.log.close()
        return code

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")


def broker(name: str, root: str, upstream_port: int, audit: str) -> Proc:
    """``python -m agenshield_shim.broker`` from checkout ``root``, allowing the upstream, auditing to ``audit``."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENSHIELD_", "PYTHON"))}
    env["PYTHONPATH"] = root
    argv = [sys.executable, "-m", "agenshield_shim.broker", "--host", HOST, "--port", str(port),
            "--allow", "%s:%d" % (HOST, upstream_port), "--audit", audit]
    return Proc(name, argv, port, env=env, cwd=root)


def proxypy(python: str, workers: Optional[int]) -> Proc:
    port = free_port()
    argv = [python, "-m", "proxy", "--hostname", HOST, "--port", str(port), "--log-level", "ERROR"]
    if workers:
        argv += ["--num-workers", str(workers)]
    return Proc("proxy.py" + (" (%d workers)" % workers if workers else ""), argv, port)


def proxypy_python(spec: str, cache: Path) -> str:
    """``spec`` is a Python that has proxy.py, or ``auto``: a venv under ``cache`` (made once)."""
    if spec != "auto":
        return spec
    exe = cache / "proxypy" / "bin" / "python"
    if not exe.exists():
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _venvs import make_venv

        make_venv(sys.executable, cache / "proxypy", None, "proxy.py")
    return str(exe)


def checkout(ref_or_dir: str, into: Path) -> str:
    """A directory holding ``ref_or_dir``'s tree: the directory itself, or ``git archive REF`` of this repo."""
    if os.path.isdir(ref_or_dir):
        return os.path.abspath(ref_or_dir)
    from _venvs import checkout as export  # one git-archive export for every benchmark

    return str(export(ref_or_dir, into))


# -- upstream -----------------------------------------------------------------------------------------


_NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    sendfile on;
    server {{
        listen {host}:{port} backlog=2048;
        location = /small {{ default_type text/plain; return 200 "ok"; }}
        location = /big {{ default_type application/octet-stream; alias {tmp}/big.bin; }}
    }}
}}
"""


def nginx_upstream(tmp: Path, size: int) -> Optional[Proc]:
    """nginx serving ``/small`` (``ok``) and ``/big`` (``size`` bytes; the query is ignored), if installed."""
    exe = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if exe is None:
        return None
    tmp.mkdir(parents=True, exist_ok=True)
    with open(tmp / "big.bin", "wb") as fh:
        block = os.urandom(1 << 20)
        left = size
        while left > 0:
            fh.write(block[:left])
            left -= len(block)
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(_NGINX_CONF.format(tmp=tmp, host=HOST, port=port))
    return Proc("nginx", [exe, "-c", str(conf), "-p", str(tmp)], port)


# -- load -----------------------------------------------------------------------------------------------


def wrk_rps(proxy_port: int, upstream_port: int, seconds: float, conns: int, tmp: Path) -> Optional[Tuple[float, int]]:
    """(requests/s, requests) of ``wrk`` keep-alive GETs of ``/small`` through a forward proxy; ``None``
    without wrk. Any error or non-2xx answer fails the run (a proxy that refuses fast is not fast)."""
    exe = shutil.which("wrk")
    if exe is None:
        return None
    script = tmp / "forward.lua"
    script.write_text('wrk.path = "http://%s:%d/small"\nwrk.headers["Host"] = "%s:%d"\n'
                      % (HOST, upstream_port, HOST, upstream_port))
    out = subprocess.run([exe, "-t1", "-c%d" % conns, "-d%gs" % seconds, "-s", str(script),
                          "http://%s:%d/" % (HOST, proxy_port)], capture_output=True, text=True,
                         timeout=seconds + 60).stdout
    m = re.search(r"(\d+) requests in", out)
    if not m or "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError("wrk through port %d failed:\n%s" % (proxy_port, out))
    n = int(m.group(1))
    rps = float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return rps, n


def median(xs: List[float]) -> float:
    ys = sorted(xs)
    mid = len(ys) // 2
    return ys[mid] if len(ys) % 2 else (ys[mid - 1] + ys[mid]) / 2
