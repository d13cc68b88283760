"""The router in front of the two real engines: precise routing from KV events, tokenization parity
with vLLM, streaming, malformed input."""

from __future__ import annotations

import json

import aiohttp
import pytest
from router_harness import pod_id, prefix_hits, prose, routed

from vllm_llmd.testing.wait import wait_until_async

pytestmark = pytest.mark.engine


async def _complete(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, dict, str]:
    async with session.post(url, json=body) as r:
        return r.status, await r.json(), r.headers.get("X-LLMD-Pod", "")


async def _wait_indexed(router, keys: list[int], pod: str, min_tokens: int, timeout: float = 60.0) -> None:
    def held() -> bool:
        m = router.index.match_keys(keys).get(pod)
        return m is not None and m.tokens >= min_tokens

    await wait_until_async(held, timeout, f"the index showing {pod} holding {min_tokens} tokens", interval=0.05)


async def test_routes_to_the_pod_holding_the_prefix(engines, test_model_dir) -> None:
    # the speculative memory must not help: only the engines' KV events tell where prefixes are
    async with (
        routed(engines, test_model_dir, index={"speculative_ttl_s": 0}) as (router, base),
        aiohttp.ClientSession() as s,
    ):
        for k, engine in enumerate([engines.a, engines.b, engines.a, engines.b]):
            prefix = prose(100 + k, 700)
            # warm the prefix on one engine directly, behind the router's back
            status, _, _ = await _complete(
                s, engine.url + "/v1/completions", {"model": "test-model", "prompt": prefix + " first", "max_tokens": 1}
            )
            assert status == 200
            toks = router.tokenizer.encode(prefix + " second question")
            keys = router.index.block_keys("test-model", toks)
            await _wait_indexed(router, keys, pod_id(engine), 1024)
            hits_before = prefix_hits(engine)
            second = {"model": "test-model", "prompt": prefix + " second question", "max_tokens": 2}
            status, out, chosen = await _complete(s, base + "/v1/completions", second)
            assert status == 200, out
            assert chosen == pod_id(engine)
            assert out["usage"]["prompt_tokens"] == len(toks)  # the router tokenizes exactly as vLLM does
            assert prefix_hits(engine) - hits_before >= 1024  # and the engine really reused the prefix


async def test_chat_stream_and_token_parity(engines, test_model_dir) -> None:
    async with routed(engines, test_model_dir) as (router, base), aiohttp.ClientSession() as s:
        body = {
            "model": "test-model",
            "messages": [{"role": "system", "content": prose(7, 50)}, {"role": "user", "content": "hello there"}],
            "max_tokens": 4,
        }
        status, out, _ = await _complete(s, base + "/v1/chat/completions", body)
        assert status == 200, out
        assert out["usage"]["prompt_tokens"] == len(router.tokenizer.encode_chat(body))
        chunks = []
        async with s.post(base + "/v1/chat/completions", json={**body, "stream": True}) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            async for line in r.content:
                if line.startswith(b"data: "):
                    chunks.append(line[6:].strip())
        assert chunks[-1] == b"[DONE]"
        assert any(json.loads(c)["choices"][0]["delta"].get("content") for c in chunks[:-1] if json.loads(c)["choices"])
        async with s.get(base + "/v1/models") as r:
            assert (await r.json())["data"][0]["id"] == "test-model"


async def test_malformed_input_against_real_engines(engines, test_model_dir) -> None:
    async with routed(engines, test_model_dir) as (_router, base), aiohttp.ClientSession() as s:
        url = base + "/v1/completions"
        truncated = b'{"model": "test-model", "prompt": '
        async with s.post(url, data=truncated, headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400 and "malformed JSON" in (await r.json())["error"]["message"]
        async with s.post(url, json={"model": "other", "prompt": "x"}) as r:
            assert r.status == 404
        async with s.post(url, json={"model": "test-model", "prompt": 12}) as r:
            assert r.status == 400
        # what only the engine can judge is passed back as the engine said it
        async with s.post(url, json={"model": "test-model", "prompt": "x", "max_tokens": 10**7}) as r:
            assert r.status == 400
            assert "error" in await r.json()
        # and a client cannot steer KV transfers: the field is dropped, the request is served normally
        body = {
            "model": "test-model",
            "prompt": "x y z",
            "max_tokens": 1,
            "kv_transfer_params": {"do_remote_prefill": True, "remote_host": "10.9.9.9"},
        }
        status, out, _ = await _complete(s, url, body)
        assert status == 200, out
        assert out.get("kv_transfer_params") is None
        # nor through vllm_xargs, which vLLM 0.32 copies into SamplingParams.extra_args (issue 9)
        body = {"model": "test-model", "prompt": "x y z", "max_tokens": 1, "vllm_xargs": {"kv_transfer_params": "x"}}
        status, out, _ = await _complete(s, url, body)
        assert status == 200, out
        assert out.get("kv_transfer_params") is None
