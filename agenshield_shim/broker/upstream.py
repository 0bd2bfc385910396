"""Opening upstream connections for tunnels and forwards, with failures sorted into kinds.

The kinds are the daemon's ``X-Proxy-Error`` vocabulary, so tunnels and forwards report them the
same way: ``dns-resolution-failed``, ``connection-refused``, ``connection-timeout``,
``network-error``. Addresses are tried in ``getaddrinfo`` order within one overall connect
deadline.
"""

import asyncio
import ipaddress
import socket
import ssl
from typing import Any, Awaitable, Callable, List, Optional, Tuple

from .http1 import READ_SIZE

DNS_FAILED = "dns-resolution-failed"
REFUSED = "connection-refused"
TIMEOUT = "connection-timeout"
NETWORK = "network-error"


#: ``getaddrinfo``-shaped coroutine function: (host, port) -> addrinfo list. Injected by tests so a
#: DNS failure can be produced without sending a DNS query anywhere.
Resolver = Callable[[str, int], Awaitable[List[Any]]]


class UpstreamError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def make_client_ssl_context(ca_file: Optional[str]) -> ssl.SSLContext:
    """System trust store plus an optional extra CA bundle (tests use a ``trustme`` CA)."""
    ctx = ssl.create_default_context()
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    return ctx


def _ip_literal(host: str, port: int) -> Optional[List[Any]]:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version == 4:
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (str(ip), port))]
    return [(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (str(ip), port, 0, 0))]


async def _resolve(loop: asyncio.AbstractEventLoop, resolver: Optional[Resolver], host: str, port: int,
                   timeout: float) -> List[Any]:
    lookup = resolver(host, port) if resolver is not None else loop.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(await asyncio.wait_for(lookup, timeout))


async def open_upstream(
    host: str,
    port: int,
    timeout: float,
    ssl_context: Optional[ssl.SSLContext] = None,
    resolver: Optional[Resolver] = None,
) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    literal = _ip_literal(bare, port)
    try:
        if literal is not None and resolver is None:  # no thread-pool round trip for an IP address
            infos = literal
        else:
            infos = await _resolve(loop, resolver, bare, port, timeout)
    except asyncio.TimeoutError:
        raise UpstreamError(TIMEOUT, "DNS lookup of %s timed out" % bare) from None
    except (socket.gaierror, UnicodeError) as exc:
        raise UpstreamError(DNS_FAILED, "cannot resolve %s: %s" % (bare, exc)) from None
    last: UpstreamError = UpstreamError(NETWORK, "no address for %s" % bare)
    for family, socktype, proto, _canon, addr in infos:
        remaining = deadline - loop.time()
        if remaining <= 0:
            last = UpstreamError(TIMEOUT, "connect to %s:%d timed out" % (bare, port))
            break
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(
                    addr[0], addr[1], family=family, proto=proto, limit=READ_SIZE,
                    ssl=ssl_context, server_hostname=bare if ssl_context else None,
                ),
                remaining,
            )
        except asyncio.TimeoutError:
            last = UpstreamError(TIMEOUT, "connect to %s:%d timed out" % (bare, port))
        except ConnectionRefusedError:
            last = UpstreamError(REFUSED, "connection to %s:%d refused" % (bare, port))
        except ssl.SSLError as exc:
            raise UpstreamError(NETWORK, "TLS with %s failed: %s" % (bare, exc)) from None
        except OSError as exc:
            last = UpstreamError(NETWORK, "connect to %s:%d failed: %s" % (bare, port, exc.strerror or exc))
    raise last
