"""The exception every refused connection raises."""

from __future__ import annotations

import errno

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Optional


class NetworkBlockedError(ConnectionRefusedError):
    """A direct network connection was refused by AgenShield.

    A subclass of :class:`ConnectionRefusedError` (so of :class:`OSError`): code
    written to survive an unreachable host keeps working, and code that wants to
    tell the two apart can catch this class. ``errno`` is ``ECONNREFUSED``.
    """

    def __init__(self, message: str, destination: Optional[str] = None, broker: Optional[str] = None):
        super().__init__(message)
        self.errno = errno.ECONNREFUSED
        self.destination = destination
        self.broker = broker


def blocked_message(destination: str, broker: str) -> str:
    """The one wording users see, from the guard and from every hook."""
    return "AgenShield: direct connection to %s blocked; use the broker at %s" % (destination, broker)
