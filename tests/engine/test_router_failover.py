"""Failover with real engines: kill one engine while the router has traffic in flight; no request
that had not started streaming is lost; the engine is restarted and takes traffic again.

Marked destructive (runs after every other test, tests/conftest.py) because it kills a shared
engine; it leaves it running and healthy."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from failover_harness import POOL, Outcome, kill_one_mid_stream, restarted_engine_gets_traffic, stream_one
from router_harness import pod_id, routed

pytestmark = [pytest.mark.engine, pytest.mark.destructive]


async def test_engine_killed_mid_run_loses_no_unstarted_request(engines, test_model_dir) -> None:
    loop = asyncio.get_running_loop()
    async with routed(engines, test_model_dir, pool=POOL) as (_router, base), aiohttp.ClientSession() as s:

        async def send(i: int, prefix_seed: int | None, live: list[Outcome] | None, max_tokens: int) -> Outcome:
            return await stream_one(s, base, i, prefix_seed=prefix_seed, live=live, max_tokens=max_tokens)

        run = await kill_one_mid_stream(send, (engines.a, engines.b))
        try:
            lost = [o for o in run.results if not o.ok and not o.started]
            assert not lost, f"requests lost before streaming: {lost}"
            assert run.killed_after < len(run.results)
            assert any(o.ok and o.pod == pod_id(run.survivor) for o in run.results), "the survivor served nothing"
            m = await (await s.get(base + "/metrics")).text()
            broken = [o for o in run.results if o.started and not o.ok]
            # the kill was felt: a stream broke, or a request hit the dead pod and was re-sent
            assert broken or "llmd_router_upstream_errors_total{" in m
        finally:
            # leave the shared engine running and healthy for the rest of the session
            await loop.run_in_executor(None, run.victim.start_ready)
        # the router notices the restart and sends to the victim again
        assert await restarted_engine_gets_traffic(send, run.victim), "the restarted engine never got traffic again"
