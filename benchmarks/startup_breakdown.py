"""Where the enabled shim's start-up time goes: the same install, taken apart step by step.

Usage: python benchmarks/startup_breakdown.py [--python PATH] [--runs N]

benchmarks/startup.py gives the figures the budget is judged on; this one says what they are
made of. Each column is a copy of one virtual environment with the shim installed, changed in
one way, and the figure is the CPU time the interpreter has used when the user's code starts
(``time.process_time()`` as the first statement of ``-c``): less noisy than wall time on a shared
machine, and blind to what happens after (interpreter shutdown is left out). Columns, cheapest
first; each adds one step to the one before:

* ``bare``: no shim;
* ``any .pth``: one more ``.pth`` file, holding only ``import os, sys``;
* ``our .pth line``: the shim's line with the exec of the boot cut off (what a disabled
  interpreter runs, and an enabled one runs first);
* ``+ empty modules``: the whole line, importing a package and a ``_boot`` with nothing in them;
* ``+ guard and registry loaded``: the real modules, with ``boot()`` returning at once;
* ``shim``: the real install.
"""

import argparse
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _venvs import (  # noqa: E402
    ROOT, bare_and_shim, clean_env, make_floor_venv, python_version, site_packages,
)

sys.path.insert(0, str(ROOT / "tools"))
import make_pth  # noqa: E402  # the pieces of agenshield_shim.pth

PROBE = "import time; print(time.process_time())"


def variant(shim: Path, target: Path) -> Tuple[str, Path]:
    """A copy of the shim's environment (venvs run from a copy: pyvenv.cfg holds no own path)."""
    shutil.copytree(shim, target, symlinks=True)
    exe = str(target / "bin" / "python")
    return exe, site_packages(exe)


def compile_package(python: str, package: Path) -> None:
    subprocess.run([python, "-m", "compileall", "-q", str(package)], check=True, stdout=subprocess.DEVNULL,
                   env=clean_env(AGENSHIELD_ENABLED="false"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--runs", type=int, default=150)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        bare, shim = bare_and_shim(args.python, tmp)
        columns: Dict[str, str] = {"bare": bare}

        columns["any .pth"] = make_floor_venv(args.python, tmp / "floor")

        exe, sp = variant(tmp / "shim", tmp / "line")
        line = make_pth.LINE[: make_pth.LINE.index(" or exec(")]
        (sp / "agenshield_shim.pth").write_text(make_pth.HEADER + line + "\n")
        columns["our .pth line"] = exe

        exe, sp = variant(tmp / "shim", tmp / "empty")
        (sp / "agenshield_shim" / "__init__.py").write_text("")
        (sp / "agenshield_shim" / "_boot.py").write_text("def boot():\n    pass\n")
        compile_package(exe, sp / "agenshield_shim")
        columns["+ empty modules"] = exe

        exe, sp = variant(tmp / "shim", tmp / "loaded")
        boot = sp / "agenshield_shim" / "_boot.py"
        text = boot.read_text()
        marker = "    _booted = True\n"
        assert text.count(marker) == 1, "boot() changed shape: update this benchmark"
        boot.write_text(text.replace(marker, marker + "    return\n"))
        compile_package(exe, sp / "agenshield_shim")
        columns["+ guard and registry loaded"] = exe

        columns["shim"] = shim
        env = clean_env()
        cpu: Dict[str, List[float]] = {name: [] for name in columns}
        order = list(columns)
        for _ in range(3):
            for python in columns.values():
                subprocess.run([python, "-c", PROBE], env=env, check=True, capture_output=True)
        for _ in range(args.runs):
            random.shuffle(order)
            for name in order:
                out = subprocess.run([columns[name], "-c", PROBE], env=env, check=True, capture_output=True, text=True)
                cpu[name].append(float(out.stdout))
    version = python_version(args.python)
    print("Python %s, %d interleaved runs; CPU time used when user code starts (medians)" % (version, args.runs))
    print("%-30s %9s %10s %10s" % ("", "ms", "over bare", "this step"))
    base = previous = statistics.median(cpu["bare"])
    for name, values in cpu.items():
        median = statistics.median(values)
        print("%-30s %9.3f %+8.0f us %+8.0f us" % (name, median * 1000, (median - base) * 1e6,
                                                   (median - previous) * 1e6))
        previous = median
    return 0


if __name__ == "__main__":
    sys.exit(main())
