"""Start-up cost of the shim, and the guard's cost on events that are not network events.

Usage: python benchmarks/startup.py [--python PATH] [--runs N] [--baseline GIT-REF]

Everything is measured side by side in one run, interleaved in a new random order
each round, so the machine's noise falls on every column alike; the figures that
matter are the ratios (of medians, and of lower quartiles, which noise moves less).

1. ``python -c pass`` in a virtual environment without the shim, with it
   enabled, and with ``AGENSHIELD_ENABLED=false`` (budget: enabled <= 1.10x,
   disabled <= 1.02x the bare interpreter); and, for reference, the bare one with a
   ``.pth`` file holding only ``import os, sys``: what ``site`` charges for any ``.pth``
   file, the floor under the disabled shim.
2. The audit hook's cost on non-network events, in-process: 100,000 ``open()``
   calls, and importing a large set of standard-library packages in a fresh
   interpreter (budget: <= 1.05x). For ``open()``, three floors beside it, in the bare
   environment: a no-op audit hook written in C (``{}.get``: what CPython's event
   machinery costs with any hook at all), a no-op hook written in Python (what
   calling any Python hook costs; a PEP 578 guard cannot be cheaper), and that no-op
   hook registered as its ``__call__`` method-wrapper, as the shim registers its own
   (what a Python hook costs that nobody can switch tracing on in; see ``_boot.seal``).
   The large import gets the C and the sealed floors too: on 3.8 every code object
   unmarshalled raises a ``code.__new__`` event (6,000 of them here).
3. Start to exit of ``python -c "import socket"`` in the bare and the shim environment: what
   closing the network at teardown costs a process that loaded ``_socket`` (``_ctypes`` fetched
   at its import, the seccomp filter installed when CPython clears the hooks), on top of the
   plain start the first table measures.

``--baseline REF`` adds, to tables 1 and 3, an environment with the shim built from that git
ref (say ``main``): before and after a change, in the same interleaved run. ``--instructions``
also counts, for the same columns, the instructions each start executes to its exit under
``valgrind --tool=callgrind`` (the median of three, PYTHONHASHSEED=0): a figure the noise of a
shared machine does not move, where wall time on it does.
"""

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _venvs import bare_and_shim, build_wheel, checkout, clean_env, make_floor_venv, make_venv, python_version  # noqa: E402

#: Run first by both in-process measurements. Its argument names the audit hook to add: none,
#: or a floor (one that does nothing: written in C; written in Python; that one sealed, as ours is).
FLOOR_HOOK = """
import sys, time
noop = lambda event, args: None
floor = {"none": None, "c": {}.get, "py": noop, "sealed": noop.__call__}[sys.argv[1]]
if floor is not None:
    sys.addaudithook(floor)
"""

OPEN_LOOP = FLOOR_HOOK + """
path = sys.argv[2]
t = time.perf_counter()
for _ in range(100_000):
    open(path, "rb").close()
print(time.perf_counter() - t)
"""

BIG_IMPORT = FLOOR_HOOK + """
t = time.perf_counter()
import asyncio, email.mime.multipart, http.client, json, decimal, unittest, xml.etree.ElementTree, logging.handlers
import urllib.request, concurrent.futures, sqlite3, argparse, tarfile, zipfile, csv, difflib, pydoc
print(time.perf_counter() - t)
"""


def wall(cmd: List[str], env: Dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def instructions(cmd: List[str], env: Dict[str, str]) -> int:
    """Instructions from start to exit (the process itself, not its children), by callgrind."""
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *cmd],
        env=dict(env, PYTHONHASHSEED="0"), capture_output=True, text=True, check=True,
    ).stderr
    line = [text for text in out.splitlines() if "Collected :" in text][-1]
    return int(line.split(":")[-1])


def inner(cmd: List[str], env: Dict[str, str]) -> float:
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--baseline", metavar="GIT-REF", help="also measure the shim built from this ref")
    parser.add_argument("--instructions", action="store_true", help="also count instructions (callgrind)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        bare, shim = bare_and_shim(args.python, tmp)
        floor = make_floor_venv(args.python, tmp / "floor")
        target = tmp / "file.bin"
        target.write_bytes(b"x")
        on, off = clean_env(), clean_env(AGENSHIELD_ENABLED="false")
        columns = {
            "bare": ([bare, "-c", "pass"], on),
            "shim enabled": ([shim, "-c", "pass"], on),
            "shim disabled": ([shim, "-c", "pass"], off),
            "any .pth (import os, sys)": ([floor, "-c", "pass"], on),
            "socket: bare": ([bare, "-c", "import socket"], on),
            "socket: shim enabled": ([shim, "-c", "import socket"], on),
        }
        if args.baseline:
            wheel = build_wheel(tmp / "baseline-wheel", checkout(args.baseline, tmp / "baseline-src"))
            before = make_venv(args.python, tmp / "baseline", wheel)
            columns["shim enabled (%s)" % args.baseline] = ([before, "-c", "pass"], on)
            columns["socket: shim enabled (%s)" % args.baseline] = ([before, "-c", "import socket"], on)
        starts: Dict[str, List[float]] = {k: [] for k in columns}
        for _ in range(3):  # warm the file cache
            for cmd, env in columns.values():
                wall(cmd, env)
        order = list(columns)
        for _ in range(args.runs):
            random.shuffle(order)  # no column always runs first (or right after another)
            for name in order:
                cmd, env = columns[name]
                starts[name].append(wall(cmd, env))
        measures = {  # column: (interpreter, script, audit hook added by FLOOR_HOOK)
            "open bare": (bare, OPEN_LOOP, "none"),
            "open shim": (shim, OPEN_LOOP, "none"),
            "open c-hook": (bare, OPEN_LOOP, "c"),
            "open py-hook": (bare, OPEN_LOOP, "py"),
            "open sealed-hook": (bare, OPEN_LOOP, "sealed"),
            "import bare": (bare, BIG_IMPORT, "none"),
            "import shim": (shim, BIG_IMPORT, "none"),
            "import c-hook": (bare, BIG_IMPORT, "c"),
            "import sealed-hook": (bare, BIG_IMPORT, "sealed"),
        }
        counts = {name: statistics.median(instructions(*columns[name]) for _ in range(3))
                  for name in (columns if args.instructions else ())}
        guard: Dict[str, List[float]] = {name: [] for name in measures}
        for _ in range(max(5, args.runs // 4)):
            for name, (python, script, hook) in measures.items():
                guard[name].append(inner([python, "-c", script, hook, str(target)], on))
    version = python_version(args.python)
    print("Python %s, %d interleaved runs" % (version, args.runs))
    for title, reference in (("python -c pass", "bare"), ('python -c "import socket"', "socket: bare")):
        base = statistics.median(starts[reference])
        low = statistics.quantiles(starts[reference], n=4)[0]
        print("%-34s %10s %8s %10s %8s" % (title, "median ms", "ratio", "p25 ms", "ratio"))
        for name, values in starts.items():
            if name.startswith("socket:") != reference.startswith("socket:"):
                continue
            median, p25 = statistics.median(values), statistics.quantiles(values, n=4)[0]
            print("%-34s %10.2f %7.3fx %10.2f %7.3fx" % (name, median * 1000, median / base, p25 * 1000, p25 / low))
    if counts:
        print("%-34s %14s %8s %14s" % ("instructions, start to exit", "count", "ratio", "more than bare"))
        for name, count in counts.items():
            reference = counts["socket: bare" if name.startswith("socket:") else "bare"]
            print("%-34s %14d %7.3fx %14d" % (name, count, count / reference, count - reference))
    print("%-28s %10s %8s" % ("guard on other events", "median ms", "ratio"))
    rows = (
        ("100,000 open() calls", "open shim", "open bare"),
        ("  floor: no-op C hook", "open c-hook", "open bare"),
        ("  floor: no-op Python hook", "open py-hook", "open bare"),
        ("  floor: the same, sealed", "open sealed-hook", "open bare"),
        ("large stdlib import", "import shim", "import bare"),
        ("  floor: no-op C hook", "import c-hook", "import bare"),
        ("  floor: no-op Python, sealed", "import sealed-hook", "import bare"),
    )
    for label, column, reference in rows:
        b, s = statistics.median(guard[reference]), statistics.median(guard[column])
        print("%-28s %10.2f %7.3fx   (bare %.2f ms)" % (label, s * 1000, s / b, b * 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
