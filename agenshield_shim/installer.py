"""Install, verify and uninstall the shim in the environment of another Python: the seed's ``PythonPatcher``.

``agenshield-shim install --python PATH`` runs ``PATH -m pip install --no-index`` with *this* package's
own wheel, so the target gets exactly the code that is running here, through the one installer that
knows its environment (venv, user site, PEP 668 markers), and with no network. pip runs with
``AGENSHIELD_ENABLED=false`` so that an existing shim does not stand in its way (with a lock file that
variable has no effect, which is fine: a local wheel needs no network).

The wheel comes from, in order: ``--wheel FILE``; the wheel this installation was installed from,
if pip recorded it (PEP 610 ``direct_url.json``) and it is still there with the same hash; a wheel
repacked from this installation's own files (its ``RECORD``); or, when running from a source
checkout, ``pip wheel --no-deps --no-build-isolation`` of a copy of that checkout.

The old AgenShield patcher wrote a ``sitecustomize.py`` into site-packages that monkey-patched
``socket`` and ``requests`` and sent requests to the broker's ``/api/proxy`` (which the broker does
not serve). It is recognised by the marker lines that generator always wrote:
``# AgenShield Python Network Isolation`` in the header, or the assignment ``_agenshield_patched = True``
together with a ``_AGENSHIELD_BROKER_PORT`` setting. ``install`` reports such a file and how to remove
it; ``--replace-legacy`` moves it aside (``sitecustomize.py.agenshield-legacy``, no longer importable).

``verify`` runs the checks inside the target: the source of :mod:`agenshield_shim.selftest` is
executed by the target interpreter (``PATH -c SOURCE --verify --json``), so what is checked is that
interpreter's own shim, guard, configuration and broker.
"""

import argparse
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from . import __version__
from .cli_args import Parser, check_input_file, check_python, usage_error
from ._config import (
    DEFAULT_BROKER_HOST, DEFAULT_BROKER_PORT, ENV_BROKER_HOST, ENV_BROKER_PORT, LOCK_FILE, ShimConfigError,
    _parse_host, _parse_port, load,
)

PACKAGE = "agenshield-shim"
MIN_PYTHON = (3, 8)
#: Files the shim puts at the root of site-packages (``.start`` for PEP 829, should a release ship it).
STARTUP_FILES = ("agenshield_shim.pth", "agenshield_shim.start")
LEGACY_MARKERS = ("AgenShield Python Network Isolation",)
LEGACY_ASSIGNMENTS = ("_agenshield_patched = True", "_AGENSHIELD_BROKER_PORT")
LEGACY_SUFFIX = ".agenshield-legacy"
PIP_TIMEOUT = 600

#: Runs in the target; only ``sys`` first, so even a Python 2 answers before being refused.
_VERSION_PROBE = "import sys; sys.stdout.write('%d.%d.%d' % tuple(sys.version_info[:3]))"
_PROBE = r"""
import json, os, site, sys, sysconfig
dirs = []
def add(d):
    if d and d not in dirs:
        dirs.append(d)
paths = sysconfig.get_paths()
add(paths.get("purelib")); add(paths.get("platlib"))
for d in getattr(site, "getsitepackages", lambda: [])():
    add(d)
if site.ENABLE_USER_SITE:
    add(site.getusersitepackages())
sc = sys.modules.get("sitecustomize")
sc_file = getattr(sc, "__file__", None)
try:
    import importlib.util
    has_pip = importlib.util.find_spec("pip") is not None
except Exception:
    has_pip = False
print(json.dumps({"executable": sys.executable, "prefix": sys.prefix, "purelib": paths.get("purelib"),
                  "site_dirs": dirs, "sitecustomize": sc_file, "has_pip": has_pip,
                  "in_venv": sys.prefix != getattr(sys, "base_prefix", sys.prefix)}))
"""


class InstallError(Exception):
    """The installer cannot do what was asked; the message says why and what to do."""


class LegacyPatch:
    """A ``sitecustomize.py`` written by the old AgenShield patcher."""

    def __init__(self, path: str) -> None:
        self.path = path

    @property
    def backup(self) -> str:
        return self.path + LEGACY_SUFFIX

    def removal_hint(self, python: str) -> str:
        return ("a sitecustomize.py written by the old AgenShield patcher is active: %s. It patches socket and "
                "requests on its own and sends requests to /api/proxy, which the broker does not serve. Remove "
                "it with: agenshield-shim install --python %s --replace-legacy (moves it to %s), or: rm %s"
                % (self.path, python, os.path.basename(self.backup), self.path))

    def remove(self) -> None:
        """Move it aside (kept for the record, no longer importable) and drop its bytecode."""
        os.replace(self.path, self.backup)
        cache = os.path.join(os.path.dirname(self.path), "__pycache__")
        if os.path.isdir(cache):
            for name in os.listdir(cache):
                if name.startswith("sitecustomize.") and name.endswith(".pyc"):
                    os.unlink(os.path.join(cache, name))

    def __repr__(self) -> str:
        return "LegacyPatch(%r)" % self.path


def is_legacy_sitecustomize(text: str) -> bool:
    """Does this source carry the old AgenShield patcher's marks? (see the module docstring)"""
    if any(marker in text for marker in LEGACY_MARKERS):
        return True
    return all(assignment in text for assignment in LEGACY_ASSIGNMENTS)


def find_legacy(candidates: Sequence[str]) -> List[LegacyPatch]:
    """The legacy ``sitecustomize.py`` files among ``candidates`` (paths that may not exist)."""
    found: List[LegacyPatch] = []
    seen = set()
    for path in candidates:
        if not path or not path.endswith("sitecustomize.py"):
            continue
        real = os.path.realpath(path)
        if real in seen or not os.path.isfile(real):
            continue
        seen.add(real)
        try:
            with open(real, encoding="utf-8", errors="replace") as handle:
                text = handle.read(1 << 20)
        except OSError:
            continue
        if is_legacy_sitecustomize(text):
            found.append(LegacyPatch(path))
    return found


def lock_text(broker_host: str, broker_port: int, python: str = "") -> str:
    """The lock file's content: checked with the boot's own parser before it is written."""
    host = _parse_host(broker_host, "--broker-host")
    port = _parse_port(str(broker_port), "--broker-port")
    text = (
        "# Written by agenshield-shim %s install --lock%s on %s.\n"
        "# While this file exists, the shim in this environment ignores the AGENSHIELD_* environment\n"
        "# variables (AGENSHIELD_ENABLED=false has no effect). Remove it with agenshield-shim uninstall.\n"
        "%s=%s\n%s=%d\n"
        % (__version__, " --python " + _printable(python) if python else "", time.strftime("%Y-%m-%d %H:%M:%S"),
           ENV_BROKER_HOST, host, ENV_BROKER_PORT, port)
    )
    return text


def _printable(text: str) -> str:
    """One line, whatever the path holds: a newline in a comment must not start a setting."""
    return text.encode("unicode_escape").decode("ascii")


def write_lock(site_dir: str, broker_host: str, broker_port: int, python: str = "") -> str:
    """Write ``agenshield_shim.lock`` atomically (mode 0644: every user of the environment reads it)."""
    text = lock_text(broker_host, broker_port, python)
    path = os.path.join(site_dir, LOCK_FILE)
    fd, tmp = tempfile.mkstemp(prefix=".agenshield_shim.lock.", dir=site_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        load({}, tmp)  # what the boot will read must parse: refuse now, not at every start
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# -- the wheel ----------------------------------------------------------------------------------


def _package_dir() -> Path:
    return Path(__file__).resolve().parent


def _checkout_root() -> Optional[Path]:
    """The source checkout this package runs from, if it does (pyproject.toml of this project beside it)."""
    root = _package_dir().parent
    pyproject = root / "pyproject.toml"
    try:
        if pyproject.is_file() and 'name = "agenshield-shim"' in pyproject.read_text(encoding="utf-8"):
            return root
    except OSError:
        pass
    return None


def _installed_distribution() -> Optional[object]:
    """The installed distribution that owns the running files (None for a checkout)."""
    try:
        from importlib import metadata
    except ImportError:  # pragma: no cover - 3.8+ always has it
        return None
    # Look only beside the running package: a checkout on sys.path (its .egg-info) is not us.
    site_dir = str(_package_dir().parent)
    found = [d for d in metadata.distributions(path=[site_dir])
             if (d.metadata["Name"] or "").lower().replace("_", "-") == PACKAGE]
    if not found:
        return None
    dist = found[0]
    init = dist.locate_file("agenshield_shim/__init__.py")
    try:
        if Path(str(init)).resolve() != (_package_dir() / "__init__.py"):
            return None
    except OSError:
        return None
    return dist


def _wheel_name(version: str) -> str:
    return "agenshield_shim-%s-py3-none-any.whl" % version


def _recorded_wheel(dist: object) -> Optional[Path]:
    """The wheel pip installed this from (PEP 610), if it still exists unchanged."""
    text = dist.read_text("direct_url.json")  # type: ignore[attr-defined]
    if not text:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        return None
    url = info.get("url", "")
    if not url.startswith("file://") or "archive_info" not in info or not url.endswith(".whl"):
        return None
    from urllib.parse import unquote, urlsplit

    path = Path(unquote(urlsplit(url).path))
    if not path.is_file() or not path.name.startswith("agenshield_shim-%s-" % __version__):
        return None
    expected = (info["archive_info"].get("hashes") or {}).get("sha256")
    legacy = info["archive_info"].get("hash", "")
    if not expected and legacy.startswith("sha256="):
        expected = legacy[7:]
    if expected and hashlib.sha256(path.read_bytes()).hexdigest() != expected:
        return None
    return path


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode("ascii")
    return "sha256=" + digest


def repack_installation(dist: object, out_dir: Path) -> Path:
    """A wheel rebuilt from the installed files listed in ``RECORD`` (no build tools, no network).

    Files outside site-packages (console scripts) are left out: pip regenerates them from
    ``entry_points.txt``. pip's own bookkeeping (INSTALLER, REQUESTED, direct_url.json) and
    bytecode are left out too.
    """
    files = dist.files or []  # type: ignore[attr-defined]
    dist_info = None
    entries: Dict[str, bytes] = {}
    for item in files:
        name = str(item).replace(os.sep, "/")
        if name.startswith("../") or "/__pycache__/" in name or name.endswith(".pyc"):
            continue
        top = name.split("/", 1)[0]
        if top.endswith(".dist-info"):
            dist_info = top
            if name.rsplit("/", 1)[-1] in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json"):
                continue
        source = Path(str(dist.locate_file(item)))  # type: ignore[attr-defined]
        if not source.is_file():
            raise InstallError("this installation is incomplete (%s is missing); pass --wheel FILE" % source)
        entries[name] = source.read_bytes()
    if dist_info is None or "agenshield_shim.pth" not in entries:
        raise InstallError("this installation has no usable RECORD (no .pth listed); pass --wheel FILE")
    version = dist.version  # type: ignore[attr-defined]
    target = out_dir / _wheel_name(version)
    record = ["%s,%s,%d" % (name, _record_hash(data), len(data)) for name, data in entries.items()]
    record.append("%s/RECORD,," % dist_info)
    with zipfile.ZipFile(str(target), "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        archive.writestr(dist_info + "/RECORD", "\n".join(record) + "\n")
    return target


def build_from_checkout(root: Path, out_dir: Path) -> Path:
    """``pip wheel`` of a copy of the checkout (setuptools reuses an in-tree ``build/`` otherwise)."""
    source = out_dir / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "dist", "*.egg-info", ".git", "tests")
    shutil.copytree(str(root), str(source), ignore=ignore)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-q", "-w", str(out_dir), str(source)],
        capture_output=True, text=True, timeout=PIP_TIMEOUT, cwd=str(out_dir),
    )
    wheels = sorted(out_dir.glob("agenshield_shim-*.whl"))
    if result.returncode != 0 or not wheels:
        raise InstallError(
            "could not build the wheel from %s (needs setuptools and wheel in %s); pass --wheel FILE.\n%s"
            % (root, sys.executable, (result.stderr or result.stdout).strip()[-2000:])
        )
    return wheels[0]


def find_wheel(explicit: Optional[str], work_dir: Path) -> Path:
    """The wheel of this very package (see the module docstring for the order)."""
    if explicit:
        path = Path(explicit).expanduser().resolve()
        if not path.is_file() or not path.name.startswith("agenshield_shim-") or path.suffix != ".whl":
            raise InstallError("--wheel %s: not an agenshield_shim wheel file" % explicit)
        return path
    root = _checkout_root()
    if root is not None:
        return build_from_checkout(root, work_dir)
    dist = _installed_distribution()
    if dist is None:
        raise InstallError("cannot tell where this agenshield_shim comes from (%s); pass --wheel FILE" % _package_dir())
    recorded = _recorded_wheel(dist)
    return recorded if recorded is not None else repack_installation(dist, work_dir)


# -- results -----------------------------------------------------------------------------------


class InstallResult:
    """What ``install``/``uninstall`` did (the seed's ``PatcherResult``, with the paths that matter)."""

    def __init__(self, success: bool, message: str, python_version: str = "", site_packages: str = "",
                 wheel: Optional[str] = None, lock_file: Optional[str] = None,
                 legacy: Optional[List[LegacyPatch]] = None, warnings: Optional[List[str]] = None,
                 removed: Optional[List[str]] = None) -> None:
        self.success = success
        self.message = message
        self.python_version = python_version
        self.site_packages = site_packages
        self.wheel = wheel
        self.lock_file = lock_file
        self.legacy = legacy or []
        self.warnings = warnings or []
        self.removed = removed or []

    def __repr__(self) -> str:
        return "InstallResult(success=%r, message=%r)" % (self.success, self.message)


class VerifyResult:
    """The seed's ``VerificationResult``: ``shimInstalled`` replaces ``sitecustomizeInstalled``."""

    def __init__(self, data: Dict[str, object], returncode: int = 0, stderr: str = "") -> None:
        self.data = data
        self.returncode = returncode
        self.stderr = stderr

    success = property(lambda self: bool(self.data.get("success")))
    python_version = property(lambda self: str(self.data.get("pythonVersion", "unknown")))
    shim_installed = property(lambda self: bool(self.data.get("shimInstalled")))
    network_blocked = property(lambda self: bool(self.data.get("networkBlocked")))
    broker_accessible = property(lambda self: bool(self.data.get("brokerAccessible")))

    @property
    def details(self) -> List[str]:
        details = self.data.get("details")
        return [str(d) for d in details] if isinstance(details, list) else []

    def as_json(self) -> Dict[str, object]:
        return dict(self.data)

    def __repr__(self) -> str:
        return "VerifyResult(success=%r, details=%r)" % (self.success, self.details)


def verify_payload(report: Dict[str, object], returncode: int, stderr: str) -> Dict[str, object]:
    """The seed's JSON shape, from the selftest's ``--verify --json`` report (or from its absence)."""
    checks = report.get("checks")
    details = ["%s %s: %s" % (c["status"], c["name"], c["detail"]) for c in (checks if isinstance(checks, list) else [])]
    if not report:
        details = ["the checks did not run in the target (exit status %d): %s" % (returncode, stderr.strip()[-500:])]
    routed = bool(report.get("routed"))
    payload: Dict[str, object] = {
        "success": bool(report.get("success")) and returncode == 0 and routed,
        "pythonVersion": report.get("pythonVersion", "unknown"),
        "shimInstalled": bool(report.get("shimActive")),
        "networkBlocked": bool(report.get("networkBlocked")),
        "brokerAccessible": bool(report.get("brokerAccessible")),
        "details": details,
        "routed": routed,
        "shimVersion": report.get("shimVersion"),
        "broker": report.get("broker"),
        "transport": report.get("transport"),
        "transportReason": report.get("transportReason"),
        "locked": bool(report.get("locked")),
    }
    return payload


# -- the patcher ---------------------------------------------------------------------------------


class Target:
    """Facts about the target interpreter, read by running it (shim off, no network)."""

    def __init__(self, python: str) -> None:
        self.python = python
        env = _target_env(disable=True)
        try:
            out = subprocess.run([python, "-c", _VERSION_PROBE], capture_output=True, text=True, timeout=60, env=env)
        except OSError as exc:
            raise InstallError("cannot run %s: %s" % (python, exc)) from None
        except subprocess.TimeoutExpired:
            raise InstallError("%s did not answer within 60 s" % python) from None
        try:
            self.version_info = tuple(int(p) for p in out.stdout.strip().split("."))
        except ValueError:
            raise InstallError("%s is not a working Python: %s" % (python, (out.stderr or out.stdout).strip()[-500:])) from None
        self.version = "%d.%d.%d" % self.version_info[:3]
        if self.version_info[:2] < MIN_PYTHON:
            raise InstallError(
                "%s is Python %s; agenshield-shim needs Python %d.%d or newer (its guard is a PEP 578 audit "
                "hook, which older interpreters do not have). Use a newer Python for the agent, or the OS "
                "layer (agenshield-shim wrapper) alone." % ((python, self.version) + MIN_PYTHON)
            )
        out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=60, env=env)
        if out.returncode != 0:
            raise InstallError("cannot inspect %s: %s" % (python, out.stderr.strip()[-1000:]))
        info = json.loads(out.stdout.strip().splitlines()[-1])
        self.executable: str = info["executable"]
        self.purelib: str = info["purelib"]
        self.site_dirs: List[str] = info["site_dirs"]
        self.has_pip: bool = info["has_pip"]
        self.in_venv: bool = info["in_venv"]
        candidates = [os.path.join(d, "sitecustomize.py") for d in self.site_dirs]
        if info.get("sitecustomize"):
            candidates.insert(0, info["sitecustomize"])
        self.legacy = find_legacy(candidates)

    def installed_site_dir(self) -> Optional[str]:
        """The site directory holding the shim's .pth, if any."""
        for directory in self.site_dirs:
            if os.path.exists(os.path.join(directory, "agenshield_shim.pth")):
                return directory
        return None


def _target_env(disable: bool, broker_host: Optional[str] = None, broker_port: Optional[int] = None) -> Dict[str, str]:
    """The environment for a target process: ours, with the shim switched off or left to its config."""
    env = {k: v for k, v in os.environ.items() if k != "AGENSHIELD_ENABLED"}
    if disable:  # pip and the probes: a PYTHONPATH checkout must not look like the installed package
        env["AGENSHIELD_ENABLED"] = "false"
        env.pop("PYTHONPATH", None)
    if broker_host is not None:
        env[ENV_BROKER_HOST] = broker_host
    if broker_port is not None:
        env[ENV_BROKER_PORT] = str(broker_port)
    return env


class PythonPatcher:
    """The shim for one interpreter's environment: ``install``, ``verify``, ``uninstall``, ``restore_original``.

    ``broker_host``/``broker_port`` go into the lock file with ``lock=True``; without a lock the shim
    reads them from the environment (``AGENSHIELD_BROKER_HOST``/``_PORT``), and ``verify`` sets them
    for the target. ``wheel`` names the wheel to install (found automatically when None).
    """

    def __init__(self, python_path: str, broker_host: str = DEFAULT_BROKER_HOST,
                 broker_port: int = DEFAULT_BROKER_PORT, lock: bool = False, replace_legacy: bool = False,
                 wheel: Optional[str] = None, echo: Optional[object] = None) -> None:
        self.python_path = python_path
        self.broker_host = _parse_host(broker_host, "broker_host")
        self.broker_port = _parse_port(str(broker_port), "broker_port")
        self.lock = lock
        self.replace_legacy = replace_legacy
        self.wheel = wheel
        self._echo = echo

    def _say(self, text: str) -> None:
        if callable(self._echo):
            self._echo(text)

    def _pip(self, target: Target, *args: str) -> "subprocess.CompletedProcess[str]":
        if not target.has_pip:
            raise InstallError("pip is not available for %s; add it with: %s -m ensurepip" % (self.python_path, self.python_path))
        return subprocess.run(
            [self.python_path, "-m", "pip", "--disable-pip-version-check", "--no-input", *args],
            capture_output=True, text=True, timeout=PIP_TIMEOUT, env=_target_env(disable=True),
        )

    def install(self) -> InstallResult:
        """pip-install this package's wheel into the target; lock file and legacy patch as asked.

        Raises :class:`InstallError` for a target that cannot be served (too old, no pip, pip failed).
        """
        target = Target(self.python_path)
        warnings: List[str] = []
        with tempfile.TemporaryDirectory(prefix="agenshield-wheel-") as work:
            wheel = find_wheel(self.wheel, Path(work))
            self._say("installing %s into %s (Python %s)" % (wheel.name, target.executable, target.version))
            result = self._pip(target, "install", "--no-index", "--no-deps", "--force-reinstall", str(wheel))
            if result.returncode != 0:
                raise InstallError("pip could not install %s into %s:\n%s" % (
                    wheel.name, self.python_path, (result.stderr or result.stdout).strip()[-3000:]))
            wheel_name = wheel.name
        site_dir = target.installed_site_dir()
        if site_dir is None:
            raise InstallError("pip reported success but agenshield_shim.pth is in none of %s" % target.site_dirs)
        lock_path = os.path.join(site_dir, LOCK_FILE)
        if self.lock:
            write_lock(site_dir, self.broker_host, self.broker_port, self.python_path)
        elif os.path.exists(lock_path):
            os.unlink(lock_path)
            warnings.append("removed the lock file of an earlier install (%s): pass --lock to keep one" % lock_path)
        elif (self.broker_host, self.broker_port) != (DEFAULT_BROKER_HOST, DEFAULT_BROKER_PORT):
            warnings.append("without --lock the shim reads the broker from the environment: set %s=%s and %s=%d "
                            "for the agent, or install with --lock" % (ENV_BROKER_HOST, self.broker_host,
                                                                       ENV_BROKER_PORT, self.broker_port))
        legacy = target.legacy
        for patch in legacy:
            if self.replace_legacy:
                patch.remove()
                warnings.append("moved the old AgenShield sitecustomize.py aside: %s -> %s" % (patch.path, patch.backup))
            else:
                warnings.append(patch.removal_hint(self.python_path))
        message = "agenshield-shim %s installed for %s (Python %s) in %s%s" % (
            wheel_name.split("-")[1], target.executable, target.version,
            site_dir, ", locked to broker %s:%d" % (self.broker_host, self.broker_port) if self.lock else "",
        )
        return InstallResult(True, message, target.version, site_dir, wheel_name,
                             lock_path if self.lock else None, legacy, warnings)

    def verify(self, timeout: float = 60.0) -> VerifyResult:
        """Run the checks inside the target (see :mod:`agenshield_shim.selftest`, ``--verify``)."""
        source = (_package_dir() / "selftest.py").read_text(encoding="utf-8")
        cmd = [self.python_path, "-c", source, "--verify", "--json",
               "--broker-host", self.broker_host, "--broker-port", str(self.broker_port)]
        env = _target_env(disable=False, broker_host=self.broker_host, broker_port=self.broker_port)
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return VerifyResult(verify_payload({}, -1, str(exc)), -1, str(exc))
        try:
            report = json.loads(out.stdout[out.stdout.index("{"):])
        except ValueError:
            report = {}
        return VerifyResult(verify_payload(report, out.returncode, out.stderr), out.returncode, out.stderr)

    def uninstall(self) -> InstallResult:
        """Remove the package (pip), then its start-up files and lock file wherever they are left.

        The lock goes last: if pip fails, the environment stays locked rather than half-open.
        """
        target = Target(self.python_path)
        result = self._pip(target, "uninstall", "-y", PACKAGE)
        if result.returncode != 0:
            raise InstallError("pip could not uninstall %s from %s:\n%s" % (
                PACKAGE, self.python_path, (result.stderr or result.stdout).strip()[-3000:]))
        removed = []
        for directory in target.site_dirs:
            for name in STARTUP_FILES + (LOCK_FILE,):
                path = os.path.join(directory, name)
                if os.path.lexists(path):
                    os.unlink(path)
                    removed.append(path)
        message = "agenshield-shim removed from %s (Python %s)" % (target.executable, target.version)
        return InstallResult(True, message, target.version, target.purelib, removed=removed, legacy=target.legacy,
                             warnings=[p.removal_hint(self.python_path) for p in target.legacy])

    def restore_original(self) -> InstallResult:
        """Give back the interpreter as it was before any AgenShield: ``uninstall`` plus the legacy patch.

        Besides what ``uninstall`` removes, this deletes an old AgenShield ``sitecustomize.py`` (still
        active, or moved aside by ``--replace-legacy``). It does not put the legacy patch back: that
        patch sends requests to an endpoint the broker no longer serves.
        """
        result = self.uninstall()
        for patch in result.legacy:
            os.unlink(patch.path)
            result.removed.append(patch.path)
        target_dirs = Target(self.python_path).site_dirs
        for directory in target_dirs:
            backup = os.path.join(directory, "sitecustomize.py" + LEGACY_SUFFIX)
            if os.path.isfile(backup):
                os.unlink(backup)
                result.removed.append(backup)
        result.warnings = []
        result.message += "; original state restored"
        return result


# -- command line ----------------------------------------------------------------------------------


def _env_default_host() -> str:
    return os.environ.get(ENV_BROKER_HOST, DEFAULT_BROKER_HOST)


def _env_default_port() -> int:
    try:
        return _parse_port(os.environ.get(ENV_BROKER_PORT, str(DEFAULT_BROKER_PORT)), ENV_BROKER_PORT)
    except ShimConfigError:
        return DEFAULT_BROKER_PORT


def _port_arg(text: str) -> int:
    try:
        return _parse_port(text, "--broker-port")
    except ShimConfigError:  # argparse names the flag itself
        raise argparse.ArgumentTypeError("%r is not a TCP port; give a number from 1 to 65535" % text) from None


def _host_arg(text: str) -> str:
    try:
        return _parse_host(text, "--broker-host")
    except ShimConfigError:
        raise argparse.ArgumentTypeError("%r is not a host name or IP address (e.g. localhost, 127.0.0.1)" % text) \
            from None


def _add_common(parser: argparse.ArgumentParser, broker: bool = True) -> None:
    parser.add_argument("--python", required=True, metavar="PATH", help="the target interpreter (e.g. agent-env/bin/python)")
    if broker:
        parser.add_argument("--broker-host", type=_host_arg, default=None,
                            help="broker host (default: $%s or %s)" % (ENV_BROKER_HOST, DEFAULT_BROKER_HOST))
        parser.add_argument("--broker-port", type=_port_arg, default=None,
                            help="broker port (default: $%s or %d)" % (ENV_BROKER_PORT, DEFAULT_BROKER_PORT))


def install_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="agenshield-shim install",
        description="pip-install this agenshield-shim wheel into the environment of another Python (no network needed).",
    )
    _add_common(parser)
    parser.add_argument("--lock", action="store_true",
                        help="write agenshield_shim.lock: the broker settings become fixed, AGENSHIELD_* variables "
                             "(AGENSHIELD_ENABLED=false included) are ignored")
    parser.add_argument("--replace-legacy", action="store_true",
                        help="move aside a sitecustomize.py written by the old AgenShield patcher")
    parser.add_argument("--wheel", metavar="FILE", help="the wheel to install (default: the one this agenshield-shim "
                                                       "came from, or one built from it)")
    return parser


def verify_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="agenshield-shim verify",
        description="Check inside a Python that the shim is active, direct connections are refused, the broker "
                    "answers and a request is routed through it. Exit status 0 only if all pass.",
    )
    _add_common(parser)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def uninstall_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="agenshield-shim uninstall",
        description="Remove agenshield-shim, its start-up files and lock file from the environment of a Python.",
    )
    _add_common(parser, broker=False)
    parser.add_argument("--restore-original", action="store_true",
                        help="also delete an old AgenShield sitecustomize.py (and its moved-aside copy)")
    return parser


def _patcher(args: argparse.Namespace, **extra: object) -> PythonPatcher:
    host = getattr(args, "broker_host", None) or _env_default_host()
    port = getattr(args, "broker_port", None) or _env_default_port()
    return PythonPatcher(args.python, broker_host=host, broker_port=port, **extra)  # type: ignore[arg-type]


def _report(prog: str, result: InstallResult) -> None:
    print(result.message)
    for warning in result.warnings:
        print("%s: warning: %s" % (prog, warning), file=sys.stderr)


def cli_install(argv: List[str]) -> int:
    args = install_parser().parse_args(argv)
    problem = check_python("--python", args.python) or _wheel_problem(args.wheel)
    if problem:
        return usage_error("agenshield-shim install", problem)
    try:
        patcher = _patcher(args, lock=args.lock, replace_legacy=args.replace_legacy, wheel=args.wheel,
                           echo=lambda text: print(text, file=sys.stderr))
        result = patcher.install()
    except (InstallError, ShimConfigError) as exc:
        print("agenshield-shim install: %s" % exc, file=sys.stderr)
        return 1
    _report("agenshield-shim install", result)
    return 0


def _wheel_problem(wheel: Optional[str]) -> Optional[str]:
    problem = check_input_file("--wheel", wheel)
    if problem is None and wheel is not None and not (
            os.path.basename(wheel).startswith("agenshield_shim-") and wheel.endswith(".whl")):
        problem = "--wheel %s: not an agenshield_shim wheel (agenshield_shim-VERSION-py3-none-any.whl)" % wheel
    return problem


def cli_verify(argv: List[str]) -> int:
    args = verify_parser().parse_args(argv)
    problem = check_python("--python", args.python)
    if problem:
        return usage_error("agenshield-shim verify", problem)
    result = _patcher(args).verify()
    if args.json:
        print(json.dumps(result.as_json(), indent=2))
    else:
        for line in result.details:
            print(line)
        print("verify: %s (%s)" % ("OK" if result.success else "FAILED", result.python_version))
    return 0 if result.success else 1


def cli_uninstall(argv: List[str]) -> int:
    args = uninstall_parser().parse_args(argv)
    problem = check_python("--python", args.python)
    if problem:
        return usage_error("agenshield-shim uninstall", problem)
    patcher = PythonPatcher(args.python)
    try:
        result = patcher.restore_original() if args.restore_original else patcher.uninstall()
    except InstallError as exc:
        print("agenshield-shim uninstall: %s" % exc, file=sys.stderr)
        return 1
    _report("agenshield-shim uninstall", result)
    return 0
