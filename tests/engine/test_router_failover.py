"""Failover with real engines: kill one engine while the router has traffic in flight; no request
that had not started streaming is lost; the engine is restarted and takes traffic again.

Marked destructive (runs after every other test, tests/conftest.py) because it kills a shared
engine; it leaves it running and healthy."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from failover_harness import Outcome, spread, stream_one, streaming_engine
from router_harness import pod_id, routed

from vllm_llmd.testing.wait import wait_until_async

pytestmark = [pytest.mark.engine, pytest.mark.destructive]


async def test_engine_killed_mid_run_loses_no_unstarted_request(engines, test_model_dir) -> None:
    pool = {"health_interval_s": 0.2, "failure_threshold": 2}
    loop = asyncio.get_running_loop()
    async with routed(engines, test_model_dir, pool=pool) as (_router, base), aiohttp.ClientSession() as s:
        sem = asyncio.Semaphore(6)
        done: list[Outcome] = []
        live: list[Outcome] = []

        async def run(i: int) -> Outcome:
            async with sem:
                o = await stream_one(s, base, i, live=live)
                done.append(o)
                return o

        tasks = [asyncio.create_task(run(i)) for i in range(36)]
        victim = await wait_until_async(
            lambda: streaming_engine(live, tuple(engines)) or all(t.done() for t in tasks),
            120,
            "an engine served a request and streams another",
            interval=0.005,
        )
        assert not isinstance(victim, bool), f"no engine was caught mid-stream; requests went to {spread(live)}"
        survivor = engines.b if victim is engines.a else engines.a
        print(f"failover: killing {pod_id(victim)} after requests went to {spread(live)}")
        killed_after = len(done)
        await loop.run_in_executor(None, victim.kill)
        results = await asyncio.gather(*tasks)
        try:
            lost = [o for o in results if not o.ok and not o.started]
            assert not lost, f"requests lost before streaming: {lost}"
            assert killed_after < len(results)
            after = [o for o in results if o.ok and o.pod == pod_id(survivor)]
            assert after, "the survivor served nothing"
            m = await (await s.get(base + "/metrics")).text()
            broken = [o for o in results if o.started and not o.ok]
            # the kill was felt: a stream broke, or a request hit the dead pod and was re-sent
            assert broken or "llmd_router_upstream_errors_total{" in m
        finally:
            # leave the shared engine running and healthy for the rest of the session
            await loop.run_in_executor(None, victim.start_ready)
        # the router notices the restart and sends to the victim again
        deadline = time.monotonic() + 60
        seen = False
        i = 1000
        while time.monotonic() < deadline and not seen:
            # bursts of new prefixes (cold on both engines), as with traffic. (CI, 2026-12-03: 60 s of
            # single requests all went to the survivor: the restarted pod's cached candidate kept the slow
            # speed learned before the kill; fixed in vllm_llmd.router.candidates, unit test in
            # tests/unit/test_router_speed.py)
            burst = await asyncio.gather(*(stream_one(s, base, i + k, prefix_seed=i + k) for k in range(6)))
            assert all(o.ok for o in burst), burst
            seen = any(o.pod == pod_id(victim) for o in burst)
            i += 6
        assert seen, "the restarted engine never got traffic again"
