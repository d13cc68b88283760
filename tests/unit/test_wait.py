"""vllm_llmd.testing.wait: the one polling helper the tests share."""

from __future__ import annotations

import itertools

import pytest

from vllm_llmd.testing.wait import wait_until, wait_until_async


def test_returns_the_first_truthy_value() -> None:
    calls = itertools.count()
    assert wait_until(lambda: (n := next(calls)) >= 3 and n, timeout=5, interval=0) == 3


def test_fails_naming_what_it_waited_for() -> None:
    with pytest.raises(AssertionError, match=r"not within 0\.05s: the moon"):
        wait_until(lambda: False, timeout=0.05, what="the moon", interval=0.01)


async def test_async_accepts_plain_and_async_conditions() -> None:
    calls = itertools.count()

    async def ready() -> bool:
        return next(calls) >= 2

    assert await wait_until_async(ready, timeout=5, interval=0) is True
    assert await wait_until_async(lambda: "yes", timeout=5) == "yes"
    with pytest.raises(AssertionError, match="never"):
        await wait_until_async(lambda: 0, timeout=0.05, what="never", interval=0.01)
