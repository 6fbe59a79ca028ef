"""Waiting on a condition, not on the clock: what a test of a real fleet synchronises on."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(
    predicate: Callable[[], object],
    timeout_s: float = 60.0,
    what: str = "condition",
    *,
    interval_s: float = 0.05,
) -> None:
    """Call ``predicate`` every ``interval_s`` seconds until it returns something true.

    Raises:
        AssertionError: not true after ``timeout_s`` seconds (the message names ``what``).
    """
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not met in {timeout_s:g} s: {what}")
        time.sleep(interval_s)
