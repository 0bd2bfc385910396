"""Shared by the benchmarks: build this checkout's wheel and make the virtual environments to compare."""

import os
import subprocess
import sys
import tempfile
import venv
from pathlib import Path
from typing import Dict, Optional

ROOT = Path(__file__).resolve().parents[1]


def clean_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENSHIELD_", "PYTHON"))}
    env.update(extra)
    return env


def build_wheel(out: Path) -> Path:
    """Build from a clean state: setuptools reuses build/, which can hold deleted modules."""
    import shutil

    shutil.rmtree(ROOT / "build", ignore_errors=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True, cwd=tempfile.gettempdir(),
    )
    shutil.rmtree(ROOT / "build", ignore_errors=True)
    return next(out.glob("agenshield_shim-*.whl"))


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
