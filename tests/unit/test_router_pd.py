"""P/D orchestration in the router against our own in-process prefill and decode backends."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from router_fakes import FakeBackend, start_router

from vllm_llmd.pd import KVSource, PodCost, SelectiveParams, choose_kv_source
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


def _request_ids(b: FakeBackend) -> list[list[str]]:
    return [[v for k, v in h.items() if k.lower() == "x-request-id"] for h in b.headers]


async def test_both_legs_carry_the_request_id(pd_backends) -> None:
    p, d = pd_backends
    _, srv = await start_router(_cfg(p, d))
    try:
        body = {"model": "test-model", "prompt": "word " * 2000, "max_tokens": 2}
        url = f"http://127.0.0.1:{srv.port}/v1/completions"
        async with aiohttp.ClientSession() as s:
            async with s.post(url, json=body, headers={"X-Request-Id": "client-1"}) as r:
                assert r.status == 200 and r.headers["X-LLMD-Prefill-Pod"] == p.pod_id
                assert r.headers["X-Request-Id"] == "client-1"
            body["prompt"] = "other " * 2000  # not yet on the decode pod: disaggregated again
            async with s.post(url, json=body) as r:  # no id from the client: the router's, on both legs
                assert r.status == 200 and r.headers["X-LLMD-Prefill-Pod"] == p.pod_id
                made = r.headers["X-Request-Id"]
        assert len(made) == 32
        # exactly one X-Request-Id per leg, the same on the prefill and the decode leg (as llm-d's sidecar)
        assert _request_ids(p) == [["client-1"], [made]]
        assert _request_ids(d) == [["client-1"], [made]]
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


# ---- selective P/D among colocated (role: both) pods ---------------------------------------------


def test_selective_pd_never_disaggregates_a_short_uncached_part() -> None:
    p = SelectiveParams(threshold_tokens=256)
    d = PodCost("d", uncached_tokens=200)
    assert choose_kv_source(2112, d, [PodCost("q", 0)], p) is None


def test_selective_pd_pulls_from_the_idle_peer_that_holds_the_prefix() -> None:
    p = SelectiveParams(threshold_tokens=256, transfer_token_weight=0.05, leg_overhead_tokens=128)
    d = PodCost("d", uncached_tokens=2112, queued_prefill_tokens=500)
    src = choose_kv_source(2112, d, [PodCost("q", uncached_tokens=64)], p)
    assert src is not None and src.pod == "q"
    assert src.local_cost == 2612
    assert src.remote_cost == pytest.approx(64 + 0.05 * 2112 + 128)


def test_selective_pd_declines_when_the_peer_is_busier_than_recomputing() -> None:
    p = SelectiveParams(threshold_tokens=256)
    d = PodCost("d", uncached_tokens=2112)
    # the peer holds the prefix but has 4096 tokens of prefill queued: recomputing locally is sooner
    assert choose_kv_source(2112, d, [PodCost("q", 64, queued_prefill_tokens=4096)], p) is None


def test_selective_pd_requires_a_real_saving_not_just_a_less_loaded_peer() -> None:
    p = SelectiveParams(threshold_tokens=256)
    d = PodCost("d", uncached_tokens=2112, queued_prefill_tokens=8000)
    # an idle peer that holds nothing more than d would only move the compute: not P/D's job
    assert choose_kv_source(2112, d, [PodCost("q", 2000)], p) is None


def test_selective_pd_picks_the_cheapest_of_several_sources_and_skips_itself() -> None:
    p = SelectiveParams(threshold_tokens=256)
    d = PodCost("d", uncached_tokens=4000, queued_prefill_tokens=1000)
    peers = [PodCost("d", 0), PodCost("a", 0, queued_prefill_tokens=900), PodCost("b", 100, queued_prefill_tokens=100)]
    src = choose_kv_source(4096, d, peers, p)
    assert src is not None and src.pod == "b"


def test_selective_pd_divides_by_prefill_speed() -> None:
    p = SelectiveParams(threshold_tokens=256, transfer_token_weight=0.0, leg_overhead_tokens=0)
    d = PodCost("d", uncached_tokens=2000, prefill_speed=4.0)  # local: 500
    slow = PodCost("q", 0, queued_prefill_tokens=1200, prefill_speed=2.0)  # remote: 600
    assert choose_kv_source(2000, d, [slow], p) is None
    fast = PodCost("q", 0, queued_prefill_tokens=1200, prefill_speed=3.0)  # remote: 400
    assert choose_kv_source(2000, d, [fast], p) == KVSource("q", 400.0, 500.0)


def test_selective_pd_rejects_bad_numbers() -> None:
    with pytest.raises(ValueError):
        SelectiveParams(threshold_tokens=-1)
    with pytest.raises(ValueError):
        choose_kv_source(-1, PodCost("d", 0), [], SelectiveParams())
    with pytest.raises(ValueError):
        choose_kv_source(10, PodCost("d", 1000, prefill_speed=0), [PodCost("q", 0)], SelectiveParams())


@settings(max_examples=300, deadline=None)
@given(
    prompt=st.integers(0, 8192),
    cached=st.tuples(st.integers(0, 8192), st.integers(0, 8192)),
    queued=st.tuples(st.integers(0, 20000), st.integers(0, 20000)),
    decode=st.tuples(st.integers(0, 2000), st.integers(0, 2000)),
    prefill_weight=st.floats(1.0, 4.0),
)
def test_selective_pd_never_fires_when_the_decode_pod_won_on_the_same_ttft_cost(
    prompt: int, cached: tuple[int, int], queued: tuple[int, int], decode: tuple[int, int], prefill_weight: float
) -> None:
    """docs/plugins/selective-pd.md: with equal prefill speeds, a decode pod chosen by the
    ``estimated-ttft`` cost with ``prefill_weight`` >= 1 is never worth bypassing - the holder's own
    queue already decided against it. (The decider can only help when the pod was chosen otherwise.)"""
    p = SelectiveParams()
    pods = [
        PodCost(name, max(0, prompt - c), q, dt)
        for name, c, q, dt in zip(("a", "b"), cached, queued, decode, strict=True)
    ]

    def ttft(c: PodCost) -> float:  # the estimated-ttft scorer's cost (docs/plugins/estimated-ttft.md)
        return (
            prefill_weight * c.uncached_tokens
            + c.queued_prefill_tokens
            + p.decode_token_weight * c.queued_decode_tokens
        )

    d, q = sorted(pods, key=ttft)
    assert choose_kv_source(prompt, d, [q], p) is None


def _peer_cfg(a: FakeBackend, b: FakeBackend, *, peers: bool, session_weight: float) -> RouterConfig:
    scorers = [{"type": "estimated-ttft"}]
    if session_weight:
        scorers.append({"type": "session-affinity", "weight": session_weight})
    return RouterConfig.model_validate(
        {
            "models": ["test-model"],
            "pods": [{"url": a.url}, {"url": b.url}],
            "profile": {"scorers": scorers},
            "pd": {"threshold_tokens": 256, "peers": peers},
        }
    )


async def _post(port: int, body: dict, session: str | None = None) -> aiohttp.ClientResponse:
    headers = {"x-session-id": session} if session else {}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"http://127.0.0.1:{port}/v1/completions", json=body, headers=headers) as r,
    ):
        await r.read()
        return r


@pytest.mark.parametrize("peers", [True, False])
async def test_peer_pd_pulls_the_prefix_from_the_pod_that_holds_it(pd_backends, peers: bool) -> None:
    a, b = pd_backends  # both role "both" here
    router, srv = await start_router(_peer_cfg(a, b, peers=peers, session_weight=10.0))
    try:
        # 1) a short request opens session "s" on the first pod; 2) a long prompt goes to the other
        # pod (tie -> the pod picked longest ago), which now holds its prefix in the routing memory
        r1 = await _post(srv.port, {"model": "test-model", "prompt": "hi", "max_tokens": 1}, session="s")
        long_prompt = "word " * 2000
        r2 = await _post(srv.port, {"model": "test-model", "prompt": long_prompt, "max_tokens": 1})
        decode_pod, holder = r1.headers["X-LLMD-Pod"], r2.headers["X-LLMD-Pod"]
        assert decode_pod != holder
        # 3) the same prompt in session "s": the profile picks the session's pod (no prefix there)
        r3 = await _post(srv.port, {"model": "test-model", "prompt": long_prompt, "max_tokens": 3}, session="s")
        assert r3.status == 200 and r3.headers["X-LLMD-Pod"] == decode_pod
        backends = {x.pod_id: x for x in (a, b)}
        dec = backends[decode_pod].received[-1]
        if peers:
            assert r3.headers["X-LLMD-Prefill-Pod"] == holder
            leg = backends[holder].received[-1]
            assert leg["max_tokens"] == 1 and leg["kv_transfer_params"]["do_remote_decode"] is True
            assert dec["max_tokens"] == 3
            assert dec["kv_transfer_params"]["remote_engine_id"] == f"engine-{backends[holder].name}"
        else:
            assert "X-LLMD-Prefill-Pod" not in r3.headers and "kv_transfer_params" not in dec
            assert len(backends[holder].received) == 1
        disagg = router.metrics.pd_requests.labels("disaggregated")._value.get()
        assert disagg == (1 if peers else 0)
    finally:
        await srv.close()


async def test_peer_pd_stays_colocated_when_the_profile_already_picks_the_holder(pd_backends) -> None:
    a, b = pd_backends
    router, srv = await start_router(_peer_cfg(a, b, peers=True, session_weight=0))
    try:
        long_prompt = "word " * 2000
        first = await _post(srv.port, {"model": "test-model", "prompt": long_prompt, "max_tokens": 1})
        again = await _post(srv.port, {"model": "test-model", "prompt": long_prompt + "more", "max_tokens": 1})
        assert again.headers["X-LLMD-Pod"] == first.headers["X-LLMD-Pod"]
        assert "X-LLMD-Prefill-Pod" not in again.headers
        assert not any("kv_transfer_params" in body for x in (a, b) for body in x.received)
        assert router.metrics.pd_requests.labels("aggregated")._value.get() == 2
    finally:
        await srv.close()
