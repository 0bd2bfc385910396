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
"""

import argparse
import asyncio
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

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
            w.write(b"CONNECT %s:%d HTTP/1.1\r\n\r\n" % (HOST.encode(), up_port))
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
    args = ap.parse_args(argv)
    if args.upstream:
        run_upstream()
        return 0

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
