"""How a host and a port are written: ``host:port``, a URL's authority, ``scheme://host:port``.

One home for what every hook, the rpc core, the CLI tools and the broker each used to spell
themselves: an IPv6 literal goes in brackets (once, whether it came with them or not) so the port
stays readable, and a URL leaves out its scheme's default port. Text only, no imports: the hooks
load this with their library, and a hook may bring no module the library does not (the guard
keeps its own sealed copy, ``_boot.format_destination``, which must not load anything at start-up;
a unit test checks the two agree). Canonical forms of a host, for decisions, are
:mod:`agenshield_shim.addr`'s.
"""

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Optional

#: The port a URL leaves out, by scheme.
DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


def bracketed(host: str) -> str:
    """``host`` as written before a port: an IPv6 literal in brackets, anything else as it is."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return "[%s]" % host if ":" in host else host


def authority(host: str, port: "Optional[object]") -> str:
    """``host:port`` (IPv6 in brackets), or the host alone when ``port`` is None."""
    shown = bracketed(host)
    return shown if port is None else "%s:%s" % (shown, port)


def origin_authority(scheme: str, host: str, port: "Optional[object]") -> str:
    """``host[:port]`` for a URL or a ``Host`` header: the scheme's default port left out."""
    if port is None or int(port) == DEFAULT_PORTS.get(scheme.lower()):  # type: ignore[call-overload]
        return bracketed(host)
    return authority(host, int(port))  # type: ignore[call-overload]


def destination(scheme: str, host: str, port: "Optional[object]" = None) -> str:
    """``scheme://host:port`` with the port always written (the scheme's default when None), as
    messages show what was tunnelled or refused."""
    if port is None:
        port = DEFAULT_PORTS.get(scheme.lower())
    return "%s://%s" % (scheme, authority(host, port))


def proxy_url(host: str, port: object) -> str:
    """The broker as a proxy URL: ``http://host:port``."""
    return "http://" + authority(host, port)
