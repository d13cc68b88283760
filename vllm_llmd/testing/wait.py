"""Wait on a condition, not on time: poll until it holds or a deadline passes (tests, benchmarks)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(cond: Callable[[], T], timeout: float, what: str = "condition", interval: float = 0.02) -> T:
    """Return ``cond()``'s first truthy value; ``AssertionError`` naming ``what`` after ``timeout`` s.
    ``interval`` is only the polling period: the wait ends as soon as the condition holds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(interval)


async def wait_until_async(
    cond: Callable[[], T | Awaitable[T]], timeout: float, what: str = "condition", interval: float = 0.02
) -> T:
    """:func:`wait_until` for event-loop code; ``cond`` may be a plain or an async callable."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if asyncio.iscoroutine(value) or isinstance(value, Awaitable):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(interval)
