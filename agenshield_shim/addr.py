"""Canonical forms of a host as the broker decides on it and connects to it.

Why a module of its own: a policy decision binds a connection only if the decision and the
connection see the same host. Anything the resolver, libc's ``inet_aton`` or IDNA would read as
another address than the one compared (``2130706434``, ``0x7f.0.0.2``, ``127.2``,
``[::ffff:7f00:2]``, ``127.0.0.1.``, a full-width dot) must be either turned into that address
here, before the decision, or refused. The forms are the guard's (``_boot.py``): dotted-quad
IPv4 without leading zeros, IPv6 with an IPv4-mapped address read as its IPv4, lower-case
names without a trailing dot. The broker may not import the guard's private modules, so this
public module holds them for the broker (and for anything else that is not on the interpreter's
start-up path: it imports ``ipaddress``).

Rules, in order:

* non-ASCII text is IDNA-encoded first (the standard library's codec, which maps full-width dots
  to dots and drops soft hyphens and zero-width spaces), then read as ASCII;
* ``[...]`` or text with a ``:`` is IPv6 (no zone ``%``); an IPv4-mapped address is its IPv4;
* one trailing dot is dropped (``127.0.0.1.`` is ``127.0.0.1``, ``example.com.`` is ``example.com``);
* four decimal labels without leading zeros are IPv4;
* a name whose last label is a number (decimal or ``0x`` hex: ``2130706434``, ``0177.0.0.2``,
  ``127.2``, ``1.2.3.4.5``) is a spelling libc reads as an address: refused (WHATWG URL treats
  such hosts as IPv4 too; we refuse rather than guess which reading the connection would take);
* anything else must be a DNS name: labels of ``a-z 0-9 - _``, 1-63 characters, 253 in all.

``localhost`` and ``*.localhost`` are loopback by definition (RFC 6761 6.3): :func:`fixed_addresses`
answers them without a resolver, and ``*.invalid`` (6.4) with nothing, so no query leaves the host.
"""

import ipaddress
import re
from typing import List, NamedTuple, Optional, Union

from .authority import bracketed

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_QUAD = re.compile(r"^(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})$")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
MAX_NAME = 253


class Host(NamedTuple):
    """A canonical host: ``ip`` for an address, else ``name``; ``text`` is what policy compares."""

    text: str
    ip: Optional[IPAddress]

    @property
    def authority_host(self) -> str:
        """The host as written in a URL or ``Host`` header (IPv6 in brackets)."""
        return bracketed(self.text)  # canonical: only an IPv6 address has a ":"


def canonical_ip(value: str) -> Optional[IPAddress]:
    """An address string (as ``getaddrinfo`` returns it) in canonical form, IPv4-mapped as IPv4."""
    if "%" in value:  # a zone: the address alone does not say where it goes
        return None
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def canonical_host(text: str) -> Host:
    """The canonical :class:`Host` of ``text``; ``ValueError`` (with the reason) when refused."""
    if not isinstance(text, str) or not text:
        raise ValueError("empty host")
    host = text
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError("host %r is not a valid internationalised name" % text[:100]) from None
    host = host.lower()
    if host.startswith("[") and host.endswith("]"):
        inner = host[1:-1]
        if ":" not in inner:
            raise ValueError("host %r: brackets hold IPv6 addresses only" % text[:100])
        host = inner
    if ":" in host:
        if "%" in host:
            raise ValueError("host %r: IPv6 zone identifiers are not accepted" % text[:100])
        ip = canonical_ip(host)
        if ip is None:
            raise ValueError("host %r is not a valid IPv6 address" % text[:100])
        return Host(str(ip), ip)
    if host.endswith("."):
        host = host[:-1]
    if _QUAD.match(host):
        try:
            ip4 = ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError("host %r: an address label is over 255" % text[:100]) from None
        return Host(str(ip4), ip4)
    labels = host.split(".")
    if _NUMERIC_LABEL.match(labels[-1]):
        raise ValueError("host %r is a numeric address spelling other than a.b.c.d; write the address"
                         " in dotted-quad form" % text[:100])
    if not host or len(host) > MAX_NAME or not all(_LABEL.match(label) for label in labels):
        raise ValueError("host %r is not a valid DNS name" % text[:100])
    return Host(host, None)


def is_loopback_name(name: str) -> bool:
    """``localhost`` or a name under ``.localhost``: loopback without asking any resolver."""
    return name == "localhost" or name.endswith(".localhost")


def fixed_addresses(host: Host) -> Optional[List[IPAddress]]:
    """The addresses of a host known without DNS: its own address, loopback for ``*.localhost``,
    none for ``*.invalid``; ``None`` when only a resolver can tell."""
    if host.ip is not None:
        return [host.ip]
    if is_loopback_name(host.text):
        return [ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1")]
    if host.text == "invalid" or host.text.endswith(".invalid"):
        return []
    return None
