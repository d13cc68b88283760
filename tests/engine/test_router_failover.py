"""Failover with real engines: kill one engine while the router has traffic in flight; no request
that had not started streaming is lost; the engine is restarted and takes traffic again.

Marked destructive (runs after every other test, tests/conftest.py) because it kills a shared
engine; it leaves it running and healthy."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
import pytest
from router_harness import pod_id, prose, routed

from vllm_llmd.testing.wait import wait_until_async

pytestmark = [pytest.mark.engine, pytest.mark.destructive]


@dataclass
class Outcome:
    i: int
    started: bool = False  # the client received at least one byte of the answer
    ok: bool = False  # the stream ended with [DONE]
    finished: bool = False  # the client is done with it (answered, broken or refused)
    events: int = 0  # SSE events received (of max_tokens + 1)
    pod: str = ""
    error: str = ""


async def _one(
    s: aiohttp.ClientSession, base: str, i: int, prefix_seed: int | None = None, live: list[Outcome] | None = None
) -> Outcome:
    o = Outcome(i)
    if live is not None:
        live.append(o)
    body = {
        "model": "test-model",
        "prompt": prose(i % 4 if prefix_seed is None else prefix_seed, 200) + f" request {i}",
        "max_tokens": 96,  # long enough that a running stream can be caught well before its end
        "stream": True,
        "ignore_eos": True,
    }
    try:
        async with s.post(base + "/v1/completions", json=body) as r:
            o.pod = r.headers.get("X-LLMD-Pod", "")
            if r.status != 200:
                o.error = f"HTTP {r.status}: {await r.text()}"
                return o
            data = b""
            async for chunk in r.content.iter_any():
                o.started = True
                data += chunk
                o.events += chunk.count(b"data: ")
            o.ok = data.rstrip().endswith(b"data: [DONE]")
    except (TimeoutError, aiohttp.ClientError) as e:
        o.error = f"{type(e).__name__}: {e}"
    finally:
        o.finished = True
    return o


async def test_engine_killed_mid_run_loses_no_unstarted_request(engines, test_model_dir) -> None:
    victim, survivor = engines.a, engines.b
    pool = {"health_interval_s": 0.2, "failure_threshold": 2}
    loop = asyncio.get_running_loop()
    async with routed(engines, test_model_dir, pool=pool) as (_router, base), aiohttp.ClientSession() as s:
        sem = asyncio.Semaphore(6)
        done: list[Outcome] = []
        live: list[Outcome] = []

        async def run(i: int) -> Outcome:
            async with sem:
                o = await _one(s, base, i, live=live)
                done.append(o)
                return o

        def victim_streaming() -> bool:
            # it has served a request, and one of its streams is running now: the kill must be felt
            # (without the second condition the kill could land between the victim's streams, and the
            # health checks take it out before any request meets it: CI saw that once, 2026-12-03), with
            # at most half of its 96 tokens received (near its end a stream can finish before the kill lands)
            mine = [o for o in live if o.pod == pod_id(victim)]
            return any(o.ok for o in mine) and any(0 < o.events <= 48 and not o.finished for o in mine)

        tasks = [asyncio.create_task(run(i)) for i in range(36)]
        await wait_until_async(victim_streaming, 120, "the victim served a request and streams another", interval=0.005)
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
            burst = await asyncio.gather(*(_one(s, base, i + k, prefix_seed=i + k) for k in range(6)))
            assert all(o.ok for o in burst), burst
            seen = any(o.pod == pod_id(victim) for o in burst)
            i += 6
        assert seen, "the restarted engine never got traffic again"
