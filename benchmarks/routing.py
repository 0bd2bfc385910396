"""What routing through the shim costs, per library: ``python benchmarks/routing.py``.

Side by side in one run, on loopback only, against one upstream (the broker benchmark's aiohttp
upstream, in its own process) and one reference broker (the real CLI, in its own process):

* **shim**: a virtual environment with the wheel; the library is used as the application would,
  with no proxy setting (the hook routes it to the broker);
* **by hand**: a virtual environment without the shim, the library sent to the broker by hand on
  the path the shim takes (what the shim should cost nothing over: budget <= 1.05x): requests
  through a ``CONNECT`` tunnel it opens itself (the shim tunnels every http.client connection,
  ``http://`` included), httpx and aiohttp with the broker as their proxy (absolute-form forwarding
  for ``http://``, as the shim configures them); the path is printed beside each library;
* **direct**: the same library straight to the upstream (reported for scale);
* **rpc**: the shim with ``AGENSHIELD_TRANSPORT=rpc`` (each request one JSON-RPC ``http_request``
  call, bodies buffered and base64-encoded), reported against the tunnel (the ``shim`` row).

Then the AgenShield daemon (``@agenshield/broker`` 0.7.2 from the npm registry, ``tests/daemon.py``)
beside the reference broker, in the same interleaved rounds: the shim with its default transport
(``auto``, which picks rpc for the daemon) against the daemon over HTTP and over its Unix socket,
and ``rpc`` against the reference broker; downloads are ASCII text here (``/text``), the only
bodies the daemon carries. Last, what the ``auto`` probe costs once per process: the median of
``_transport.probe`` in fresh interpreters, for each broker.

For requests, httpx and aiohttp: the median latency of small keep-alive GETs on one session, and
the best throughput of ten 10 MB downloads; every library and mode runs in each of five rounds,
in a new random order each round. Then the first-import cost of each library
(``python -c "import X"`` minus ``python -c pass``) with and without the shim (budget <= 1.15x).
Every loop is bounded; the whole run takes a few minutes.
"""

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _sidebyside import start  # noqa: E402
from _venvs import ROOT, build_wheel, clean_env, make_venv, python_version  # noqa: E402

sys.path.insert(0, str(ROOT))
from tests.daemon import Daemon  # noqa: E402

LIBRARIES = ("requests", "httpx", "aiohttp")

CLIENT = r'''
import json, sys, time
lib, mode, base, broker, n, size = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
rounds, big_path = int(sys.argv[7]), sys.argv[8]
proxy = broker if mode == "by hand" else None  # shim and rpc: no proxy setting, the hooks route
small, big = base + "/small", base + big_path + "?n=%d" % size
lat, rates = [], []
if lib == "requests":
    import requests
    s = requests.Session()
    s.trust_env = False
    proxies = None
    if proxy:  # the shim's path by hand: a CONNECT tunnel through the broker, also for http:// (not forwarding)
        import urllib3
        from urllib.parse import urlsplit
        from requests.adapters import HTTPAdapter
        b = urlsplit(proxy)

        class Tunnelled(urllib3.connection.HTTPConnection):
            def __init__(self, host, port=None, **kw):
                super().__init__(b.hostname, b.port, **kw)
                self.set_tunnel(host, port)

        class TunnelAdapter(HTTPAdapter):
            def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
                return self.get_connection(request.url, proxies)

            def get_connection(self, url, proxies=None):
                pool = self.poolmanager.connection_from_url(url)
                pool.ConnectionCls = Tunnelled
                return pool

        s.mount("http://", TunnelAdapter())
    s.get(small, proxies=proxies).content
    for _ in range(n):
        t = time.perf_counter(); s.get(small, proxies=proxies).content; lat.append(time.perf_counter() - t)
    for _ in range(rounds):
        t = time.perf_counter(); got = len(s.get(big, proxies=proxies).content); rates.append(got / (time.perf_counter() - t))
elif lib == "httpx":
    import httpx
    kw = {"proxy": proxy} if proxy and tuple(map(int, httpx.__version__.split(".")[:2])) >= (0, 26) else ({"proxies": proxy} if proxy else {})
    with httpx.Client(trust_env=False, **kw) as c:
        c.get(small).content
        for _ in range(n):
            t = time.perf_counter(); c.get(small).content; lat.append(time.perf_counter() - t)
        for _ in range(rounds):
            t = time.perf_counter(); got = len(c.get(big).content); rates.append(got / (time.perf_counter() - t))
else:
    import asyncio, aiohttp
    async def main():
        async with aiohttp.ClientSession(trust_env=False) as s:
            async with s.get(small, proxy=proxy) as r: await r.read()
            for _ in range(n):
                t = time.perf_counter()
                async with s.get(small, proxy=proxy) as r: await r.read()
                lat.append(time.perf_counter() - t)
            for _ in range(rounds):
                t = time.perf_counter()
                async with s.get(big, proxy=proxy) as r: got = len(await r.read())
                rates.append(got / (time.perf_counter() - t))
    asyncio.run(main())
print(json.dumps({"latencies": lat, "rates": rates}))
'''


TEXT_MODES = ("ref rpc", "daemon", "daemon unix")

PROBE = r'''
import sys, time
t = time.perf_counter()
import socket  # what every HTTP library has imported before its first request
from agenshield_shim import _boot, _transport, _rpc  # what the probe loads (the rpc core: its ping)
config = _boot.active_config()
loaded = time.perf_counter()
choice = _transport.probe(config)
done = time.perf_counter()
print(loaded - t, done - loaded, choice.transport)
'''


def probe_cost(python: str, variables: Dict[str, str], runs: int) -> Tuple[float, float]:
    """Median cost of the ``auto`` transport's probe (once per process) in fresh interpreters:
    loading its modules, and the questions to the broker."""
    loads, asks = [], []
    for _ in range(runs):
        out = subprocess.run([python, "-c", PROBE], env=clean_env(**variables), capture_output=True, text=True,
                             timeout=60, check=True)
        load, ask, _ = out.stdout.split()
        loads.append(float(load))
        asks.append(float(ask))
    return statistics.median(loads), statistics.median(asks)


def import_costs(bare: str, shim: str, module: str, runs: int) -> Tuple[float, float]:
    """First-import time of ``module`` (``import X`` minus ``pass``) without and with the shim.

    The four commands run interleaved, in a new random order each run, so a load shift on the
    shared machine hits both sides alike.
    """
    def wall(python: str, code: str) -> float:
        t = time.perf_counter()
        subprocess.run([python, "-c", code], check=True, env=clean_env())
        return time.perf_counter() - t

    cases = [(bare, "import " + module), (bare, "pass"), (shim, "import " + module), (shim, "pass")]
    times: Dict[Tuple[str, str], List[float]] = {case: [] for case in cases}
    for _ in range(runs):
        random.shuffle(cases)
        for python, code in cases:
            times[(python, code)].append(wall(python, code))

    def cost(python: str) -> float:
        return statistics.median(times[(python, "import " + module)]) - statistics.median(times[(python, "pass")])

    return cost(bare), cost(shim)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--requests", type=int, default=300, help="small requests per library and mode")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (2 downloads each)")
    parser.add_argument("--size-mb", type=int, default=10)
    parser.add_argument("--import-runs", type=int, default=20)
    args = parser.parse_args()
    size = args.size_mb * 1000 * 1000
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        wheel = build_wheel(tmp / "wheel")
        shim = make_venv(args.python, tmp / "shim", wheel, *LIBRARIES)
        bare = make_venv(args.python, tmp / "bare", None, *LIBRARIES)
        env = clean_env(PYTHONPATH=str(ROOT))
        upstream, line = start([sys.executable, str(ROOT / "benchmarks" / "broker.py"), "--upstream"], "upstream", env)
        up_port = int(line.split()[-1])
        ready = tmp / "broker.ready"
        broker, _ = start(
            [sys.executable, "-m", "agenshield_shim.broker", "--port", "0", "--ready-file", str(ready),
             "--audit", str(tmp / "audit.jsonl")],
            "listening", env,
        )
        broker_port = int(ready.read_text().strip().rsplit(":", 1)[1])
        daemon = Daemon(tmp / "daemon")
        try:
            base = "http://127.0.0.1:%d" % up_port
            broker_url = "http://127.0.0.1:%d" % broker_port
            samples: Dict[Tuple[str, str], Dict[str, List[float]]] = {}
            reference = {"AGENSHIELD_BROKER_HOST": "127.0.0.1", "AGENSHIELD_BROKER_PORT": str(broker_port)}
            on_daemon = {"AGENSHIELD_BROKER_HOST": "127.0.0.1", "AGENSHIELD_BROKER_PORT": str(daemon.port)}
            variables_of = {
                "shim": reference, "by hand": reference, "direct": reference,
                "rpc": dict(reference, AGENSHIELD_TRANSPORT="rpc"),
                "ref rpc": dict(reference, AGENSHIELD_TRANSPORT="rpc"),
                "daemon": on_daemon,
                "daemon unix": dict(on_daemon, AGENSHIELD_BROKER_SOCKET=daemon.socket_path),
            }
            runs = [(lib, mode, python) for lib in LIBRARIES
                    for mode, python in (("shim", shim), ("rpc", shim), ("by hand", bare), ("direct", bare),
                                         ("ref rpc", shim), ("daemon", shim), ("daemon unix", shim))]
            for _ in range(args.rounds):  # interleaved in a new random order each round: load shifts hit all modes
                random.shuffle(runs)
                for lib, mode, python in runs:
                    big_path = "/text" if mode in TEXT_MODES else "/big"
                    out = subprocess.run(
                        [python, "-c", CLIENT, lib, mode, base, broker_url, str(args.requests // args.rounds),
                         str(size), "2", big_path],
                        env=clean_env(**variables_of[mode]), capture_output=True, text=True, timeout=600,
                    )
                    if out.returncode != 0:
                        raise RuntimeError("%s %s failed:\n%s" % (lib, mode, out.stderr))
                    got = json.loads(out.stdout.strip().splitlines()[-1])
                    bucket = samples.setdefault((lib, mode), {"latencies": [], "rates": []})
                    bucket["latencies"] += got["latencies"]
                    bucket["rates"] += got["rates"]
            results = {key: {"latency": statistics.median(v["latencies"]), "rate": max(v["rates"])}
                       for key, v in samples.items()}
            costs = {lib: import_costs(bare, shim, lib, args.import_runs) for lib in LIBRARIES}
            probes = {name: probe_cost(shim, variables_of[mode], args.import_runs)
                      for name, mode in (("reference broker (ping)", "shim"),
                                         ("daemon, HTTP (ping + CONNECT)", "daemon"),
                                         ("daemon, Unix socket (ping)", "daemon unix"))}
        finally:
            daemon.stop()
            broker.terminate()
            upstream.terminate()
            broker.wait(10)
            upstream.wait(10)
    version = python_version(args.python)
    print("Python %s; %d small requests (median), best of %d x %d MB; %d interleaved rounds; loopback" % (
        version, args.requests, 2 * args.rounds, args.size_mb, args.rounds))
    print("paths (shim and by hand alike): requests: CONNECT tunnel; httpx, aiohttp: forward proxy (absolute form)")
    print("%-9s %-8s %12s %9s %12s %9s" % ("library", "mode", "latency us", "vs hand", "MB/s", "vs hand"))
    for lib in LIBRARIES:
        hand = results[(lib, "by hand")]
        for mode in ("shim", "by hand", "direct", "rpc"):
            r = results[(lib, mode)]
            print("%-9s %-8s %12.0f %8.3fx %12.0f %8.3fx" % (
                lib, mode, r["latency"] * 1e6, r["latency"] / hand["latency"], r["rate"] / 1e6, r["rate"] / hand["rate"]))
    print("rpc against the tunnel (the shim row): latency and throughput ratios")
    for lib in LIBRARIES:
        rpc, tunnel = results[(lib, "rpc")], results[(lib, "shim")]
        print("%-9s latency %6.2fx   %d MB download %6.2fx" % (
            lib, rpc["latency"] / tunnel["latency"], args.size_mb, rpc["rate"] / tunnel["rate"]))
    print("the daemon beside the reference broker (text bodies; the shim's default transport picks rpc for the "
          "daemon), against rpc on the reference broker")
    print("%-9s %-12s %12s %9s %12s %9s" % ("library", "broker", "latency us", "vs ref", "MB/s", "vs ref"))
    for lib in LIBRARIES:
        ref = results[(lib, "ref rpc")]
        for mode in TEXT_MODES:
            r = results[(lib, mode)]
            print("%-9s %-12s %12.0f %8.3fx %12.0f %8.3fx" % (
                lib, mode, r["latency"] * 1e6, r["latency"] / ref["latency"], r["rate"] / 1e6, r["rate"] / ref["rate"]))
    print("the auto transport's probe, once per process (median of %d fresh interpreters):" % args.import_runs)
    for name, (load, ask) in probes.items():
        print("  %-32s modules %6.2f ms, questions %6.2f ms" % (name, load * 1000, ask * 1000))
    print("%-9s %14s %14s %8s" % ("import", "without ms", "with shim ms", "ratio"))
    for lib, (without, with_shim) in costs.items():
        print("%-9s %14.1f %14.1f %7.3fx" % (lib, without * 1000, with_shim * 1000, with_shim / without))
    return 0


if __name__ == "__main__":
    sys.exit(main())
