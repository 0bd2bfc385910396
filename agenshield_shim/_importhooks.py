"""Running post-import hooks: what happens when a module that has hooks is imported.

The registry and its finder are in ``_boot`` (they must be in place from the first
import on); this half loads with the first hooked module, so an interpreter that
never imports one does not pay for it at start-up (benchmarks/startup.py).
"""

import sys

from . import _boot

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Callable, Sequence

    from ._boot import Hook


def fire(name: str, module: "Any", hooks: "Sequence[Hook]") -> None:
    """Run each hook on ``module`` unless it already ran on this very module object."""
    try:
        done = module.__dict__.setdefault(_boot._MARK, set())
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


class HookedLoader:
    """The real loader, plus the hooks once the module's code has run.

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
        fire(self._name, final, _boot._hooks.get(self._name, ()))

    def __getattr__(self, name: str) -> "Any":
        return getattr(self._loader, name)

