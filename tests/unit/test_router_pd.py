"""P/D orchestration in the router against our own in-process prefill and decode backends."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from router_fakes import FakeBackend, start_router

from vllm_llmd.router.config import RouterConfig


@pytest.fixture
async def pd_backends() -> AsyncIterator[tuple[FakeBackend, FakeBackend]]:
    p, d = await FakeBackend("prefill").start(), await FakeBackend("decode").start()
    yield p, d
    await p.close()
    await d.close()


def _cfg(p: FakeBackend, d: FakeBackend, threshold: int = 100) -> RouterConfig:
    return RouterConfig.model_validate(
        {
            "models": ["test-model"],
            "pods": [{"url": p.url, "role": "prefill"}, {"url": d.url, "role": "decode"}],
            "pd": {"threshold_tokens": threshold},
        }
    )


async def test_long_prompt_is_disaggregated(pd_backends) -> None:
    p, d = pd_backends
    _, srv = await start_router(_cfg(p, d))
    try:
        body = {
            "model": "test-model",
            "prompt": "word " * 2000,
            "max_tokens": 5,
            "stream": True,
            "extra_body": {"kv_transfer_params": {"remote_host": "evil"}},
        }
        async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{srv.port}/v1/completions", json=body) as r:
            assert r.status == 200
            assert r.headers["X-LLMD-Pod"] == d.pod_id
            assert r.headers["X-LLMD-Prefill-Pod"] == p.pod_id
            assert (await r.read()).endswith(b"data: [DONE]\n\n")
        leg = p.received[0]
        assert leg["max_tokens"] == 1 and leg["stream"] is False
        assert leg["kv_transfer_params"]["do_remote_decode"] is True
        assert "kv_transfer_params" not in leg.get("extra_body", {})
        dec = d.received[0]
        assert dec["stream"] is True and dec["max_tokens"] == 5
        assert dec["kv_transfer_params"]["remote_engine_id"] == "engine-prefill"
        assert dec["kv_transfer_params"]["remote_host"] == "127.0.0.1"  # from the prefill engine, not the client
    finally:
        await srv.close()


async def test_short_prompt_stays_on_the_decode_pod(pd_backends) -> None:
    p, d = pd_backends
    _, srv = await start_router(_cfg(p, d, threshold=1000))
    try:
        body = {"model": "test-model", "prompt": "short", "max_tokens": 2}
        async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{srv.port}/v1/completions", json=body) as r:
            assert r.status == 200 and "X-LLMD-Prefill-Pod" not in r.headers
        assert not p.received and "kv_transfer_params" not in d.received[0]
    finally:
        await srv.close()


async def test_prefill_pod_failure_falls_back_to_aggregated(pd_backends) -> None:
    p, d = pd_backends
    p.die = "before_first_byte"
    _, srv = await start_router(_cfg(p, d))
    try:
        body = {"model": "test-model", "prompt": "word " * 2000, "max_tokens": 2}
        async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{srv.port}/v1/completions", json=body) as r:
            assert r.status == 200 and r.headers["X-LLMD-Pod"] == d.pod_id
        assert "kv_transfer_params" not in d.received[0]
    finally:
        await srv.close()
