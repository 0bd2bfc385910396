"""Reference broker (placeholder until the broker issue lands)."""

from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    raise SystemExit("agenshield-shim broker: not built yet")
