"""The router's HTTP side against our own in-process backends: routing, streaming, errors, failover."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from router_fakes import FakeBackend, config_for, start_router

from vllm_llmd.testing.engine import free_port
from vllm_llmd.testing.wait import wait_until_async


@pytest.fixture
async def backends() -> AsyncIterator[list[FakeBackend]]:
    bs = [await FakeBackend("a").start(), await FakeBackend("b").start()]
    yield bs
    for b in bs:
        await b.close()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def _prefix(k: int, words: int = 600) -> str:
    return " ".join(f"w{k}x{i}" for i in range(words))


async def test_same_prefix_sticks_and_new_prefixes_spread(backends, client) -> None:
    _router, srv = await start_router(config_for(backends))
    try:
        base = f"http://127.0.0.1:{srv.port}"
        served: dict[int, set[str]] = {}
        for rnd in range(3):
            for k in range(4):
                body = {"model": "test-model", "prompt": _prefix(k) + f" q{rnd}", "max_tokens": 2}
                async with client.post(base + "/v1/completions", json=body) as r:
                    assert r.status == 200
                    served.setdefault(k, set()).add((await r.json())["served_by"])
        # every prefix always went to one pod, and the four prefixes used both pods
        assert all(len(v) == 1 for v in served.values()), served
        assert {next(iter(v)) for v in served.values()} == {"a", "b"}
    finally:
        await srv.close()


async def test_streaming_is_relayed_before_the_backend_finishes(backends, client) -> None:
    gate = asyncio.Event()
    for b in backends:
        b.gate = gate
    _router, srv = await start_router(config_for(backends))
    try:
        body = {"model": "test-model", "prompt": "hello", "max_tokens": 2, "stream": True}
        async with client.post(f"http://127.0.0.1:{srv.port}/v1/completions", json=body) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), timeout=5)
            assert b'"text": "a"' in first  # arrived while the backend is still blocked on the gate
            gate.set()
            rest = await r.content.read()
        assert rest.endswith(b"data: [DONE]\n\n")
    finally:
        await srv.close()


async def test_chat_and_models_and_health(backends, client) -> None:
    _router, srv = await start_router(config_for(backends))
    try:
        base = f"http://127.0.0.1:{srv.port}"
        body = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        async with client.post(base + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
        assert any(b.received and b.received[-1]["messages"][0]["content"] == "hi" for b in backends)
        async with client.get(base + "/v1/models") as r:
            assert (await r.json())["data"][0]["id"] == "test-model"
        async with client.get(base + "/health") as r:
            assert r.status == 200 and (await r.json())["pods_available"] == 2
    finally:
        await srv.close()


async def test_malformed_requests_get_clear_4xx(backends, client) -> None:
    _router, srv = await start_router(config_for(backends, max_body_bytes=4096))
    try:
        url = f"http://127.0.0.1:{srv.port}/v1/completions"
        cases = [
            (b"{not json", 400, "malformed JSON"),
            (b"[1, 2]", 400, "must be an object"),
            (b"", 400, "empty request body"),
            (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404, "nope"),
            (json.dumps({"model": "test-model", "prompt": {"a": 1}}).encode(), 400, "'prompt'"),
            (json.dumps({"model": "test-model", "prompt": "x", "max_tokens": "many"}).encode(), 400, "max_tokens"),
            (json.dumps({"model": "test-model", "prompt": "x" * 10_000}).encode(), 413, "exceeds"),
        ]
        for raw, status, text in cases:
            async with client.post(url, data=raw, headers={"Content-Type": "application/json"}) as r:
                assert r.status == status, (raw[:30], r.status)
                err = (await r.json())["error"]
                assert text in err["message"] and err["code"] == status
        chat = {"model": "test-model", "messages": "hi"}
        async with client.post(f"http://127.0.0.1:{srv.port}/v1/chat/completions", json=chat) as r:
            assert r.status == 400
        assert not any(b.received for b in backends)  # nothing malformed reached a pod
    finally:
        await srv.close()


async def test_client_kv_transfer_params_are_stripped_and_headers_pass(backends, client) -> None:
    _router, srv = await start_router(config_for(backends))
    try:
        body = {
            "model": "test-model",
            "prompt": "x",
            "max_tokens": 1,
            "kv_transfer_params": {"remote_host": "evil", "do_remote_prefill": True},
        }
        headers = {"X-Custom": "kept", "Authorization": "Bearer t"}
        async with client.post(f"http://127.0.0.1:{srv.port}/v1/completions", json=body, headers=headers) as r:
            assert r.status == 200
            assert r.headers["X-Served-By"] in ("a", "b")
        got = next(b for b in backends if b.received)
        assert "kv_transfer_params" not in got.received[0]
        assert got.received[0]["prompt"] == "x"
        assert got.headers[0]["X-Custom"] == "kept" and got.headers[0]["Authorization"] == "Bearer t"
    finally:
        await srv.close()


async def test_retry_on_another_pod_when_connection_refused(backends, client) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = config_for(backends[:1])
    cfg = cfg.model_copy(update={"pods": [cfg.pods[0].model_copy(update={"url": dead}), *cfg.pods]})
    router, srv = await start_router(cfg)
    try:
        url = f"http://127.0.0.1:{srv.port}/v1/completions"
        for i in range(6):
            async with client.post(url, json={"model": "test-model", "prompt": f"p{i}", "max_tokens": 1}) as r:
                assert r.status == 200
        assert len(backends[0].received) == 6  # none lost
        dead_pod = router.pool.pods[0]
        assert dead_pod.ejected_until > 0  # ejected after the refused connection
    finally:
        await srv.close()


async def test_503_with_retry_after_when_no_pod_is_healthy(backends, client, caplog) -> None:
    for b in backends:
        b.healthy = False
    cfg = config_for(backends, pool={"failure_threshold": 1, "health_interval_s": 0.05})
    router, srv = await start_router(cfg)
    try:
        base = f"http://127.0.0.1:{srv.port}"
        await wait_until_async(lambda: not router.pool.available(), 5, "every pod marked unhealthy")
        # the warning says why the last check failed
        assert any("(the last: HTTP 503): marked unhealthy" in r.getMessage() for r in caplog.records)
        async with client.post(base + "/v1/completions", json={"model": "test-model", "prompt": "x"}) as r:
            assert r.status == 503
            assert int(r.headers["Retry-After"]) >= 1
            assert (await r.json())["error"]["type"] == "ServiceUnavailableError"
        async with client.get(base + "/health") as r:
            assert r.status == 503
        for b in backends:
            b.healthy = True
        await wait_until_async(lambda: bool(router.pool.available()), 5, "a pod healthy again")
        async with client.post(base + "/v1/completions", json={"model": "test-model", "prompt": "x"}) as r:
            assert r.status == 200
    finally:
        await srv.close()


async def test_metrics_report_decisions_and_engine_cached_tokens(backends, client) -> None:
    for b in backends:
        b.cached_tokens = 7
    _router, srv = await start_router(config_for(backends))
    try:
        base = f"http://127.0.0.1:{srv.port}"
        for stream in (False, True):
            body = {"model": "test-model", "prompt": "abc", "max_tokens": 2, "stream": stream}
            async with client.post(base + "/v1/completions", json=body) as r:
                await r.read()
        async with client.get(base + "/metrics") as r:
            text = await r.text()
        reported = sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("llmd_router_prefix_reported_hit_tokens_total")
        )
        assert reported == 14
        assert "llmd_router_decision_seconds_bucket" in text
        assert 'llmd_router_scorer_agrees_total{scorer="estimated-ttft"}' in text
    finally:
        await srv.close()


async def test_pod_dying_before_first_byte_is_retried_midstream_is_not(backends, client) -> None:
    router, srv = await start_router(config_for(backends))
    try:
        url = f"http://127.0.0.1:{srv.port}/v1/completions"
        backends[0].die = "before_first_byte"
        for stream in (False, True):
            for i in range(3):
                body = {"model": "test-model", "prompt": f"r{stream}{i}", "max_tokens": 1, "stream": stream}
                async with client.post(url, json=body) as r:
                    assert r.status == 200
                    assert r.headers["X-LLMD-Pod"] == backends[1].pod_id
                    await r.read()
        assert len(backends[1].received) == 6
        # mid-stream: the client has bytes already, so it sees a broken stream and nothing is re-sent
        backends[0].die, backends[1].die = None, "midstream"
        router.pool.pods[0].ejected_until = float("inf")  # force the dying pod
        n0 = len(backends[0].received)
        body = {"model": "test-model", "prompt": "mid", "max_tokens": 1, "stream": True}
        async with client.post(url, json=body) as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
        assert len(backends[0].received) == n0
    finally:
        await srv.close()


async def test_kv_capacity_is_read_once_without_a_scrape_loop(backends) -> None:
    """The default profile scrapes nothing, but its cost model needs each pod's KV capacity: the
    pool reads ``vllm:cache_config_info`` at the first successful health check (and then only every
    ``pool.tier_prices_interval_s``, 5 s, for the tier prices)."""
    backends[0].num_gpu_blocks = 320
    router, srv = await start_router(config_for(backends, pool={"health_interval_s": 0.05}))
    try:
        assert not router.pool.scrape_metrics
        pods = {p.url: p for p in router.pool.pods}
        await wait_until_async(lambda: pods[backends[0].url].capacity_blocks == 320, 10, "capacity read")
        # several health checks later: a backend that reports no capacity was asked once, not every time
        await wait_until_async(lambda: backends[1].health_requests >= 4, 10, "health checks of b")
        assert pods[backends[1].url].capacity_blocks is None  # nothing reported, nothing invented
        assert backends[1].metrics_requests == 1 and backends[0].metrics_requests == 1
    finally:
        await srv.close()
