"""The Python API, with the seed's names in Python style.

    from agenshield_shim.api import PythonPatcher, generate_python_wrapper, generate_sandbox_profile

    patcher = PythonPatcher("/srv/agent/venv/bin/python", broker_host="localhost", broker_port=6969, lock=True)
    patcher.install()            # InstallResult; raises InstallError (e.g. Python < 3.8)
    patcher.verify().success     # VerifyResult with the seed's fields (.as_json())
    patcher.uninstall()          # package, .pth/.start, lock file
    patcher.restore_original()   # uninstall + any old AgenShield sitecustomize.py

The wrapper and profile generators belong to the OS layer and are loaded only when asked for
(PEP 562), so importing this module does not import the sandbox code.
"""

from typing import Any

from .installer import InstallError, InstallResult, LegacyPatch, PythonPatcher, VerifyResult

__all__ = [
    "InstallError",
    "InstallResult",
    "LegacyPatch",
    "PythonPatcher",
    "VerifyResult",
    "generate_python_wrapper",
    "generate_sandbox_profile",
]

_LAZY = {
    "generate_python_wrapper": "agenshield_shim.wrapper",
    "generate_sandbox_profile": "agenshield_shim.sandbox.seatbelt",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError("module %r has no attribute %r" % (__name__, name))


def __dir__() -> Any:
    return sorted(__all__)
