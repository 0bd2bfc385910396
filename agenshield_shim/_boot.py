"""Boot: the one import of ``agenshield_shim.pth``, run by ``site`` at every interpreter start.

It reads the configuration, decides, and activates. Disabled, it imports
nothing else (the interpreter is as without the shim). Enabled, it imports only
the shim's own small modules: the guard does not need ``socket`` or ``asyncio``,
and library hooks are registered by name, to be imported with their library.
A configuration it cannot trust turns into a guard that blocks everything and
one line on stderr: never an open network.

``site`` runs a ``.pth`` line twice in a virtual environment on some
versions (lib and lib64 are both site directories), so ``boot`` is idempotent.
"""

import os
import sys

_FALSE = ("false", "0", "no", "off")
_booted = False


def boot() -> None:
    """Activate the shim for this interpreter (once)."""
    global _booted
    if _booted:
        return
    _booted = True
    value = os.environ.get("AGENSHIELD_ENABLED")
    if value is not None and value.strip().lower() in _FALSE:
        return

    from . import _config, _guard, _importhooks, _log

    try:
        config = _config.load()
    except _config.ShimConfigError as exc:
        reason = "invalid configuration: %s" % (exc,)
        _guard.install(_guard.block_all_policy("(unknown: configuration invalid)", reason), _log.report_block)
        sys.stderr.write(
            "agenshield-shim: %s; all network access is blocked until it is fixed\n" % (exc,)
        )
        return
    _log.configure(config.log_level, config.audit_log)
    _guard.install(_guard.policy_from_config(config), _log.report_block)
    from .hooks import HOOKS

    for module_name, hook in HOOKS:
        _importhooks.when_imported(module_name, hook)
