"""socket: ``create_connection`` refuses a blocked destination before resolving it.

Patches: ``socket.create_connection``.

The audit hook refuses the connection anyway; this gives the common call the
seed's early, clear failure (no DNS query, no attempt per address) and the same
message. ``importlib.reload(socket)`` removes the patch and changes nothing
else: the audit hook still refuses.
"""

import functools
from types import ModuleType

from . import check_destination

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover - importing typing costs 3.3-4.3 ms, and only the type checker needs it
    from typing import Any

TARGET = "socket"


def install(module: ModuleType) -> None:
    original = module.create_connection
    if getattr(original, "__agenshield_original__", None) is not None:
        return

    @functools.wraps(original)
    def create_connection(address: "Any", *args: "Any", **kwargs: "Any") -> "Any":
        try:
            host, port = address[0], address[1]
        except (TypeError, IndexError, KeyError):
            host, port = address, None
        check_destination(host, port)
        return original(address, *args, **kwargs)

    create_connection.__agenshield_original__ = original  # type: ignore[attr-defined]
    module.create_connection = create_connection  # type: ignore[attr-defined]
