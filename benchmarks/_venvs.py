"""Shared by the benchmarks: build this checkout's wheel and make the virtual environments to compare."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]


def clean_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENSHIELD_", "PYTHON"))}
    env.update(extra)
    return env


def build_wheel(out: Path, source: Path = ROOT) -> Path:
    """Build from a clean state: setuptools reuses build/, which can hold deleted modules."""
    import shutil

    shutil.rmtree(source / "build", ignore_errors=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        check=True, cwd=tempfile.gettempdir(),
    )
    shutil.rmtree(source / "build", ignore_errors=True)
    return next(out.glob("agenshield_shim-*.whl"))


def checkout(ref: str, target: Path) -> Path:
    """This repository's tree at ``ref`` (a commit, a branch), exported to ``target``: a "before"."""
    target.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


def make_venv(python: str, target: Path, wheel: Optional[Path] = None, *packages: str) -> str:
    subprocess.run([python, "-m", "venv", str(target)], check=True, env=clean_env())
    exe = str(target / "bin" / "python")
    args = [str(wheel)] if wheel else []
    args += list(packages)
    if args:
        subprocess.run(
            [exe, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
            check=True, env=clean_env(AGENSHIELD_ENABLED="false"),
        )
    return exe


def site_packages(python: str) -> Path:
    """The environment's site-packages, where the wheel put ``agenshield_shim.pth``."""
    out = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True, env=clean_env(AGENSHIELD_ENABLED="false"))
    return Path(out.stdout.strip())


def make_floor_venv(python: str, target: Path) -> str:
    """A bare environment plus one ``.pth`` holding only ``import os, sys``: what ``site`` charges
    for any ``.pth`` file, the floor under the shim's own."""
    exe = make_venv(python, target)
    (site_packages(exe) / "floor.pth").write_text("import os, sys\n")
    return exe


def python_version(python: str) -> str:
    """``3.11.7``: for the first line of each benchmark's report."""
    out = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True, text=True)
    return out.stdout.strip()


def bare_and_shim(python: str, tmp: Path) -> Tuple[str, str]:
    """Two environments of ``python`` to compare: one without the shim, one with this checkout's wheel."""
    wheel = build_wheel(tmp / "wheel")
    return make_venv(python, tmp / "bare"), make_venv(python, tmp / "shim", wheel)
