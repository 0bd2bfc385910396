"""``python -m agenshield_shim.broker``: the same as ``agenshield-shim broker``."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
