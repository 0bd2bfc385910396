"""agenshield-shim: every network connection of this interpreter goes through the AgenShield broker.

This package is imported at the start of every guarded interpreter (a disabled
one imports nothing of it: the ``.pth`` line checks ``AGENSHIELD_ENABLED``
first), so it holds only what every guarded interpreter needs: the version and
the exception. Everything else loads on first use.
"""

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Optional

__version__ = "0.1.0"
__all__ = [
    "NetworkBlockedError",
    "PythonPatcher",
    "ShimConfigError",
    "TunnelOnlyError",
    "__version__",
    "generate_python_wrapper",
    "generate_sandbox_profile",
]


class NetworkBlockedError(ConnectionRefusedError):
    """A direct network connection was refused by AgenShield.

    A subclass of :class:`ConnectionRefusedError` (so of :class:`OSError`): code
    written to survive an unreachable host keeps working, and code that wants to
    tell the two apart can catch this class. ``errno`` is ``ECONNREFUSED``;
    ``destination`` and ``broker`` say what was refused and where to go instead.
    """

    def __init__(self, message: str, destination: "Optional[str]" = None, broker: "Optional[str]" = None) -> None:
        import errno  # here, not at the top: this module loads at every start

        super().__init__(message)
        self.errno = errno.ECONNREFUSED
        self.destination = destination
        self.broker = broker


_LAZY = {
    "ShimConfigError": "agenshield_shim._config",
    "TunnelOnlyError": "agenshield_shim.errors",
    "PythonPatcher": "agenshield_shim.api",
    "generate_python_wrapper": "agenshield_shim.api",
    "generate_sandbox_profile": "agenshield_shim.api",
}


def __getattr__(name: str) -> object:  # PEP 562: loaded on first use, never at start
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError("module 'agenshield_shim' has no attribute %r" % (name,))
    import importlib

    return getattr(importlib.import_module(module), name)
