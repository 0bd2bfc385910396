"""What the shim's aiohttp hook adds per request, measured so that noise cannot hide it:
``python benchmarks/aiohttp_overhead.py [--baseline main] [--callgrind]``.

One upstream (the broker benchmark's aiohttp upstream) and one reference broker (this checkout's),
each in its own process, on loopback. The clients keep one ``ClientSession`` and make small
keep-alive GETs to ``http://`` (the broker forwards them in absolute form):

* **by hand**: aiohttp without the shim, ``proxy=`` the broker on every request (the shim's path);
* **shim**: aiohttp with this checkout's wheel, no proxy setting, the default transport (``auto``);
* **baseline** (``--baseline REF``): the same with the wheel of a git ref (``main``), so a change is
  measured beside what it replaces, in the same run.

Three figures, each a shim/by-hand ratio (budget <= 1.05x):

1. **CPU per request** (``time.process_time`` of the client process over the measured requests),
   in interleaved rounds (every client once per round, in a new random order): the ratio is taken
   within each round, where a load shift on the shared machine hits every client alike, and the
   median of the per-round ratios is reported with their spread;
2. **latency** (median wall time of a request, same rounds, same per-round ratios): the end-to-end
   figure, the noisiest;
3. ``--callgrind``: **instructions per request** under ``valgrind --tool=callgrind``, counted between
   two ``os.getppid()`` calls that bracket the measured requests (``--dump-before=os_getppid``), so
   start-up and warm-up are not counted. The figure to trust on a shared machine: repeatable to
   1-3% (what is left is the event loop's iterations, the interpreter's type cache and garbage
   collector, which depend on timing and memory layout: hence the median of several runs), where
   the per-round CPU and latency ratios spread by 10-20% either way.

2026-12-07, Python 3.11, aiohttp 3.14.5: by hand ~385k instructions a request; the shim of main
1.07-1.10x, this hook 1.00-1.03x; a do-nothing ``_request`` wrapper (one coroutine passing the
kwargs on) is 1.01x by itself.
"""

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _sidebyside import start  # noqa: E402
from _venvs import ROOT, build_wheel, checkout, clean_env, make_venv, python_version  # noqa: E402

CLIENT = r'''
import asyncio, json, os, sys, time
import aiohttp
mode, url, broker, n, warmup = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
proxy = broker if mode == "by hand" else None  # the shim routes without a proxy setting
lat = []
async def main():
    async with aiohttp.ClientSession(trust_env=False) as s:
        for _ in range(warmup):
            async with s.get(url, proxy=proxy) as r:
                await r.read()
        os.getppid()  # callgrind: the measured span starts here (--dump-before=os_getppid)
        cpu = time.process_time()
        for _ in range(n):
            t = time.perf_counter()
            async with s.get(url, proxy=proxy) as r:
                await r.read()
            lat.append(time.perf_counter() - t)
        cpu = time.process_time() - cpu
        os.getppid()  # ... and ends here
        return cpu
cpu = asyncio.run(main())
print(json.dumps({"cpu": cpu / n, "latency": sorted(lat)[n // 2]}))
'''


def baseline_wheel(ref: str, tmp: Path) -> Path:
    """The wheel of a git ref of this repository (``git archive``: the work tree is not touched)."""
    return build_wheel(tmp / "baseline-wheel", checkout(ref, tmp / "baseline-src"))


def run_client(python: str, mode: str, url: str, broker: str, n: int, warmup: int, env: Dict[str, str],
               prefix: Optional[List[str]] = None) -> Dict[str, float]:
    out = subprocess.run((prefix or []) + [python, "-c", CLIENT, mode, url, broker, str(n), str(warmup)],
                         env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError("%s client failed:\n%s" % (mode, out.stderr))
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def instructions(python: str, mode: str, url: str, broker: str, n: int, env: Dict[str, str], tmp: Path) -> float:
    """Instructions per request between the two ``os.getppid()`` markers (callgrind's second dump)."""
    out = tmp / "callgrind.out"
    for old in tmp.glob("callgrind.out*"):
        old.unlink()
    prefix = ["valgrind", "--tool=callgrind", "--dump-before=os_getppid", "--callgrind-out-file=%s" % out]
    run_client(python, mode, url, broker, n, 20, dict(env, PYTHONHASHSEED="0"), prefix)
    for line in (tmp / "callgrind.out.2").read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1]) / n
    raise RuntimeError("no totals in callgrind's dump")


def spread(values: List[float]) -> str:
    return "median %.3fx (min %.3fx, max %.3fx, n=%d)" % (statistics.median(values), min(values), max(values),
                                                          len(values))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (every client once each)")
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per client and round")
    parser.add_argument("--baseline", metavar="REF", help="also the shim of this git ref (e.g. main)")
    parser.add_argument("--callgrind", action="store_true", help="also instructions per request (valgrind)")
    parser.add_argument("--callgrind-requests", type=int, default=300)
    parser.add_argument("--callgrind-runs", type=int, default=5)
    args = parser.parse_args()
    if args.callgrind and shutil.which("valgrind") is None:
        parser.error("--callgrind needs valgrind (apt-get install valgrind)")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        clients = [("by hand", make_venv(args.python, tmp / "bare", None, "aiohttp"))]
        clients.append(("shim", make_venv(args.python, tmp / "shim", build_wheel(tmp / "wheel"), "aiohttp")))
        if args.baseline:
            wheel = baseline_wheel(args.baseline, tmp)
            clients.append(("shim " + args.baseline, make_venv(args.python, tmp / "baseline", wheel, "aiohttp")))
        env = clean_env(PYTHONPATH=str(ROOT))
        upstream, line = start([sys.executable, str(ROOT / "benchmarks" / "broker.py"), "--upstream"], "upstream", env)
        url = "http://127.0.0.1:%d/small" % int(line.split()[-1])
        ready = tmp / "broker.ready"
        broker, _ = start([sys.executable, "-m", "agenshield_shim.broker", "--port", "0", "--ready-file", str(ready),
                           "--audit", str(tmp / "audit.jsonl")], "listening", env)
        broker_port = int(ready.read_text().strip().rsplit(":", 1)[1])
        broker_url = "http://127.0.0.1:%d" % broker_port
        variables = clean_env(AGENSHIELD_BROKER_HOST="127.0.0.1", AGENSHIELD_BROKER_PORT=str(broker_port))
        try:
            rounds: List[Dict[str, Dict[str, float]]] = []
            for _ in range(args.rounds):
                order = list(clients)
                random.shuffle(order)
                rounds.append({name: run_client(python, "by hand" if name == "by hand" else "shim", url, broker_url,
                                                args.requests, 50, variables)
                               for name, python in order})
            counts: Dict[str, List[float]] = {name: [] for name, _ in clients}
            if args.callgrind:
                for _ in range(args.callgrind_runs):
                    for name, python in clients:
                        mode = "by hand" if name == "by hand" else "shim"
                        counts[name].append(instructions(python, mode, url, broker_url, args.callgrind_requests,
                                                         variables, tmp))
        finally:
            broker.terminate()
            upstream.terminate()
            broker.wait(10)
            upstream.wait(10)
    print("Python %s, aiohttp keep-alive GETs of http:// through the reference broker (forwarded, absolute form); "
          "%d rounds x %d requests per client" % (python_version(args.python), args.rounds, args.requests))
    print("%-12s %14s %14s   %s" % ("client", "CPU us/req", "latency us", "ratios to by hand, per round"))
    for name, _ in clients:
        cpu = statistics.median(r[name]["cpu"] for r in rounds)
        lat = statistics.median(r[name]["latency"] for r in rounds)
        print("%-12s %14.1f %14.1f" % (name, cpu * 1e6, lat * 1e6))
        if name != "by hand":
            print("%-12s CPU     %s" % ("", spread([r[name]["cpu"] / r["by hand"]["cpu"] for r in rounds])))
            print("%-12s latency %s" % ("", spread([r[name]["latency"] / r["by hand"]["latency"] for r in rounds])))
    if args.callgrind:
        print("instructions per request (callgrind, %d requests, median of %d runs; spread min-max):" % (
            args.callgrind_requests, args.callgrind_runs))
        hand = statistics.median(counts["by hand"])
        for name, _ in clients:
            ir = counts[name]
            print("%-12s %10.0f  (%.0f-%.0f)  %.3fx" % (name, statistics.median(ir), min(ir), max(ir),
                                                         statistics.median(ir) / hand))
    return 0


if __name__ == "__main__":
    sys.exit(main())
