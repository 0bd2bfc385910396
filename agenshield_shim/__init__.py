"""agenshield-shim: every network connection of this interpreter goes through the AgenShield broker.

This module is imported by the start-up line of every interpreter in the
environment, so it imports nothing: the public names are loaded on first use.
"""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["NetworkBlockedError", "ShimConfigError", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from ._config import ShimConfigError
    from ._errors import NetworkBlockedError


def __getattr__(name: str) -> Any:
    if name == "NetworkBlockedError":
        from ._errors import NetworkBlockedError

        return NetworkBlockedError
    if name == "ShimConfigError":
        from ._config import ShimConfigError

        return ShimConfigError
    raise AttributeError("module 'agenshield_shim' has no attribute %r" % (name,))
