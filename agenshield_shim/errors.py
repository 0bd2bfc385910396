"""The one exception every hooked library shares: what only the tunnel transport can carry.

Why a module of its own: each library must keep raising its own exception types (so its own
``except`` clauses, retry loops and SDK wrappers behave as they do for a proxy), yet an
application should be able to catch "this needs ``AGENSHIELD_TRANSPORT=tunnel``" once, whatever the
library and whatever the transport in use. So each hook raises a subclass of *both* its library's
error and :class:`TunnelOnlyError` (made by :func:`library_class`), and this base is defined
without the rpc core, so it is importable (``agenshield_shim.TunnelOnlyError``) in tunnel mode too.
Nothing here is imported at interpreter start-up.
"""

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Optional, Tuple


class TunnelOnlyError(Exception):
    """A request only the tunnel transport can carry: a connection upgrade (a websocket), ``CONNECT``,
    a pinned certificate, a body a broker without ``body-base64`` would corrupt.

    Raised as a subclass that is also the hooked library's own error (aiohttp's
    ``ClientConnectionError``, httpx's ``UnsupportedProtocol`` and ``ProxyError``, websockets'
    ``ProxyError``, ``OSError`` for http.client), so ``except agenshield_shim.TunnelOnlyError``
    catches every one of them and the library's own ``except`` clauses still work. Not an
    ``OSError`` itself: retrying cannot help, and retry loops that catch ``OSError`` must not spin.
    """


def library_class(library_errors: "Tuple[type, ...]", module: str, doc: "Optional[str]" = None) -> type:
    """``TunnelOnlyError`` of one library: a subclass of ``library_errors`` and of :class:`TunnelOnlyError`,
    published as ``module.TunnelOnlyError``."""
    bases = tuple(library_errors) + (TunnelOnlyError,)
    return type("TunnelOnlyError", bases, {"__module__": module, "__doc__": doc or TunnelOnlyError.__doc__})
