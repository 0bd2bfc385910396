"""Who may talk to the broker: loopback TCP callers and Unix-socket callers, nobody else.

The broker is a local service. Even when told to listen on a wider address (``--host 0.0.0.0``),
it answers callers from other machines with 403 and closes. The decision is a pure function of the
peer address so it can be tested directly: no test on this machine can open a connection from a
non-loopback source address.
"""

import ipaddress
import socket
from typing import Any


def caller_allowed(family: int, peername: Any) -> bool:
    """True for Unix-socket peers and for TCP peers in 127.0.0.0/8, ::1 or ::ffff:127.0.0.0/104."""
    if family == getattr(socket, "AF_UNIX", None):
        return True
    if family not in (socket.AF_INET, socket.AF_INET6):
        return False
    if not isinstance(peername, tuple) or not peername:
        return False
    try:
        ip = ipaddress.ip_address(str(peername[0]).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback
