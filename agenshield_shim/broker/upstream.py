"""Opening upstream connections for tunnels and forwards, with failures sorted into kinds.

The kinds are the daemon's ``X-Proxy-Error`` vocabulary, so tunnels and forwards report them the
same way: ``dns-resolution-failed``, ``connection-refused``, ``connection-timeout``,
``network-error`` (and ``blocked-by-policy`` when every address of a name is denied). Addresses
are tried in ``getaddrinfo`` order within one overall connect deadline.
"""

import asyncio
import socket
import ssl
from typing import Any, Awaitable, Callable, List, Optional, Tuple

from ..addr import Host, IPAddress, canonical_ip, fixed_addresses
from .http1 import READ_SIZE

DNS_FAILED = "dns-resolution-failed"
REFUSED = "connection-refused"
TIMEOUT = "connection-timeout"
NETWORK = "network-error"
#: Every address of an allowed name is one a deny rule refuses.
DENIED = "blocked-by-policy"


#: ``getaddrinfo``-shaped coroutine function: (host, port) -> addrinfo list. Injected by tests so a
#: DNS failure can be produced without sending a DNS query anywhere.
Resolver = Callable[[str, int], Awaitable[List[Any]]]
#: Canonical address text -> the reason a deny rule refuses it, or ``None``.
Permit = Callable[[str], Optional[str]]


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


async def resolve(host: Host, port: int, timeout: float, resolver: Optional[Resolver] = None) -> List[IPAddress]:
    """The canonical addresses ``host`` stands for, in resolver order, duplicates dropped.

    Addresses and ``*.localhost`` never reach a resolver (:func:`fixed_addresses`); what a resolver
    answers is read back through :func:`canonical_ip`, so the policy sees the address the socket
    will be connected to (an IPv4-mapped answer is its IPv4 address).
    """
    fixed = fixed_addresses(host)
    if fixed is not None:
        if not fixed:
            raise UpstreamError(DNS_FAILED, "cannot resolve %s: a reserved name (RFC 6761)" % host.text)
        return fixed
    loop = asyncio.get_running_loop()
    lookup = resolver(host.text, port) if resolver is not None else loop.getaddrinfo(
        host.text, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    try:
        infos = list(await asyncio.wait_for(lookup, timeout))
    except asyncio.TimeoutError:
        raise UpstreamError(TIMEOUT, "DNS lookup of %s timed out" % host.text) from None
    except (socket.gaierror, UnicodeError) as exc:
        raise UpstreamError(DNS_FAILED, "cannot resolve %s: %s" % (host.text, exc)) from None
    out: List[IPAddress] = []
    for info in infos:
        ip = canonical_ip(str(info[4][0]))
        if ip is not None and ip not in out:
            out.append(ip)
    if not out:
        raise UpstreamError(DNS_FAILED, "cannot resolve %s: no usable address" % host.text)
    return out


async def open_upstream(
    host: Host,
    port: int,
    timeout: float,
    ssl_context: Optional[ssl.SSLContext] = None,
    resolver: Optional[Resolver] = None,
    permit: Optional[Permit] = None,
) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to one of ``host``'s addresses that ``permit`` does not refuse, by that address.

    The socket is connected to the canonical address itself (never to a name a second resolver
    would read again), so the address the policy saw is the address connected to.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    addresses = await resolve(host, port, timeout, resolver)
    refusals = [permit(str(ip)) if permit is not None else None for ip in addresses]
    allowed = [ip for ip, why in zip(addresses, refusals) if why is None]
    if not allowed:
        raise UpstreamError(DENIED, next(why for why in refusals if why is not None))
    last: UpstreamError = UpstreamError(NETWORK, "no address for %s" % host.text)
    for ip in allowed:
        remaining = deadline - loop.time()
        if remaining <= 0:
            last = UpstreamError(TIMEOUT, "connect to %s:%d timed out" % (host.text, port))
            break
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(
                    str(ip), port, family=socket.AF_INET if ip.version == 4 else socket.AF_INET6,
                    proto=socket.IPPROTO_TCP, limit=READ_SIZE,
                    ssl=ssl_context, server_hostname=host.text if ssl_context else None,
                ),
                remaining,
            )
        except asyncio.TimeoutError:
            last = UpstreamError(TIMEOUT, "connect to %s:%d timed out" % (host.text, port))
        except ConnectionRefusedError:
            last = UpstreamError(REFUSED, "connection to %s:%d refused" % (host.text, port))
        except ssl.SSLError as exc:
            raise UpstreamError(NETWORK, "TLS with %s failed: %s" % (host.text, exc)) from None
        except OSError as exc:
            last = UpstreamError(NETWORK, "connect to %s:%d failed: %s" % (host.text, port, exc.strerror or exc))
    raise last
