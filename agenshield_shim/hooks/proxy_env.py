"""urllib.request: the hooked libraries do not see the broker in the proxy variables.

Patches: ``urllib.request.getproxies``.

Why: a guarded interpreter's ``HTTP(S)_PROXY``/``ALL_PROXY`` name the broker (``_boot``'s proxy
environment), for what no hook knows. The libraries that a hook routes already reach the broker
their own way (a tunnel per connection, or rpc); were they to read the variables, they would
change path: urllib and requests would send ``http://`` to the broker as a forwarding proxy, httpx
would prefer an environment proxy to a caller's ``all://`` mount, with other TLS settings. So for
them, and only them, the entries that name the broker are dropped from ``getproxies()`` (what
urllib's ``ProxyHandler``, requests, httpx and aiohttp's ``trust_env`` read): they behave exactly as
in an interpreter without the variables. Everyone else (httpx2 without a hook, niquests, httplib2,
websockets' trio client) gets them unchanged. The caller is told apart by the module that calls
``getproxies``; the libraries bind it at their import, which comes after ``urllib.request``'s.
"""

import functools
import sys
from types import ModuleType

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Dict, FrozenSet

TARGET = "urllib.request"

#: Routed by the http.client hook (which they use) rather than a hook of their own name.
_THROUGH_HTTP_CLIENT = frozenset(("urllib", "requests", "urllib3", "pip", "botocore"))
#: Registered in HOOKS but still reading the variables: websockets' trio client has no hook (the
#: others force the broker whatever the variables say); ``socket``/``http`` are not callers.
_NOT_CALLERS = frozenset(("websockets", "socket", "http"))


def install(module: ModuleType) -> None:
    original = module.getproxies
    if getattr(original, "__agenshield_original__", None) is not None:
        return
    from .._boot import BROKER, HOOKS, active_policy

    policy = active_policy()
    if policy is None or str(policy[BROKER]).startswith("("):  # no broker known: nothing was set
        return
    broker = "http://" + str(policy[BROKER])
    routed = _routed_packages(HOOKS)

    @functools.wraps(original)
    def getproxies() -> "Dict[str, str]":
        proxies = original()
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.split(".", 1)[0] in routed:
            return {scheme: url for scheme, url in proxies.items() if url != broker}
        return proxies  # type: ignore[no-any-return]

    getproxies.__agenshield_original__ = original  # type: ignore[attr-defined]
    module.getproxies = getproxies  # type: ignore[attr-defined]


def _routed_packages(hooks: "Any") -> "FrozenSet[str]":
    """Top-level packages whose requests a hook routes (read from ``HOOKS``: a new hook counts at once)."""
    return _THROUGH_HTTP_CLIENT | frozenset(name.split(".", 1)[0] for name, _ in hooks) - _NOT_CALLERS
