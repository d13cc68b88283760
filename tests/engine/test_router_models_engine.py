"""Pools per model, LoRA and cache_salt block keys against real engines (issue 14).

A third engine serves the test model with a locally made LoRA adapter (``tiny-lora``,
:func:`vllm_llmd.testing.lora.make_test_lora`); the session's engine A serves the base model only.
Requests for the adapter must land on the LoRA engine; its KV events (``lora_name``) must match the
router's adapter-rooted block keys, and never the base model's. A salted prompt must match only its
own salt's keys (the engine's events carry the salt as an extra key of the first block).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from router_harness import pod_id, prefix_hits, prose, routed

from vllm_llmd.router.config import PodConfig
from vllm_llmd.testing.engine import EngineProcess, EngineSpec
from vllm_llmd.testing.lora import make_test_lora
from vllm_llmd.testing.wait import wait_until_async

pytestmark = pytest.mark.engine

LORA = "tiny-lora"


@pytest.fixture(scope="module")
def lora_engine(test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    adapter = make_test_lora(test_model_dir, tmp_path_factory.mktemp("lora") / LORA)
    logs = Path(os.environ.get("LLMD_TEST_LOG_DIR") or tmp_path_factory.mktemp("engine-logs"))
    spec = EngineSpec(
        model=test_model_dir,
        block_size=64,
        extra_args=[
            "--enforce-eager",
            "--enable-lora",
            "--max-loras",
            "1",
            "--max-lora-rank",
            "8",
            "--lora-modules",
            f"{LORA}={adapter}",
        ],
    )
    engine = EngineProcess(spec, logs / "engine-lora.log")
    try:
        engine.start_ready()
        yield engine
    finally:
        engine.stop()


def _pods(*engines: EngineProcess) -> list[dict]:
    return [
        PodConfig(url=e.url, events=e.spec.events_endpoint, replay=e.spec.replay_endpoint).model_dump() for e in engines
    ]


async def _post(s: aiohttp.ClientSession, url: str, body: dict) -> tuple[dict, aiohttp.typedefs.LooseHeaders]:
    async with s.post(url, json=body) as r:
        out = await r.json()
        assert r.status == 200, out
        return out, r.headers


async def _held(router, pod: str, keys: list[int], min_tokens: int, what: str) -> None:
    def ok() -> bool:
        m = router.index.match_keys(keys).get(pod)
        return m is not None and m.tokens >= min_tokens

    await wait_until_async(ok, 60, what, interval=0.05)


def _tokens(router, pod: str, keys: list[int]) -> int:
    m = router.index.match_keys(keys).get(pod)
    return 0 if m is None else m.tokens


async def test_adapter_requests_land_on_the_adapter_pod_with_adapter_keys(engines, lora_engine, test_model_dir) -> None:
    a, lo = pod_id(engines.a), pod_id(lora_engine)
    overrides = {"pods": _pods(engines.a, lora_engine), "index": {"speculative_ttl_s": 0}}
    async with routed([], test_model_dir, **overrides) as (router, base), aiohttp.ClientSession() as s:
        await wait_until_async(
            lambda: all(p.served is not None for p in router.pool.pods), 30, "both pods' model lists read"
        )
        async with s.get(base + "/v1/models") as r:
            cards = {c["id"]: c for c in (await r.json())["data"]}
        assert set(cards) == {"test-model", LORA} and cards[LORA]["parent"] == "test-model"
        prompt = prose(41, 500)
        for i in range(4):  # only the LoRA engine serves the adapter
            body = {"model": LORA, "prompt": f"{prompt} q{i}", "max_tokens": 1}
            assert (await _post(s, base + "/v1/completions", body))[1]["X-LLMD-Pod"] == lo
        seen = set()
        for i in range(6):  # the base model is on both
            body = {"model": "test-model", "prompt": prose(60 + i, 80), "max_tokens": 1}
            seen.add((await _post(s, base + "/v1/completions", body))[1]["X-LLMD-Pod"])
        assert seen <= {a, lo}
        # the engine's events for the adapter's blocks (lora_name) match the adapter-rooted keys only
        toks = router.tokenizer.encode(prompt + " again")
        lora_keys = router.index.block_keys("test-model", toks, lora=LORA)
        await _held(router, lo, lora_keys, 1024, "the LoRA engine's adapter blocks in the index")
        assert _tokens(router, lo, router.index.block_keys("test-model", toks)) == 0  # no cross-adapter hit
        hits = prefix_hits(lora_engine)
        _, h = await _post(s, base + "/v1/completions", {"model": LORA, "prompt": prompt + " again", "max_tokens": 1})
        assert h["X-LLMD-Pod"] == lo and int(h["X-LLMD-Predicted-Cached-Tokens"]) >= 1024
        assert prefix_hits(lora_engine) - hits >= 1024  # the engine really reused the adapter's blocks


async def test_salted_prompts_hit_only_their_own_salt(engines, test_model_dir) -> None:
    a = pod_id(engines.a)
    async with (
        routed(engines, test_model_dir, index={"speculative_ttl_s": 0}) as (router, base),
        aiohttp.ClientSession() as s,
    ):
        prompt = prose(77, 600)
        # warm the salted prefix on engine A behind the router's back
        body = {"model": "test-model", "prompt": prompt + " first", "max_tokens": 1, "cache_salt": "tenant-1"}
        await _post(s, engines.a.url + "/v1/completions", body)
        toks = router.tokenizer.encode(prompt + " second")
        salted = router.index.block_keys("test-model", toks, extra="tenant-1")
        await _held(router, a, salted, 1024, "engine A's salted blocks in the index")
        assert _tokens(router, a, router.index.block_keys("test-model", toks)) == 0  # unsalted: no hit
        assert _tokens(router, a, router.index.block_keys("test-model", toks, extra="tenant-2")) == 0
        # through the router: the same salt is routed to A with a precise hit, another salt gets none
        hits = prefix_hits(engines.a)
        body = {"model": "test-model", "prompt": prompt + " second", "max_tokens": 1, "cache_salt": "tenant-1"}
        _, h = await _post(s, base + "/v1/completions", body)
        assert h["X-LLMD-Pod"] == a and int(h["X-LLMD-Predicted-Cached-Tokens"]) >= 1024
        assert prefix_hits(engines.a) - hits >= 1024
        body = {**body, "cache_salt": "tenant-2", "prompt": prompt + " third"}
        _, h = await _post(s, base + "/v1/completions", body)
        assert int(h["X-LLMD-Predicted-Cached-Tokens"]) == 0
