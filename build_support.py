"""setuptools build step that puts the interpreter start-up files in the wheel.

site only reads ``*.pth`` files from the root of a site directory, and a
package's data files land inside the package, so the start-up files are copied
into the root of ``build_lib``, from where bdist_wheel puts them at the root of
purelib. Editable installs skip this on purpose: a development checkout should
not switch the network off for the developer's own interpreter.
"""

import os
from typing import List

from setuptools.command.build_py import build_py

# Only the .pth for now: under PEP 829 (3.15+) a matching .start file would switch the
# .pth's import line off, and a failing .start entry point is printed and ignored, which
# would lose the fail-closed fallback that the .pth line carries (README, "Python 3.15").
STARTUP_FILES = ("agenshield_shim.pth",)


class BuildPyWithStartupFiles(build_py):  # type: ignore[misc]
    def run(self) -> None:
        super().run()
        here = os.path.dirname(os.path.abspath(__file__))
        for name in STARTUP_FILES:
            source = os.path.join(here, name)
            if os.path.exists(source):
                self.copy_file(source, os.path.join(self.build_lib, name), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> List[str]:
        outputs = list(super().get_outputs(include_bytecode))
        return outputs + [os.path.join(self.build_lib, name) for name in STARTUP_FILES]
