"""The post-import registry, on real modules written to disk and imported for real."""

import importlib
import sys
from pathlib import Path
from typing import Any, Iterator, List

import pytest

from agenshield_shim import _boot as _importhooks


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A clean registry, our finder removed afterwards, and a folder to write modules into."""
    monkeypatch.setattr(_importhooks, "_hooks", {})
    monkeypatch.setattr(_importhooks, "_finder", None)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = list(sys.meta_path)
    yield tmp_path
    sys.meta_path[:] = before
    for name in [n for n in sys.modules if n.startswith("agshtest_")]:
        del sys.modules[name]


def write(folder: Path, name: str, body: str = "VALUE = 1\n") -> None:
    (folder / (name + ".py")).write_text(body)
    importlib.invalidate_caches()


def test_hook_runs_after_a_later_import(registry: Path) -> None:
    write(registry, "agshtest_later", "VALUE = 41\n")
    seen: List[Any] = []
    _importhooks.when_imported("agshtest_later", lambda m: seen.append(m.VALUE))
    assert seen == []
    import agshtest_later  # type: ignore[import-not-found]

    assert seen == [41]
    # the module keeps its real loader; nothing of ours shows
    assert type(agshtest_later.__loader__).__name__ == "SourceFileLoader"
    assert agshtest_later.__spec__.loader is agshtest_later.__loader__


def test_hook_runs_at_once_for_an_imported_module(registry: Path) -> None:
    write(registry, "agshtest_before")
    import agshtest_before  # type: ignore[import-not-found]

    seen: List[Any] = []
    _importhooks.when_imported("agshtest_before", seen.append)
    assert seen == [agshtest_before]


def test_once_per_module_object(registry: Path) -> None:
    write(registry, "agshtest_once")
    seen: List[Any] = []
    _importhooks.when_imported("agshtest_once", seen.append)
    import agshtest_once  # type: ignore[import-not-found]

    importlib.reload(agshtest_once)  # same object: not again
    _importhooks.when_imported("agshtest_once", seen.append)  # same callable, same object: not again
    assert seen == [agshtest_once]
    del sys.modules["agshtest_once"]
    fresh = importlib.import_module("agshtest_once")  # a new object: again
    assert seen == [agshtest_once, fresh] and fresh is not agshtest_once


def test_hooks_by_name_are_imported_lazily(registry: Path) -> None:
    write(registry, "agshtest_target")
    write(registry, "agshtest_hookmod", "import sys\ndef install(module):\n    module.PATCHED = True\n")
    _importhooks.when_imported("agshtest_target", "agshtest_hookmod:install")
    assert "agshtest_hookmod" not in sys.modules
    import agshtest_target  # type: ignore[import-not-found]

    assert agshtest_target.PATCHED is True


def test_a_failing_hook_does_not_break_the_import(registry: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(registry, "agshtest_fail")

    def broken(module: Any) -> None:
        raise RuntimeError("boom")

    _importhooks.when_imported("agshtest_fail", broken)
    import agshtest_fail  # type: ignore[import-not-found]

    assert agshtest_fail.VALUE == 1
    assert "post-import hook" in caplog.text and "boom" in caplog.text


def test_a_module_that_replaces_itself_is_hooked_as_replaced(registry: Path) -> None:
    write(registry, "agshtest_swap", "import sys, types\nm = types.ModuleType('agshtest_swap')\nm.SWAPPED = True\nsys.modules['agshtest_swap'] = m\n")
    seen: List[Any] = []
    _importhooks.when_imported("agshtest_swap", seen.append)
    import agshtest_swap  # type: ignore[import-not-found]

    assert seen == [agshtest_swap] and agshtest_swap.SWAPPED


def test_submodules_and_packages(registry: Path) -> None:
    package = registry / "agshtest_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "client.py").write_text("NAME = 'client'\n")
    importlib.invalidate_caches()
    seen: List[Any] = []
    _importhooks.when_imported("agshtest_pkg.client", lambda m: seen.append(m.NAME))
    from agshtest_pkg import client  # type: ignore[import-not-found]  # noqa: F401

    assert seen == ["client"]


def test_only_registered_names_are_looked_at(registry: Path) -> None:
    _importhooks.when_imported("agshtest_missing", lambda m: None)
    finder = next(f for f in sys.meta_path if isinstance(f, _importhooks.PostImportFinder))
    assert finder.find_spec("json") is None
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("agshtest_missing")
