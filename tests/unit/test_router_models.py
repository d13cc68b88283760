"""Pools per model (issue 14): each pod serves what its /v1/models lists, requests go only there,
the router's /v1/models is the union; adapters are marked as LoRA for the block keys and scorers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from router_fakes import FakeBackend, config_for, start_router

from vllm_llmd.router.models import parse_models
from vllm_llmd.testing.wait import wait_until_async


@pytest.fixture
async def pods() -> AsyncIterator[list[FakeBackend]]:
    a = FakeBackend("a", served=[("base-a", None), ("lora-x", "base-a")])
    b = FakeBackend("b", served=[("base-a", None), ("base-b", None)])
    bs = [await a.start(), await b.start()]
    yield bs
    for x in bs:
        await x.close()


async def _known(router, n: int) -> None:
    await wait_until_async(lambda: sum(p.served is not None for p in router.pool.pods) == n, 10, "model lists read")


async def test_requests_go_only_to_pods_serving_their_model(pods: list[FakeBackend]) -> None:
    a, b = pods
    router, srv = await start_router(config_for(pods, models=[]))
    base = f"http://127.0.0.1:{srv.port}"
    try:
        await _known(router, 2)
        async with aiohttp.ClientSession() as s:
            for model, want in (("lora-x", {a.pod_id}), ("base-b", {b.pod_id}), ("base-a", {a.pod_id, b.pod_id})):
                seen = set()
                for i in range(6):
                    body = {"model": model, "prompt": f"p{i} " * 40, "max_tokens": 1}
                    async with s.post(base + "/v1/completions", json=body) as r:
                        assert r.status == 200, await r.text()
                        seen.add(r.headers["X-LLMD-Pod"])
                assert seen <= want and (len(want) == 1 or seen), (model, seen)
            async with s.post(base + "/v1/completions", json={"model": "nope", "prompt": "x"}) as r:
                assert r.status == 404
                err = (await r.json())["error"]
                assert err["type"] == "NotFoundError" and "nope" in err["message"]
            async with s.get(base + "/v1/models") as r:
                cards = (await r.json())["data"]
        assert [c["id"] for c in cards] == ["base-a", "lora-x", "base-b"]  # the union, each id once
        assert next(c for c in cards if c["id"] == "lora-x")["parent"] == "base-a"
    finally:
        await srv.close()


async def test_an_adapter_request_is_keyed_and_marked_as_lora(pods: list[FakeBackend]) -> None:
    router, srv = await start_router(config_for(pods, models=[]))
    try:
        await _known(router, 2)
        from vllm_llmd.router.endpoints import COMPLETIONS

        creq = router.parser.build(COMPLETIONS, b'{"model": "lora-x", "prompt": "hello"}', None)
        decode, _, req, _decision = await router.decide(creq, 40)
        assert req.lora == "lora-x" and [c.id for c in decode] == [pods[0].pod_id]
        creq = router.parser.build(COMPLETIONS, b'{"model": "base-a", "prompt": "hello"}', None)
        _, _, req, _ = await router.decide(creq, 40)
        assert req.lora is None
    finally:
        await srv.close()


async def test_unavailable_servers_of_a_model_give_503_and_configured_models_wait(pods: list[FakeBackend]) -> None:
    a, _b = pods
    router, srv = await start_router(config_for(pods, models=["base-c"]))
    base = f"http://127.0.0.1:{srv.port}"
    try:
        await _known(router, 2)
        router.pool.get(a.pod_id).ejected_until = 1e18  # the only pod with lora-x is out
        async with aiohttp.ClientSession() as s:
            async with s.post(base + "/v1/completions", json={"model": "lora-x", "prompt": "x"}) as r:
                assert r.status == 503 and "Retry-After" in r.headers
            # configured but served by no pod (yet): 503, not 404
            async with s.post(base + "/v1/completions", json={"model": "base-c", "prompt": "x"}) as r:
                assert r.status == 503
            async with s.get(base + "/v1/models") as r:
                ids = [c["id"] for c in (await r.json())["data"]]
        assert ids == ["base-a", "lora-x", "base-b", "base-c"]
    finally:
        await srv.close()


async def test_model_lists_are_refreshed(pods: list[FakeBackend]) -> None:
    a, _b = pods
    router, srv = await start_router(config_for(pods, models=[], pool={"models_interval_s": 0.1}))
    try:
        await _known(router, 2)
        a.served = [("base-a", None), ("lora-y", "base-a")]  # an adapter loaded at run time, one unloaded
        pod = router.pool.get(a.pod_id)
        await wait_until_async(lambda: "lora-y" in pod.served.ids, 10, "the new adapter listed")
        assert "lora-x" not in pod.served.ids and pod.served.adapters == {"lora-y"}
    finally:
        await srv.close()


async def test_pods_without_a_model_list_serve_the_configured_models(pods: list[FakeBackend]) -> None:
    # a pod's own models in the YAML: it is not asked; a pod without /v1/models serves `models`
    cfg = config_for(pods, models=["test-model"])
    cfg.pods[0].models = ["only-this"]
    router, srv = await start_router(cfg)
    try:
        pod_a = router.pool.get(pods[0].pod_id)
        pod_b = router.pool.get(pods[1].pod_id)
        assert router.catalog.serves(pod_a, "only-this") and not router.catalog.serves(pod_a, "base-a")
        assert router.catalog.serves(pod_b, "test-model") and not router.catalog.serves(pod_b, "other")
        await wait_until_async(lambda: pod_b.served is not None, 10, "b's list read")
        assert pod_a.served is None  # never asked
        assert router.catalog.serves(pod_b, "base-b")
    finally:
        await srv.close()


def test_parse_models_takes_only_well_formed_cards() -> None:
    assert parse_models(b"not json") is None
    assert parse_models(b'{"data": 3}') is None
    s = parse_models(b'{"data": [{"id": "m"}, {"id": 3}, {"id": ""}, "x", {"id": "l", "parent": "m"}]}')
    assert s is not None and s.ids == {"m", "l"} and s.adapters == {"l"}
