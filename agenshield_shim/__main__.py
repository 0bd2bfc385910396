"""``python -m agenshield_shim``: the same command line as ``agenshield-shim``."""

import sys

from .cli import main

sys.exit(main())
