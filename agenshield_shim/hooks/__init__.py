"""One module per hooked library, each applied when (and only when) the application imports it.

Every hook module has the same small shape: ``TARGET`` (the module whose import
triggers it) and ``install(module)``, with what it patches named at the top.
"""

from typing import Tuple

#: (module that triggers the hook, "hook module:function"), in the order they are registered.
HOOKS: Tuple[Tuple[str, str], ...] = (
    ("socket", "agenshield_shim.hooks.socket:install"),
)
