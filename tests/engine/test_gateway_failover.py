"""Gateway failover with real engines: kill one engine while Envoy has streams in flight.

Envoy forwards a pod's response headers as soon as they come, and vLLM sends them when it admits a
request (before the first token), so for Envoy a request has *started* once its response headers
are out; after that it cannot be retried anywhere. What must hold: no request is lost that had not
started (Envoy's ``retry_on: connect-failure,reset`` takes it to the picker's next endpoint), a
request that broke after its start is an error to the client (never a clean end), the picker's
accounting is released for all of them, and the restarted engine is picked again.

Marked destructive (runs after every other test, tests/conftest.py) because it kills a shared
engine; it leaves it running and healthy."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from failover_harness import POOL, Outcome, kill_one_mid_stream, restarted_engine_gets_traffic, stream_one
from gateway_engine_harness import gateway_config
from router_harness import pod_id

from vllm_llmd.testing.gateway import gateway_stack
from vllm_llmd.testing.wait import wait_until_async

pytestmark = [pytest.mark.engine, pytest.mark.destructive]


async def test_gateway_engine_killed_mid_run_loses_no_unstarted_request(engines, test_model_dir, tmp_path) -> None:
    cfg = gateway_config(engines, test_model_dir, pool=POOL)
    loop = asyncio.get_running_loop()
    async with gateway_stack(cfg, tmp_path) as gw, aiohttp.ClientSession() as s:

        async def send(i: int, prefix_seed: int | None, live: list[Outcome] | None, max_tokens: int) -> Outcome:
            return await stream_one(
                s, gw.url, i, prefix_seed=prefix_seed, live=live, started_on_headers=True, max_tokens=max_tokens
            )

        run = await kill_one_mid_stream(send, (engines.a, engines.b))
        try:
            results = run.results
            lost = [o for o in results if not o.ok and not o.started]
            assert not lost, f"requests lost before their response started: {lost}"
            assert run.killed_after < len(results)
            broken = [o for o in results if o.started and not o.ok]
            assert all(o.error for o in broken), broken  # a broken stream is an error, not a clean end
            assert any(o.ok and o.pod == pod_id(run.survivor) for o in results)
            # the kill was felt: a stream broke, or Envoy retried a request on the picker's fallback
            retries = gw.envoy.stats("cluster.llmd_pods.upstream_rq_retry")["cluster.llmd_pods.upstream_rq_retry"]
            assert broken or retries, "the kill went unnoticed"
            print(f"gateway failover: {len(results)} requests, {len(broken)} broken after start, {retries} retried")
            await wait_until_async(gw.idle, 30, "the picker's accounting released for every request")
        finally:
            # leave the shared engine running and healthy for the rest of the session
            await loop.run_in_executor(None, run.victim.start_ready)
        assert await restarted_engine_gets_traffic(send, run.victim), (
            "the restarted engine never got traffic again through the gateway"
        )
