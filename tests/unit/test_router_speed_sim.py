"""End to end on the fleet simulator: three simulated pods, two of them 4x faster than the third,
configured alike (no ``prefill_speed``): the router learns their speeds from its own streamed
answers and the slow pod gets less work."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import aiohttp
import zmq.asyncio
from prometheus_client.parser import text_string_to_metric_families
from router_fakes import start_router

from vllm_llmd.router.config import RouterConfig
from vllm_llmd.router.tokenize import PromptTokenizer
from vllm_llmd.sim.cost import CostModel
from vllm_llmd.sim.profile import PodProfile
from vllm_llmd.sim.server import PodEndpoints, SimPod, Vocabulary
from vllm_llmd.testing.engine import free_port

MODEL = "test-model"
COST = CostModel(step_s=0.006, prefill_token_s=1.5e-4, decode_seq_s=1e-4, request_s=0.002)


async def test_the_slow_pod_is_learned_and_gets_less_work(test_model_dir: Path) -> None:
    zctx = zmq.asyncio.Context()
    tok, vocab = PromptTokenizer(test_model_dir), Vocabulary(test_model_dir)
    pods = []
    for i, speed in enumerate((1.0, 1.0, 0.25)):
        prof = PodProfile(name=f"s{speed}", block_size=16, num_gpu_blocks=2048, cost=COST.scaled(speed))
        ep = PodEndpoints(i, "127.0.0.1", free_port(), None, None)
        pods.append(SimPod(ep, prof, MODEL, tok, vocab, zctx, root=str(test_model_dir)))
    for p in pods:
        await p.start()
    cfg = RouterConfig.model_validate(
        {"models": [MODEL], "pods": [{"url": p.ep.url} for p in pods], "speed": {"prior_samples": 2, "window": 16}}
    )
    router, server = await start_router(cfg)
    rng = random.Random(0)
    ids = list(vocab.ids)
    served: list[str] = []
    try:
        async with aiohttp.ClientSession() as s:

            async def one() -> None:
                body = {
                    "model": MODEL,
                    "prompt": [rng.choice(ids) for _ in range(400)],  # unique: every prompt is cold
                    "max_tokens": 12,
                    "stream": True,
                }
                async with s.post(f"http://127.0.0.1:{server.port}/v1/completions", json=body) as r:
                    assert r.status == 200, await r.text()
                    await r.read()
                    served.append(r.headers["X-LLMD-Pod"])

            for _ in range(20):  # 80 requests, 4 at a time
                await asyncio.gather(*(one() for _ in range(4)))
            async with s.get(f"http://127.0.0.1:{server.port}/metrics") as r:
                metrics = await r.text()
    finally:
        await server.close()
        for p in pods:
            await p.stop()
        zctx.term()
    fast = [f"127.0.0.1:{p.ep.port}" for p in pods[:2]]
    slow = f"127.0.0.1:{pods[2].ep.port}"
    est = router.scheduler.ctx.speeds
    est.refresh()
    assert est.prefill[slow] < 0.6 * min(est.prefill[f] for f in fast), est.prefill
    assert est.decode[slow] < 0.7 * min(est.decode[f] for f in fast), est.decode
    later = served[40:]  # once learned: the slow pod serves well under a third
    assert later.count(slow) <= 0.2 * len(later), {p: later.count(p) for p in {*fast, slow}}
    assert all(served.count(slow) < served.count(f) for f in fast)
    # operators see what was learned
    speed = {
        (x.labels["pod"], x.labels["kind"]): x.value
        for f in text_string_to_metric_families(metrics)
        for x in f.samples
        if x.name == "llmd_router_pod_speed"
    }
    assert speed[(slow, "prefill")] < 0.6 * min(speed[(f, "prefill")] for f in fast), speed
