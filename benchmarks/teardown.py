"""What closing the network at teardown costs, in-process (see ``_boot``'s teardown section).

Usage: python benchmarks/teardown.py [--python PATH] [--runs N]

Each round is a fresh interpreter of an environment with this checkout's shim (every step is
once per process): the CPU time of ``teardown`` unprepared, in a process that never loaded
``_socket`` (what every other process pays at exit: a scan of OSError's subclasses), of
``prepare_teardown`` (fetching ``_ctypes``'s functions: what the import of ``_socket``, or the
exit, pays) and of ``teardown`` prepared (no_new_privs and the seccomp filter). Medians and
quartiles.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _venvs import build_wheel, clean_env, make_venv, python_version  # noqa: E402

ROUND = """
import time
from agenshield_shim import _boot
clock = time.process_time_ns
t0 = clock(); assert _boot.teardown() is None; t1 = clock()
_boot.prepare_teardown(); t2 = clock()
assert _boot.teardown() is True; t3 = clock()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        shim = make_venv(args.python, tmp / "shim", build_wheel(tmp / "wheel"))
        rows = []
        for _ in range(args.runs):
            out = subprocess.run([shim, "-c", ROUND], env=clean_env(AGENSHIELD_ENABLED="false"),
                                 capture_output=True, text=True, check=True).stdout
            rows.append([int(x) / 1000 for x in out.split()])
    print("Python %s, %d fresh interpreters, CPU time" % (python_version(args.python), args.runs))
    for index, label in enumerate(("teardown, nothing to close", "prepare_teardown (_ctypes)",
                                   "teardown (prctl, seccomp)")):
        values = [row[index] for row in rows]
        q = statistics.quantiles(values, n=4)
        print("%-32s median %8.1f us   quartiles %.1f-%.1f us" % (label, statistics.median(values), q[0], q[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
