"""Admission control (issue 14): with every pod saturated, requests wait in a bounded queue; a full
queue or a wait past queue_timeout_s is a 429 with Retry-After; nothing admitted is lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from router_fakes import FakeBackend, config_for, start_router

from vllm_llmd.testing.wait import wait_until_async


@pytest.fixture
async def pods() -> AsyncIterator[list[FakeBackend]]:
    gate = asyncio.Event()
    bs = [await FakeBackend("a", gate=gate).start(), await FakeBackend("b", gate=gate).start()]
    yield bs
    gate.set()
    for b in bs:
        await b.close()


async def _stream(s: aiohttp.ClientSession, url: str, i: int) -> tuple[int, bytes, dict]:
    body = {"model": "test-model", "prompt": f"request {i}", "max_tokens": 2, "stream": True}
    async with s.post(url, json=body) as r:
        return r.status, await r.read(), dict(r.headers)


async def test_saturated_pods_queue_then_refuse_and_lose_nothing_admitted(pods: list[FakeBackend]) -> None:
    admission = {"max_requests_per_pod": 1, "queue_size": 2, "queue_timeout_s": 30, "retry_after_s": 3}
    router, srv = await start_router(config_for(pods, admission=admission))
    url = f"http://127.0.0.1:{srv.port}/v1/completions"
    try:
        async with aiohttp.ClientSession() as s:
            running = [asyncio.create_task(_stream(s, url, i)) for i in range(2)]  # one per pod, held at the gate
            await wait_until_async(lambda: sum(len(p.received) for p in pods) == 2, 10, "both pods busy")
            queued = [asyncio.create_task(_stream(s, url, 10 + i)) for i in range(2)]
            await wait_until_async(lambda: router.admission.waiting == 2, 10, "two requests queued")
            status, body, headers = await _stream(s, url, 99)  # the queue is full
            assert status == 429 and headers["Retry-After"] == "3"
            assert b"saturated" in body and b"RateLimitError" in body
            assert sum(len(p.received) for p in pods) == 2  # the queued ones have not been sent yet
            pods[0].gate.set()  # the pods finish: every admitted request is served
            results = await asyncio.gather(*running, *queued)
        assert [r[0] for r in results] == [200] * 4
        assert all(r[1].endswith(b"data: [DONE]\n\n") for r in results)
        assert sum(len(p.received) for p in pods) == 4
        assert router.admission.rejected == 1 and router.admission.waiting == 0
        assert all(p.load.requests == 0 for p in router.pool.pods)
    finally:
        await srv.close()


async def test_a_wait_past_the_queue_timeout_is_a_429(pods: list[FakeBackend]) -> None:
    admission = {"max_requests_per_pod": 1, "queue_size": 8, "queue_timeout_s": 0.3}
    router, srv = await start_router(config_for(pods, admission=admission))
    url = f"http://127.0.0.1:{srv.port}/v1/completions"
    try:
        async with aiohttp.ClientSession() as s:
            running = [asyncio.create_task(_stream(s, url, i)) for i in range(2)]
            await wait_until_async(lambda: sum(len(p.received) for p in pods) == 2, 10, "both pods busy")
            status, _, headers = await _stream(s, url, 5)
            assert status == 429 and headers["Retry-After"] == "1"
            assert router.admission.waiting == 0
            pods[0].gate.set()
            assert [r[0] for r in await asyncio.gather(*running)] == [200, 200]
    finally:
        await srv.close()


async def test_a_waiting_client_that_leaves_frees_its_place(pods: list[FakeBackend]) -> None:
    admission = {"max_requests_per_pod": 1, "queue_size": 1, "queue_timeout_s": 30}
    router, srv = await start_router(config_for(pods, admission=admission))
    url = f"http://127.0.0.1:{srv.port}/v1/completions"
    try:
        async with aiohttp.ClientSession() as s:
            running = [asyncio.create_task(_stream(s, url, i)) for i in range(2)]
            await wait_until_async(lambda: sum(len(p.received) for p in pods) == 2, 10, "both pods busy")
            leaver = asyncio.create_task(_stream(s, url, 7))
            await wait_until_async(lambda: router.admission.waiting == 1, 10, "one queued")
            leaver.cancel()
            await wait_until_async(lambda: router.admission.waiting == 0, 10, "its place freed")
            stayer = asyncio.create_task(_stream(s, url, 8))
            await wait_until_async(lambda: router.admission.waiting == 1, 10, "the next one queued")
            pods[0].gate.set()
            results = await asyncio.gather(*running, stayer)
        assert [r[0] for r in results] == [200, 200, 200]
        assert sum(len(p.received) for p in pods) == 3  # the one that left was never sent
    finally:
        await srv.close()
