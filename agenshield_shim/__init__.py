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
__all__ = ["NetworkBlockedError", "ShimConfigError", "__version__"]


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


def __getattr__(name: str) -> object:  # PEP 562: loaded on first use
    if name == "ShimConfigError":
        from ._config import ShimConfigError

        return ShimConfigError
    raise AttributeError("module 'agenshield_shim' has no attribute %r" % (name,))
