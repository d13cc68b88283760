"""Every OpenAI / vLLM endpoint passes through (issue 14): routed by its prompt where it has one,
to a healthy pod serving its model otherwise; operator endpoints and unknown paths are JSON 404s."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from router_fakes import FakeBackend, config_for, start_router

from vllm_llmd.router.endpoints import POST_ENDPOINTS

LONG = " ".join(f"word{i}" for i in range(400))

BODIES = {
    "/v1/embeddings": {"model": "test-model", "input": LONG},
    "/v2/embed": {"model": "test-model", "input": [LONG, "b"]},
    "/pooling": {"model": "test-model", "messages": [{"role": "user", "content": LONG}]},
    "/classify": {"model": "test-model", "input": [[1, 2, 3] * 100]},
    "/score": {"model": "test-model", "text_1": LONG, "text_2": ["x", "y"]},
    "/v1/score": {"model": "test-model", "queries": [LONG], "documents": ["x"]},
    "/rerank": {"model": "test-model", "query": LONG, "documents": ["x", "y"]},
    "/v1/rerank": {"model": "test-model", "query": LONG, "documents": ["x"]},
    "/v2/rerank": {"model": "test-model", "query": LONG, "documents": ["x"]},
    "/v1/responses": {
        "model": "test-model",
        "instructions": "be brief",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": LONG}]}],
        "max_output_tokens": 5,
    },
    "/v1/messages": {"model": "test-model", "max_tokens": 5, "messages": [{"role": "user", "content": LONG}]},
    "/v1/messages/count_tokens": {"model": "test-model", "messages": [{"role": "user", "content": LONG}]},
    "/tokenize": {"model": "test-model", "prompt": LONG},
    "/detokenize": {"model": "test-model", "tokens": [1, 2, 3]},
    "/v1/chat/completions/render": {"model": "test-model", "messages": [{"role": "user", "content": LONG}]},
    "/v1/completions/render": {"model": "test-model", "prompt": LONG},
    "/v1/responses/render": {"model": "test-model", "input": LONG},
}


@pytest.fixture
async def pods() -> AsyncIterator[list[FakeBackend]]:
    bs = [await FakeBackend("a").start(), await FakeBackend("b").start()]
    yield bs
    for b in bs:
        await b.close()


async def test_every_endpoint_is_forwarded_and_routed_by_its_prompt(pods: list[FakeBackend]) -> None:
    router, srv = await start_router(config_for(pods))
    base = f"http://127.0.0.1:{srv.port}"
    json_paths = [
        p
        for p, e in POST_ENDPOINTS.items()
        if e.prompt != "raw" and p not in ("/v1/completions", "/v1/chat/completions")
    ]
    assert sorted(json_paths) == sorted(BODIES)  # every endpoint of the table is tried here
    try:
        async with aiohttp.ClientSession() as s:
            for path, body in BODIES.items():
                before = sum(router.metrics.prompt_tokens.labels(p.pod_id)._value.get() for p in pods)
                async with s.post(base + path, json=body) as r:
                    out = await r.json()
                    assert r.status == 200 and out["path"] == path, (path, out)
                    assert r.headers["X-LLMD-Pod"] == next(p for p in pods if p.name == out["served_by"]).pod_id
                routed = sum(router.metrics.prompt_tokens.labels(p.pod_id)._value.get() for p in pods) - before
                if path != "/detokenize":  # routed by its prompt: hundreds of tokens (4 characters a token)
                    assert routed >= 300, (path, routed)
            # the same prompt sticks to one pod (routing memory), whichever endpoint carries it
            seen = set()
            for _ in range(3):
                async with s.post(base + "/v1/embeddings", json=BODIES["/v1/embeddings"]) as r:
                    seen.add(r.headers["X-LLMD-Pod"])
            assert len(seen) == 1
            calls = [c for p in pods for c in p.other_calls if c[1] == "/v1/responses"]
            assert calls and calls[0][2] == "application/json"
    finally:
        await srv.close()


async def test_multipart_passes_as_it_came_and_get_version(pods: list[FakeBackend]) -> None:
    _router, srv = await start_router(config_for(pods))
    base = f"http://127.0.0.1:{srv.port}"
    try:
        async with aiohttp.ClientSession() as s:
            form = aiohttp.FormData()
            form.add_field("model", "test-model")
            form.add_field("file", b"RIFF....WAVE", filename="a.wav", content_type="audio/wav")
            async with s.post(base + "/v1/audio/transcriptions", data=form) as r:
                assert r.status == 200 and (await r.json())["path"] == "/v1/audio/transcriptions"
            call = next(c for p in pods for c in p.other_calls if c[1] == "/v1/audio/transcriptions")
            assert call[2] == "multipart/form-data" and b"RIFF....WAVE" in call[3]
            async with s.get(base + "/version") as r:
                assert r.status == 200 and (await r.json())["path"] == "/version"
    finally:
        await srv.close()


async def test_operator_endpoints_and_unknown_paths_are_json_404s(pods: list[FakeBackend]) -> None:
    _router, srv = await start_router(config_for(pods))
    base = f"http://127.0.0.1:{srv.port}"
    try:
        async with aiohttp.ClientSession() as s:
            for path in ("/sleep", "/reset_prefix_cache", "/collective_rpc", "/v1/load_lora_adapter", "/v1/nothing"):
                async with s.post(base + path, json={}) as r:
                    assert r.status == 404
                    err = (await r.json())["error"]
                    assert err["type"] == "NotFoundError" and err["code"] == 404
            async with s.post(base + "/v1/embeddings", json={"model": "test-model", "input": 5}) as r:
                assert r.status == 400 and "'input'" in (await r.json())["error"]["message"]
        assert not any(p.other_calls for p in pods)
    finally:
        await srv.close()


async def test_a_stray_messages_field_does_not_make_a_completion_a_chat(pods: list[FakeBackend]) -> None:
    _router, srv = await start_router(config_for(pods))
    try:
        async with aiohttp.ClientSession() as s:
            body = {"model": "test-model", "prompt": "x", "messages": "not a list", "max_tokens": 1}
            async with s.post(f"http://127.0.0.1:{srv.port}/v1/completions", json=body) as r:
                assert r.status == 200  # the engine judges its own fields
            body = {"model": "test-model", "messages": "not a list"}
            async with s.post(f"http://127.0.0.1:{srv.port}/tokenize", json=body) as r:
                assert r.status == 400  # /tokenize takes messages: they must be a conversation
    finally:
        await srv.close()
