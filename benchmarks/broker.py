"""Benchmark of the reference broker, on loopback only: ``python benchmarks/broker.py``.

Side by side in one run, against one loopback upstream (aiohttp.web, in its own process) and one
broker (the real CLI, in its own process, audit log to a temporary file):

* throughput of a 100 MB download through a ``CONNECT`` tunnel and through the forward proxy,
  each as a ratio to the same download made directly;
* requests per second of small keep-alive requests through the forward proxy and directly;
* 500 concurrent tunnels, each carrying one request, all held open at once (all must succeed).

Every loop is bounded in count and time; the whole run takes well under two minutes.
Options: ``--size-mb N`` (default 100), ``--rps-seconds S`` (default 3), ``--tunnels N`` (default 500),
``--repeat N`` (best of N downloads, default 3).

``--vs-proxypy PYTHON`` (or ``auto``: a venv with proxy.py, a benchmark-only dependency, made once)
runs instead this checkout's broker, ``--baseline REF`` 's broker (``git archive`` of a ref such as
``main``, or a checkout directory) and proxy.py side by side, each in its own process in front of
one upstream (nginx when installed, as in issue 15; else the aiohttp one), in ``--rounds``
interleaved rounds: small keep-alive forwards (driven by wrk when installed) in req/s and broker
CPU per request (the proxy's whole process tree, from ``/proc``), and bulk forward and ``CONNECT``
downloads (``--repeat`` of them, each cut after ``--bulk-seconds``) in MB/s and CPU per MB. It
prints medians with their spread and the ratios ours/proxy.py and ours/baseline, e.g.::

    python benchmarks/broker.py --vs-proxypy auto --baseline main --rounds 7 --repeat 2
"""

import argparse
import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

HOST = "127.0.0.1"


# -- the upstream (run in a child process: python benchmarks/broker.py --upstream) --------------------


def run_upstream() -> None:
    from aiohttp import web

    block = os.urandom(1 << 20)

    async def big(req: web.Request) -> web.StreamResponse:
        n = int(req.query.get("n", str(100 * 1000 * 1000)))
        resp = web.StreamResponse()
        resp.content_length = n
        await resp.prepare(req)
        sent = 0
        while sent < n:
            part = block if n - sent >= len(block) else block[: n - sent]
            await resp.write(part)
            sent += len(part)
        return resp

    async def small(req: web.Request) -> web.Response:
        return web.Response(text="ok")  # text: a broker that carries text bodies only (the daemon) carries it

    text_block = bytes(range(0x20, 0x7f)) * ((1 << 20) // 95 + 1)

    async def text(req: web.Request) -> web.StreamResponse:
        """``/big`` as ASCII text: what a broker that carries text bodies only (the daemon) can carry."""
        n = int(req.query.get("n", str(10 * 1000 * 1000)))
        resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=ascii"})
        resp.content_length = n
        await resp.prepare(req)
        sent = 0
        while sent < n:
            part = text_block[: min(len(text_block), n - sent)]
            await resp.write(part)
            sent += len(part)
        return resp

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/big", big)
        app.router.add_get("/small", small)
        app.router.add_get("/text", text)
        runner = web.AppRunner(app, access_log=None, handle_signals=True)
        await runner.setup()
        site = web.TCPSite(runner, HOST, 0, backlog=2048)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print("upstream %d" % port, flush=True)
        await asyncio.sleep(600)  # bounded: the parent terminates it long before

    _raise_fd_limit()
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass


def _raise_fd_limit() -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    except (ImportError, ValueError, OSError):
        pass


# -- clients ------------------------------------------------------------------------------------------


def _read_head(sock: socket.socket) -> Tuple[bytes, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the end of the head")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def download(mode: str, broker_port: int, up_port: int, size: int) -> float:
    """Seconds to download ``size`` bytes: mode ``direct``, ``tunnel`` or ``forward``."""
    t0 = time.perf_counter()
    port = up_port if mode == "direct" else broker_port
    with socket.create_connection((HOST, port), timeout=60) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        path = "/big?n=%d" % size
        if mode == "tunnel":
            s.sendall(b"CONNECT %s:%d HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (HOST.encode(), up_port, HOST.encode(), up_port))
            head, rest = _read_head(s)
            assert head.startswith(b"HTTP/1.1 200"), head
            assert not rest
        target = ("http://%s:%d%s" % (HOST, up_port, path)) if mode == "forward" else path
        s.sendall(b"GET %s HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (target.encode(), HOST.encode(), up_port))
        head, rest = _read_head(s)
        assert head.startswith(b"HTTP/1.1 200"), head
        m = re.search(rb"(?i)content-length: *(\d+)", head)
        assert m and int(m.group(1)) == size
        got = len(rest)
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while got < size:
            n = s.recv_into(view)
            if not n:
                raise ConnectionError("short body: %d of %d" % (got, size))
            got += n
    return time.perf_counter() - t0


def download_cut(mode: str, proxy_port: int, up_port: int, size: int, max_seconds: float) -> Tuple[int, float]:
    """(bytes, seconds) of a ``size``-byte download (``tunnel`` or ``forward``), cut after
    ``max_seconds``: a proxy that carries a few MB/s (proxy.py forwarding) would take minutes."""
    t0 = time.perf_counter()
    with socket.create_connection((HOST, proxy_port), timeout=60) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        if mode == "tunnel":
            s.sendall(b"CONNECT %s:%d HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (HOST.encode(), up_port, HOST.encode(), up_port))
            head, rest = _read_head(s)
            assert head.startswith(b"HTTP/1.1 200"), head
            target = b"/big?n=%d" % size
        else:
            target = b"http://%s:%d/big?n=%d" % (HOST.encode(), up_port, size)
        s.sendall(b"GET %s HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (target, HOST.encode(), up_port))
        head, rest = _read_head(s)
        assert head.startswith(b"HTTP/1.1 200"), head
        got = len(rest)
        view = memoryview(bytearray(1 << 20))
        deadline = t0 + max_seconds
        while got < size and time.perf_counter() < deadline:
            n = s.recv_into(view)
            if not n:
                raise ConnectionError("short body: %d of %d" % (got, size))
            got += n
    return got, time.perf_counter() - t0


async def keepalive_rps(port: int, target: bytes, seconds: float, conns: int) -> Tuple[float, int]:
    """Requests per second of ``conns`` keep-alive connections sending small GETs for ``seconds``."""
    deadline = time.perf_counter() + seconds
    counts: List[int] = []
    request = b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, HOST.encode())

    async def worker() -> None:
        r, w = await asyncio.open_connection(HOST, port)
        n = 0
        try:
            while time.perf_counter() < deadline and n < 1_000_000:
                w.write(request)
                head = await r.readuntil(b"\r\n\r\n")
                m = re.search(rb"(?i)content-length: *(\d+)", head)
                assert head.startswith(b"HTTP/1.1 200") and m, head
                await r.readexactly(int(m.group(1)))
                n += 1
        finally:
            counts.append(n)
            w.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conns)))
    elapsed = time.perf_counter() - t0
    return sum(counts) / elapsed, sum(counts)


async def concurrent_tunnels(broker_port: int, up_port: int, count: int) -> Tuple[float, int, float]:
    """Open ``count`` tunnels at once, one request each, all held open together; (seconds, ok, setup s)."""
    ready = asyncio.Event()
    opened = 0
    ok = 0
    t0 = time.perf_counter()
    setup = [0.0]

    async def one() -> None:
        nonlocal opened, ok
        r, w = await asyncio.wait_for(asyncio.open_connection(HOST, broker_port), 30)
        try:
            w.write(b"CONNECT %s:%d HTTP/1.1\r\nHost: x\r\n\r\n" % (HOST.encode(), up_port))
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 30)
            if not head.startswith(b"HTTP/1.1 200"):
                return
            opened += 1
            if opened == count:
                setup[0] = time.perf_counter() - t0
                ready.set()
            await asyncio.wait_for(ready.wait(), 60)  # every tunnel is open at the same time
            w.write(b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n")
            resp = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 30)
            body = await asyncio.wait_for(r.readexactly(2), 30)
            if resp.startswith(b"HTTP/1.1 200") and body == b"ok":
                ok += 1
        finally:
            w.close()

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    errors = [x for x in results if isinstance(x, BaseException)]
    if errors:
        print("  tunnel errors: %d (first: %r)" % (len(errors), errors[0]))
    return time.perf_counter() - t0, ok, setup[0]


# -- side by side with proxy.py (--vs-proxypy) ---------------------------------------------------------


def compare(args: argparse.Namespace) -> int:
    """This checkout's broker, optionally ``--baseline``'s, and proxy.py, in interleaved rounds."""
    import _sidebyside as sbs

    tmp = Path(tempfile.mkdtemp(prefix="broker-vs-"))
    size = args.size_mb * 1000 * 1000
    procs: List["sbs.Proc"] = []
    aio = None
    try:
        nginx = sbs.nginx_upstream(tmp / "nginx", size)
        if nginx is not None:
            procs.append(nginx)
            up_port, upstream = nginx.port, "nginx"
        else:
            aio, up_port = start_upstream()
            upstream = "aiohttp (no nginx installed)"
        proxies = [sbs.broker("broker (this checkout)", ROOT, up_port, str(tmp / "audit-this.jsonl"))]
        procs.append(proxies[0])
        if args.baseline:
            base = sbs.checkout(args.baseline, tmp / "baseline")
            proxies.append(sbs.broker("broker (%s)" % args.baseline, base, up_port, str(tmp / "audit-base.jsonl")))
            procs.append(proxies[-1])
        python = sbs.proxypy_python(args.vs_proxypy, Path(args.cache))
        proxies.append(sbs.proxypy(python, args.proxypy_workers))
        procs.append(proxies[-1])
        driver = "wrk" if shutil.which("wrk") else "asyncio client"
        print("upstream %s on %s:%d, %d conns by %s, %d rounds, python %s, %d cores"
              % (upstream, HOST, up_port, args.rps_conns, driver, args.rounds, sys.version.split()[0],
                 os.cpu_count() or 0))
        rps: Dict[str, List[float]] = {p.name: [] for p in proxies}
        cpu_req: Dict[str, List[float]] = {p.name: [] for p in proxies}
        fwd: Dict[str, List[float]] = {p.name: [] for p in proxies}
        tun: Dict[str, List[float]] = {p.name: [] for p in proxies}
        cpu_mb: Dict[str, List[float]] = {p.name: [] for p in proxies}
        for r in range(args.rounds):
            order = proxies[r % len(proxies):] + proxies[: r % len(proxies)]  # interleaved, rotating start
            for p in order:
                c0 = p.cpu()
                got = sbs.wrk_rps(p.port, up_port, args.rps_seconds, args.rps_conns, tmp)
                if got is None:
                    target = b"http://%s:%d/small" % (HOST.encode(), up_port)
                    got = asyncio.run(keepalive_rps(p.port, target, args.rps_seconds, args.rps_conns))
                used = p.cpu() - c0
                rps[p.name].append(got[0])
                cpu_req[p.name].append(used / got[1] * 1e6)
            if r < args.repeat:
                for p in order:
                    c0 = p.cpu()
                    f_bytes, f_secs = download_cut("forward", p.port, up_port, size, args.bulk_seconds)
                    t_bytes, t_secs = download_cut("tunnel", p.port, up_port, size, args.bulk_seconds)
                    fwd[p.name].append(f_bytes / f_secs / 1e6)
                    tun[p.name].append(t_bytes / t_secs / 1e6)
                    cpu_mb[p.name].append((p.cpu() - c0) / ((f_bytes + t_bytes) / 1e6) * 1e6)
        rows = [
            ("small keep-alive forwards, req/s", rps, "%.0f", True),
            ("  broker CPU per request, us", cpu_req, "%.0f", False),
            ("%d MB forward download, MB/s" % args.size_mb, fwd, "%.0f", True),
            ("%d MB CONNECT download, MB/s" % args.size_mb, tun, "%.0f", True),
            ("  broker CPU per MB carried, us", cpu_mb, "%.0f", False),
        ]
        names = [p.name for p in proxies]
        ours, other = names[0], names[-1]
        width = max(len(r[0]) for r in rows)
        cols = [max(len(n), 18) for n in names]
        print()
        print("%-*s  " % (width, "median (min-max)") + "  ".join("%*s" % (w, n) for w, n in zip(cols, names))
              + "  ours/proxy.py" + ("  ours/baseline" if args.baseline else ""))
        for label, data, fmt, _higher in rows:
            cells = []
            for w, n in zip(cols, names):
                xs = data[n]
                cell = (fmt % sbs.median(xs) + " (" + fmt % min(xs) + "-" + fmt % max(xs) + ")") if xs else "-"
                cells.append("%*s" % (w, cell))
            line = "%-*s  " % (width, label) + "  ".join(cells)
            if data[ours] and data[other]:
                line += "  %13.2f" % (sbs.median(data[ours]) / sbs.median(data[other]))
            if args.baseline and data[ours] and data[names[1]]:
                line += "  %13.2f" % (sbs.median(data[ours]) / sbs.median(data[names[1]]))
            print(line)
        print()
        for p in proxies[:-1]:
            audit = tmp / ("audit-this.jsonl" if p is proxies[0] else "audit-base.jsonl")
            print("%s: %d audit lines" % (p.name, sum(1 for _ in open(audit))))
        return 0
    finally:
        for proc in reversed(procs):
            proc.stop()
        if aio is not None:
            aio.terminate()
            aio.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


# -- orchestration ------------------------------------------------------------------------------------


def start_upstream() -> "Tuple[subprocess.Popen[str], int]":
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--upstream"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.match(r"upstream (\d+)", line)
    if not m:
        proc.kill()
        raise SystemExit("upstream did not start: %r" % line)
    return proc, int(m.group(1))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size-mb", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rps-seconds", type=float, default=3.0)
    ap.add_argument("--rps-conns", type=int, default=8)
    ap.add_argument("--tunnels", type=int, default=500)
    ap.add_argument("--vs-proxypy", metavar="PYTHON", help="instead: side by side with proxy.py (a Python that has"
                    " it, or 'auto' for a venv made once under --cache)")
    ap.add_argument("--baseline", metavar="REF_OR_DIR", help="with --vs-proxypy: also this git ref's (or"
                    " checkout's) broker, e.g. main")
    ap.add_argument("--rounds", type=int, default=5, help="with --vs-proxypy: interleaved rounds of small requests")
    ap.add_argument("--bulk-seconds", type=float, default=8.0, help="with --vs-proxypy: a download is cut after"
                    " this long (its rate is what it carried)")
    ap.add_argument("--proxypy-workers", type=int, help="proxy.py's --num-workers (default: its own, one per core)")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "agenshield-bench"),
                    help="where --vs-proxypy auto keeps its venv")
    args = ap.parse_args(argv)
    if args.upstream:
        run_upstream()
        return 0
    if args.vs_proxypy:
        _raise_fd_limit()
        return compare(args)

    from agenshield_shim.broker.runner import BrokerProcess

    _raise_fd_limit()
    size = args.size_mb * 1000 * 1000
    up, up_port = start_upstream()
    audit = tempfile.NamedTemporaryFile(prefix="broker-bench-audit-", suffix=".jsonl", delete=False)
    audit.close()
    broker = BrokerProcess(["--host", HOST, "--port", "0", "--allow", "%s:%d" % (HOST, up_port), "--audit", audit.name])
    rows: List[Tuple[str, str, str]] = []
    failures = 0
    try:
        print("upstream 127.0.0.1:%d, broker %s, python %s" % (up_port, broker.url, sys.version.split()[0]))
        best = {}
        for mode in ("direct", "tunnel", "forward"):
            times = [download(mode, broker.port, up_port, size) for _ in range(args.repeat)]
            best[mode] = min(times)
        d = size / best["direct"] / 1e6
        rows.append(("%d MB download, direct" % args.size_mb, "%.0f MB/s" % d, "1.00"))
        for mode, label in (("tunnel", "CONNECT tunnel"), ("forward", "forward proxy")):
            v = size / best[mode] / 1e6
            rows.append(("%d MB download, %s" % (args.size_mb, label), "%.0f MB/s" % v, "%.2f" % (v / d)))

        rps_direct, n_direct = asyncio.run(keepalive_rps(up_port, b"/small", args.rps_seconds, args.rps_conns))
        target = b"http://%s:%d/small" % (HOST.encode(), up_port)
        rps_fwd, n_fwd = asyncio.run(keepalive_rps(broker.port, target, args.rps_seconds, args.rps_conns))
        rows.append(("small keep-alive GETs, direct (%d conns)" % args.rps_conns,
                     "%.0f req/s" % rps_direct, "1.00"))
        rows.append(("small keep-alive GETs, forward proxy (%d conns)" % args.rps_conns,
                     "%.0f req/s" % rps_fwd, "%.2f" % (rps_fwd / rps_direct)))

        secs, ok, setup = asyncio.run(concurrent_tunnels(broker.port, up_port, args.tunnels))
        rows.append(("%d concurrent tunnels (all open at once)" % args.tunnels,
                     "%d/%d ok in %.2f s" % (ok, args.tunnels, secs), "setup %.2f s" % setup))
        if ok != args.tunnels:
            failures += 1
    finally:
        code = broker.stop()
        up.terminate()
        up.wait(10)
        if up.stdout:
            up.stdout.close()
        audit_lines = sum(1 for _ in open(audit.name))
        os.unlink(audit.name)
    width = max(len(r[0]) for r in rows)
    print()
    print("%-*s  %22s  %s" % (width, "measure", "result", "ratio to direct"))
    print("-" * (width + 42))
    for name, value, ratio in rows:
        print("%-*s  %22s  %s" % (width, name, value, ratio))
    print()
    print("broker exit status %d after SIGTERM; %d audit lines written" % (code, audit_lines))
    return 1 if failures or code != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
