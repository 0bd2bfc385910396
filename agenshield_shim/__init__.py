"""agenshield-shim: every network connection of this interpreter goes through the AgenShield broker.

This module is imported by the start-up line of every interpreter in the
environment, so it imports nothing: the public names are loaded on first use.
"""

__version__ = "0.1.0"
__all__ = ["NetworkBlockedError", "ShimConfigError", "__version__"]

def __getattr__(name: str) -> object:  # PEP 562: no import until the name is used
    if name == "NetworkBlockedError":
        from ._errors import NetworkBlockedError

        return NetworkBlockedError
    if name == "ShimConfigError":
        from ._config import ShimConfigError

        return ShimConfigError
    raise AttributeError("module 'agenshield_shim' has no attribute %r" % (name,))
