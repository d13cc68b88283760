"""Issue 9: what a hostile client or a broken pod did to the router, each case kept as a test
(against our in-process stand-in backends; the fuzzing and the soak are in tests/robustness)."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from router_fakes import FakeBackend, config_for, start_router

from vllm_llmd.testing.model import make_test_model

WORDS = "kari tone musa lovi stra ion ent verdor qua".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_model(tmp_path_factory.mktemp("hardening") / "tiny", shape="tiny")


@pytest.fixture
async def backends() -> AsyncIterator[list[FakeBackend]]:
    bs = [await FakeBackend("a").start(), await FakeBackend("b").start()]
    yield bs
    for b in bs:
        await b.close()


def _prose(n_chars: int) -> str:
    words = " ".join(f"{WORDS[i % len(WORDS)]}{(i * 7) % 97}" for i in range(n_chars // 4 + 1))
    return words[:n_chars]


async def _probe_health(base: str, stop: asyncio.Event) -> list[float]:
    lat: list[float] = []
    async with aiohttp.ClientSession() as s:
        while not stop.is_set():
            t = time.perf_counter()
            async with s.get(base + "/health") as r:
                assert r.status == 200
            lat.append(time.perf_counter() - t)
            await asyncio.sleep(0.01)
    return lat


# ---- case 1: one long prompt -------------------------------------------------------------------


async def test_one_long_prompt_neither_blows_up_memory_nor_stalls_health(backends, model_dir: Path) -> None:
    """A 250 KB prompt took the old router's tokenizer cache to hundreds of MB (quadratic) and
    stalled the event loop for about a second."""
    _router, srv = await start_router(config_for(backends, tokenizer={"path": str(model_dir)}))
    base = f"http://127.0.0.1:{srv.port}"
    stop = asyncio.Event()
    tracemalloc.start()
    try:
        prober = asyncio.create_task(_probe_health(base, stop))
        body = {"model": "test-model", "prompt": _prose(250_000), "max_tokens": 1}
        async with aiohttp.ClientSession() as s, s.post(base + "/v1/completions", json=body) as r:
            assert r.status == 200
        peak = tracemalloc.get_traced_memory()[1]
        stop.set()
        lat = await prober
    finally:
        tracemalloc.stop()
        await srv.close()
    assert peak < 64 << 20, f"peak {peak / 2**20:.0f} MiB"
    assert len(lat) >= 3 and max(lat) < 1.0, max(lat)


# ---- case 2: kv_transfer_params through vllm_xargs ----------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        {"vllm_xargs": {"kv_transfer_params": "anything", "keep": 1}},
        {"vllm_xargs": {"ec_transfer_params": "anything", "keep": 1}},
        {"ec_transfer_params": {"remote_host": "evil"}, "vllm_xargs": {"keep": 1}},
        {"extra_body": {"ec_transfer_params": {}}, "vllm_xargs": {"keep": 1}},
    ],
)
async def test_client_transfer_params_are_stripped_from_every_place_vllm_reads_them(backends, extra) -> None:
    """vLLM 0.32 fills ``SamplingParams.extra_args`` from ``vllm_xargs`` (then the top-level field),
    and ``Request.kv_transfer_params`` comes from there: a client must reach neither way."""
    _router, srv = await start_router(config_for(backends))
    try:
        body = {"model": "test-model", "prompt": "x", "max_tokens": 1, **extra}
        async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{srv.port}/v1/completions", json=body) as r:
            assert r.status == 200
        got = next(b for b in backends if b.received).received[0]
        for where in (got, got.get("vllm_xargs", {}), got.get("extra_body", {})):
            assert "kv_transfer_params" not in where and "ec_transfer_params" not in where, got
        assert got["vllm_xargs"] == {"keep": 1}  # everything else passes through
    finally:
        await srv.close()
