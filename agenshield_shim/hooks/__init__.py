"""One module per hooked library, each applied when (and only when) the application imports it.

Every hook module has the same small shape: ``TARGET`` (the module whose import
triggers it) and ``install(module)``, with what it patches named at the top.
The table of hooks lives in ``agenshield_shim._boot.HOOKS``, so that reading it
costs no extra module at start.
"""
