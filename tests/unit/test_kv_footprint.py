"""The router's per-pod KV footprint (vllm_llmd.router.scheduling.footprint) and how the default
``estimated-ttft`` cost uses it: cold prefixes balanced by footprint, capacity overflow, cache clears."""

from __future__ import annotations

import pytest
from test_router_scheduling import _ctx, _pods, _req, _tokens

from vllm_llmd.index import KVBlockIndex
from vllm_llmd.router.config import ProfileConfig
from vllm_llmd.router.scheduling import build_scheduler
from vllm_llmd.router.scheduling.footprint import KVFootprint
from vllm_llmd.wire.kv_events import AllBlocksCleared, encode_batch, seq_to_bytes


def test_footprint_counts_distinct_blocks_and_hot_blocks_in_the_window() -> None:
    fp = KVFootprint(window=3)
    fp.record("a", [1, 2, 3])
    fp.record("a", [1, 2, 4])  # 1 and 2 used twice: hot
    fp.record("b", [9])
    assert fp.blocks("a") == 4 and fp.hot_blocks("a") == 2 and fp.blocks("b") == 1
    fp.record("b", [9])  # decision 4: a's first decision (3) leaves the window, 1 and 2 stay (seen at 2)
    assert fp.blocks("a") == 3 and fp.hot_blocks("a") == 2
    fp.record("b", [8])
    fp.record("b", [8])  # a's last decision is now 3 decisions old: all of a is gone
    assert fp.blocks("a") == 0 and fp.hot_blocks("a") == 0
    assert fp.blocks("b") == 2 and fp.hot_blocks("b") == 2
    fp.forget("b")
    assert fp.blocks("b") == 0 and fp.hot_blocks("b") == 0
    with pytest.raises(ValueError):
        KVFootprint(window=0)


def test_footprint_excess_is_relative_to_the_fair_share() -> None:
    fp = KVFootprint(window=100)
    assert fp.excess({"a": 0.5, "b": 0.5}) == {"a": 0.0, "b": 0.0}
    fp.record("a", list(range(30)))
    fp.record("b", list(range(100, 110)))
    ex = fp.excess({"a": 0.5, "b": 0.5})
    assert ex["a"] == pytest.approx(30 / 40 / 0.5 - 1) and ex["b"] == 0.0
    # a pod three times as fast should carry three quarters of the footprint: 30 of 40 is fair
    assert fp.excess({"a": 0.75, "b": 0.25})["a"] == pytest.approx(0.0)
    # the pool counted as at least 80 blocks: a's fair half is 40, its 30 are under it
    assert fp.excess({"a": 0.5, "b": 0.5}, min_total=80) == {"a": 0.0, "b": 0.0}
    assert fp.excess({"a": 0.5, "b": 0.5}, min_total=50)["a"] == pytest.approx(30 / 25 - 1)


def _sched(params: dict | None = None, index: KVBlockIndex | None = None):
    ctx = _ctx(index)
    prof = ProfileConfig.model_validate({"scorers": [{"type": "estimated-ttft", "params": params or {}}]})
    return ctx, build_scheduler(prof, ctx)


def _place(ctx, sched, pods, pod: str, prefix: int) -> None:
    """Route one request of ``prefix`` and check it went to ``pod`` (the setup of a scenario)."""
    assert sched.schedule(_req(ctx, _tokens(prefix, 0)), pods).chosen.id == pod


def test_cold_prefix_goes_to_the_pod_with_the_smaller_footprint_despite_a_slightly_longer_queue() -> None:
    def run(balance_weight: float) -> str:
        ctx, sched = _sched({"balance_weight": balance_weight})
        pods = _pods(ctx)
        # p0 takes three prefixes, p1 one (forced by queues, released again afterwards)
        for k, pod in enumerate(["p0", "p0", "p0", "p1"]):
            other = "p1" if pod == "p0" else "p0"
            t = ctx.inflight.start(other, 100_000, 0)
            _place(ctx, sched, pods, pod, k)
            ctx.inflight.done(t)
        # p1 is a little busier right now (half a prompt queued): by queue alone p0 would win
        ctx.inflight.start("p1", 1000, 0)
        return sched.schedule(_req(ctx, _tokens(50, 0)), pods).chosen.id

    assert run(0.0) == "p0"
    assert run(8.0) == "p1"


def test_a_nearly_empty_pool_places_new_prefixes_by_queue_and_speed() -> None:
    """Four pods, one holding one prompt: with the pool's footprint counted as it is, that pod's
    share is all of it (excess 3: its new KV costs 9x) and the next cold prefix goes to a busier
    pod; with the default floor (two prompts per pod) there are no shares yet, and the idle pod
    wins (the simulated 20-pod fleet sent cold prefixes to idle slow pods this way)."""

    def run(params: dict) -> str:
        ctx, sched = _sched(params)
        pods = _pods(ctx, n=4)
        busy = [ctx.inflight.start(f"p{i}", 100_000, 0) for i in (1, 2, 3)]
        _place(ctx, sched, pods, "p0", 0)
        for t in busy:
            ctx.inflight.done(t)
        for i in (1, 2, 3):  # the others are a little busy now (a third of a prompt each)
            ctx.inflight.start(f"p{i}", 700, 0)
        return sched.schedule(_req(ctx, _tokens(50, 0)), pods).chosen.id

    assert run({"balance_min_prompts": 0.0}) != "p0"
    assert run({}) == "p0"


def test_balance_leaves_hot_requests_on_their_pod() -> None:
    ctx, sched = _sched()
    pods = _pods(ctx)
    for k in range(3):  # p0 holds three prefixes, far over its share
        t = ctx.inflight.start("p1", 100_000, 0)
        _place(ctx, sched, pods, "p0", k)
        ctx.inflight.done(t)
    assert sched.schedule(_req(ctx, _tokens(1, 7)), pods).chosen.id == "p0"


def test_capacity_overflow_sends_new_prefixes_elsewhere() -> None:
    ctx, sched = _sched({"balance_weight": 0.0})
    pods = _pods(ctx)
    pods[0].capacity_blocks = 80  # room for two 33-block prompts at capacity_fraction 0.9 (72 blocks)
    pods[1].capacity_blocks = 10_000
    for k in range(2):  # two hot prefixes on p0 (each routed twice: hot)
        for s in range(2):
            t = ctx.inflight.start("p1", 100_000, 0)
            assert sched.schedule(_req(ctx, _tokens(k, s)), pods).chosen.id == "p0"
            ctx.inflight.done(t)
    ctx.inflight.start("p1", 3000, 0)  # p1 is busier: without capacity p0 would take the new prefix
    assert sched.schedule(_req(ctx, _tokens(9, 0)), pods).chosen.id == "p1"
    ctx2, sched2 = _sched({"balance_weight": 0.0, "capacity_weight": 0.0})
    pods2 = _pods(ctx2)
    pods2[0].capacity_blocks = 80
    for k in range(2):
        for s in range(2):
            t = ctx2.inflight.start("p1", 100_000, 0)
            sched2.schedule(_req(ctx2, _tokens(k, s)), pods2)
            ctx2.inflight.done(t)
    ctx2.inflight.start("p1", 3000, 0)
    assert sched2.schedule(_req(ctx2, _tokens(9, 0)), pods2).chosen.id == "p0"


def test_a_hit_on_a_pod_over_its_capacity_pays_only_its_own_new_blocks() -> None:
    """overflow is at most the request's own uncached blocks: a pod whose hot footprint is already
    over its capacity charges a new prefix for every block it adds, but a request whose prefix it
    holds adds (almost) none, so it stays there. (Charging every request the pod's whole excess sent
    hits both pods held, and idle-pod peer loads, to whichever pod had the smaller footprint:
    bench/RESULTS.md "Issue 12 peer loads on long-context RAG".)"""
    ctx, sched = _sched({"balance_weight": 0.0})
    pods = _pods(ctx)
    pods[0].capacity_blocks = 40  # 36 blocks of room; three hot 33-block prompts put it ~63 over
    pods[1].capacity_blocks = 10_000
    for k in range(3):
        for s in range(2):
            t = ctx.inflight.start("p1", 100_000, 0)
            assert sched.schedule(_req(ctx, _tokens(k, s)), pods).chosen.id == "p0"
            ctx.inflight.done(t)
    ctx.inflight.start("p1", 1000, 0)  # p1 a little busy: half a prompt
    # a hit on p0 adds one block (the suffix): 2 * 64 * 1 tokens, not 2 * 64 * 64
    assert sched.schedule(_req(ctx, _tokens(1, 5)), pods).chosen.id == "p0"
    assert sched.schedule(_req(ctx, _tokens(2, 6)), pods).chosen.id == "p0"
    # a new prefix on p0 is charged all of its 34 blocks (p1, with room, wins it)
    assert sched.schedule(_req(ctx, _tokens(9, 0)), pods).chosen.id == "p1"


def test_a_cleared_cache_clears_the_pods_footprint() -> None:
    index = KVBlockIndex(block_size=64, capacity_blocks=100_000)
    # the footprint as it is (no floor): p1's one prompt is then its whole pool's share
    ctx, sched = _sched({"balance_min_prompts": 0.0}, index=index)
    pods = _pods(ctx, events=True)
    for k in range(3):
        t = ctx.inflight.start("p1", 100_000, 0)
        _place(ctx, sched, pods, "p0", k)
        ctx.inflight.done(t)
    ctx.inflight.start("p0", 1000, 0)
    # p0's footprint is three prompts, p1's nothing: a cold prefix goes to p1 although p0's queue
    # is shorter
    assert sched.schedule(_req(ctx, _tokens(40, 0)), pods).chosen.id == "p1"
    # p0 reports that its cache was cleared: its footprint restarts from nothing, p1 now holds all
    # of the footprint, and the next cold prefix goes to p0 despite its queue
    index.ingest("p0", [b"kv@p0@m", seq_to_bytes(1), encode_batch([AllBlocksCleared()])])
    assert index.epoch("p0") == 1 and index.epoch("p1") == 0
    assert sched.schedule(_req(ctx, _tokens(41, 0)), pods).chosen.id == "p0"
