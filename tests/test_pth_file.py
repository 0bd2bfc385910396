"""The checked-in ``agenshield_shim.pth`` is what tools/make_pth.py writes, and its pieces compile.

What the line does at start-up (disabled, enabled, broken install) is tested on real
interpreters in tests/integration/test_boot.py; here, only that nobody edited the
generated file by hand and that every nested piece is valid on this Python.
"""

import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _make_pth():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("make_pth", ROOT / "tools" / "make_pth.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checked_in_pth_is_the_generated_one() -> None:
    assert (ROOT / "agenshield_shim.pth").read_text() == _make_pth().text(), "run: python tools/make_pth.py"


def test_one_import_line_and_every_nested_piece_compiles() -> None:
    lines = [line for line in (ROOT / "agenshield_shim.pth").read_text().splitlines() if not line.startswith("#")]
    assert len(lines) == 1 and lines[0].startswith("import ")  # site execs only lines starting with "import"
    compile(lines[0], "agenshield_shim.pth", "exec")
    make_pth = _make_pth()
    for piece in (make_pth.BOOT, make_pth.FAILSAFE):
        compile(piece, "agenshield_shim.pth", "exec")
    # the line carries BOOT, and BOOT carries FAILSAFE, as string constants: compiled only when run
    constants = [node.value for node in ast.walk(ast.parse(lines[0])) if isinstance(node, ast.Constant)]
    assert make_pth.BOOT in constants
    assert make_pth.FAILSAFE in [node.value for node in ast.walk(ast.parse(make_pth.BOOT)) if isinstance(node, ast.Constant)]
