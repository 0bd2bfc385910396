"""Settings for the whole test tree.

On CI (``CI`` set) hypothesis runs derandomized: the same examples on every run, so a red CI is
reproducible and never a coin toss; locally it explores new examples each run (and keeps the
failures it found in ``.hypothesis/``).
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
