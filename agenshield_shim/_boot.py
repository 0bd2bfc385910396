"""Boot: the one import of ``agenshield_shim.pth``, run by ``site`` at every interpreter start.

It reads the configuration, decides, and activates. The ``.pth`` line itself
skips everything when ``AGENSHIELD_ENABLED`` says off, so a disabled
interpreter imports nothing of ours. Enabled, the boot imports only the shim's
own small modules: the guard needs neither ``socket`` nor ``asyncio``, library
hooks are registered by name (imported with their library), and with no
``AGENSHIELD_*`` variable set the configuration parser is not even loaded.
A configuration it cannot trust turns into a guard that blocks everything and
one line on stderr: never an open network.

``site`` runs a ``.pth`` line twice in a virtual environment on some versions
(lib and lib64 are both site directories), so ``boot`` is idempotent.

Every module imported here costs every Python process of the environment
0.15-0.3 ms (benchmarks/startup.py), which is why the post-import registry
lives here rather than in a module of its own.
"""

import os
import sys

TYPE_CHECKING = False  # typing costs milliseconds at every start; only the type checker reads it
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Union

    from ._config import Config

    Hook = Union[str, Callable[[Any], None]]

_booted = False
_config_object = None  # the parsed Config when AGENSHIELD_* variables were set at boot

#: Kept equal to ``_config.VARIABLES`` (a unit test checks): when none is set, defaults apply.
VARIABLES = (
    "AGENSHIELD_ENABLED",
    "AGENSHIELD_BROKER_HOST",
    "AGENSHIELD_BROKER_PORT",
    "AGENSHIELD_BROKER_SOCKET",
    "AGENSHIELD_LOG_LEVEL",
    "AGENSHIELD_ALLOW",
    "AGENSHIELD_AUDIT_LOG",
    "AGENSHIELD_TRANSPORT",
)

#: (module whose import triggers the hook, "hook module:function"), registered in this order.
HOOKS = (
    ("socket", "agenshield_shim.hooks.socket:install"),
    ("http.client", "agenshield_shim.hooks.http_client:install"),
    ("aiohttp", "agenshield_shim.hooks.aiohttp:install"),
    ("httpx", "agenshield_shim.hooks.httpx:install"),
)


def boot() -> None:
    """Activate the shim for this interpreter (once)."""
    global _booted
    if _booted:
        return
    _booted = True
    from . import _guard

    environ = os.environ
    lock = os.path.join(os.path.dirname(os.path.dirname(__file__)), "agenshield_shim.lock")
    locked = os.path.exists(lock)
    if locked or any(name in environ for name in VARIABLES):
        from . import _config

        try:
            config = _config.load(environ, lock if locked else None)
        except (_config.ShimConfigError, OSError) as exc:
            reason = "invalid configuration: %s" % (exc,)
            _guard.install(_guard.block_all_policy("(unknown: configuration invalid)", reason), _report)
            sys.stderr.write("agenshield-shim: %s; all network access is blocked until it is fixed\n" % (exc,))
            return
        if not config.enabled:  # only reached when boot() is called directly: the .pth checks first
            return
        if config.log_level != "warn" or config.audit_log:
            from . import _log

            _log.configure(config.log_level, config.audit_log)
        policy = _guard.policy_from_config(config)
        global _config_object
        _config_object = config
    else:
        policy = _guard.policy_for("localhost", 6969)
    _guard.install(policy, _report)
    for module_name, hook in HOOKS:
        when_imported(module_name, hook)


def active_config() -> "Optional[Config]":
    """The configuration this interpreter booted with, for the library hooks; None if not booted.

    Parsed here only when a hook asks for it and no variable was set (the boot skips the
    parser then): the defaults.
    """
    global _config_object
    if not _booted or _guard_installed() is None:
        return None
    if _config_object is None:
        from ._config import Config

        _config_object = Config()
    return _config_object


def _guard_installed() -> "Optional[object]":
    guard = sys.modules.get("agenshield_shim._guard")
    return None if guard is None else guard.active_policy()


def _report(event: str, target: str, policy: object) -> None:
    """Log a refusal; ``logging`` and the audit-log writer load only when something is refused."""
    from ._log import report_block

    report_block(event, target, policy)


# -- post-import hooks ------------------------------------------------------------------------
# Post-import hooks: run a function when a module is imported, whatever the import order.
#
# The semantics are wrapt's ``when_imported``: if the module is already imported
# the hook runs at once, otherwise right after the module's code has run. Each
# hook runs exactly once per module object (``importlib.reload`` keeps the
# object, so it does not run again; a module removed from ``sys.modules`` and
# imported anew is a new object, and it does).
#
# Why not wrapt itself: ``import wrapt`` costs 30 ms (1.17) to 115-145 ms (2.x)
# per interpreter start on our machines, against a 15-18 ms bare start, and the
# boot path pays it in every Python process of the environment. This finder is a
# few dozen lines, imports nothing, and costs one dict lookup per import.
#
# Hooks are named as ``"package.module:function"`` strings so a hook's own module
# is imported only when its library is.


_hooks: "Dict[str, List[Hook]]" = {}
_searching: "Set[str]" = set()
_MARK = "__agenshield_hooks__"


def when_imported(name: str, hook: "Hook") -> None:
    """Run ``hook(module)`` once the module ``name`` is imported (now, if it already is)."""
    _install_finder()
    _hooks.setdefault(name, []).append(hook)
    module = sys.modules.get(name)
    if module is not None:
        _fire(name, module, [hook])


def registered() -> "Dict[str, List[Hook]]":
    return {name: list(hooks) for name, hooks in _hooks.items()}


def _resolve(hook: "Hook") -> "Callable[[Any], None]":
    if callable(hook):
        return hook
    module_name, _, attr = hook.partition(":")
    __import__(module_name)
    return getattr(sys.modules[module_name], attr)  # type: ignore[no-any-return]


def _key(hook: "Hook") -> object:
    """A bound method is a new object at each attribute access: key it by what it binds."""
    if isinstance(hook, str):
        return hook
    bound_to = getattr(hook, "__self__", None)
    if bound_to is None:
        return id(hook)
    return (id(bound_to), getattr(hook, "__name__", None), id(getattr(hook, "__func__", None)))


def _fire(name: str, module: "Any", hooks: "Sequence[Hook]") -> None:
    try:
        done = module.__dict__.setdefault(_MARK, set())
    except (AttributeError, TypeError):  # not a real module object: nothing to patch
        return
    for hook in hooks:
        key = _key(hook)
        if key in done:
            continue
        done.add(key)
        try:
            _resolve(hook)(module)
        except Exception:  # a broken hook must not break the import; the guard still holds
            from ._log import get_logger

            get_logger().exception("post-import hook %r for %s failed", hook, name)


class _HookedLoader:
    """Wraps the real loader to run the hooks after the module's code has run.

    The module keeps the real loader (``__loader__`` and ``__spec__.loader``),
    so introspection and ``importlib.reload`` see exactly what they would without us.
    """

    def __init__(self, loader: "Any", name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec: "Any") -> "Any":
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: "Any") -> None:
        try:
            module.__loader__ = self._loader
        except AttributeError:
            pass
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self._loader
        self._loader.exec_module(module)
        # a module may replace itself in sys.modules while it runs
        final = sys.modules.get(self._name, module)
        _fire(self._name, final, _hooks.get(self._name, ()))

    def __getattr__(self, name: str) -> "Any":
        return getattr(self._loader, name)


class PostImportFinder:
    """A meta path finder that only ever answers for modules that have hooks."""

    def find_spec(self, fullname: str, path: "Any" = None, target: "Any" = None) -> "Any":
        if fullname not in _hooks or fullname in _searching:
            return None
        _searching.add(fullname)
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self:
                    continue
                find_spec = getattr(finder, "find_spec", None)
                if find_spec is None:
                    continue
                spec = find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            _searching.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None  # let the import system handle what we cannot wrap
        spec.loader = _HookedLoader(spec.loader, fullname)
        return spec

    def invalidate_caches(self) -> None:
        pass


_finder: "Optional[PostImportFinder]" = None


def _install_finder() -> None:
    global _finder
    if _finder is None:
        _finder = PostImportFinder()
        sys.meta_path.insert(0, _finder)
