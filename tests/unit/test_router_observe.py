"""Observability (issue 14): latency histograms with model and pod labels, no _created series, the
access log, the request id sent to the engine, the KV event subscriber's counters."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest
from router_fakes import FakeBackend, config_for, start_router

from vllm_llmd.index.subscriber import PodStats
from vllm_llmd.router.metrics import RouterMetrics, SubscriberCollector


@pytest.fixture
async def pods() -> AsyncIterator[list[FakeBackend]]:
    bs = [await FakeBackend("a").start(), await FakeBackend("b").start()]
    yield bs
    for b in bs:
        await b.close()


def _samples(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name)]


async def test_histograms_request_id_and_json_access_log(pods, caplog: pytest.LogCaptureFixture) -> None:
    _router, srv = await start_router(config_for(pods, server={"access_log": "json"}))
    base = f"http://127.0.0.1:{srv.port}"
    caplog.set_level(logging.INFO, logger="vllm_llmd.router.access")
    try:
        async with aiohttp.ClientSession() as s:
            body = {"model": "test-model", "prompt": "hello there", "max_tokens": 2, "stream": True}
            gate = asyncio.Event()
            for p in pods:
                p.gate = gate  # the rest of the stream comes after the first chunk has reached us
            async with s.post(base + "/v1/completions", json=body, headers={"X-Request-Id": "req-abc"}) as r:
                assert r.status == 200 and r.headers["X-Request-Id"] == "req-abc"
                pod = r.headers["X-LLMD-Pod"]
                assert (await r.content.readline()).startswith(b"data: ")
                gate.set()
                await r.read()
            async with s.post(base + "/v1/completions", json={**body, "stream": False}) as r:
                rid = r.headers["X-Request-Id"]
                assert len(rid) == 32  # made by the router
            async with s.post(base + "/v1/completions", json={"model": "nope", "prompt": "x"}) as r:
                assert r.status == 404
            async with s.get(base + "/metrics") as r:
                text = await r.text()
        sent = [v for p in pods for h in p.headers for k, v in h.items() if k.lower() == "x-request-id"]
        assert "req-abc" in sent and rid in sent  # what vLLM takes as the request's id
        assert "_created" not in text
        ttft = _samples(text, "llmd_router_time_to_first_token_seconds_count")
        assert ttft == [f'llmd_router_time_to_first_token_seconds_count{{model="test-model",pod="{pod}"}} 1.0']
        itl = _samples(text, "llmd_router_inter_token_latency_seconds_count")
        assert itl and float(itl[0].split()[-1]) >= 1  # a gap between chunks read from the pod
        dur = _samples(text, "llmd_router_request_duration_seconds_count")
        assert sum(float(x.split()[-1]) for x in dur) == 2  # the 404 reached no pod: not observed
        assert all('model="test-model"' in x for x in dur)
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "vllm_llmd.router.access"]
        assert [x["status"] for x in lines] == [200, 200, 404]
        first = lines[0]
        assert first["request_id"] == "req-abc" and first["pod"] == pod and first["stream"] is True
        assert first["ttft_ms"] is not None and first["duration_ms"] >= first["ttft_ms"]
        assert first["model"] == "test-model" and first["path"] == "/v1/completions"
        assert lines[2]["model"] == "" and lines[2]["pod"] == ""
    finally:
        await srv.close()


async def test_text_access_log_and_a_bad_request_id_is_replaced(pods, caplog: pytest.LogCaptureFixture) -> None:
    _router, srv = await start_router(config_for(pods, server={"access_log": "text"}))
    caplog.set_level(logging.INFO, logger="vllm_llmd.router.access")
    try:
        async with aiohttp.ClientSession() as s:
            body = {"model": "test-model", "prompt": "x", "max_tokens": 1}
            url = f"http://127.0.0.1:{srv.port}/v1/completions"
            async with s.post(url, json=body, headers={"x-request-id": "x" * 300}) as r:
                assert r.status == 200 and len(r.headers["X-Request-Id"]) == 32
        sent = [v for p in pods for h in p.headers for k, v in h.items() if k.lower() == "x-request-id"]
        assert len(sent) == 1 and len(sent[0]) == 32  # one header, the router's (the client's was too long)
        (line,) = [r.getMessage() for r in caplog.records if r.name == "vllm_llmd.router.access"]
        assert '"POST /v1/completions" 200 model=test-model' in line
    finally:
        await srv.close()


def test_subscriber_counters_at_scrape_time() -> None:
    from prometheus_client import generate_latest

    class Sub:
        def stats(self) -> dict[str, PodStats]:
            st = PodStats("tcp://x:1", None, connected=True, batches=7, reconnects=2, replays=3, replayed_batches=9)
            st.lag_s = 0.25
            return {"10.0.0.1:8000": st}

    m = RouterMetrics()
    m.registry.register(SubscriberCollector(Sub()))
    text = generate_latest(m.registry).decode()
    assert 'llmd_router_kv_events_reconnects_total{pod="10.0.0.1:8000"} 2.0' in text
    assert 'llmd_router_kv_events_replayed_batches_total{pod="10.0.0.1:8000"} 9.0' in text
    assert 'llmd_router_kv_events_lag_seconds{pod="10.0.0.1:8000"} 0.25' in text
    assert 'llmd_router_kv_events_connected{pod="10.0.0.1:8000"} 1.0' in text
    assert "_created" not in text
