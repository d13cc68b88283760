"""What a peer load's copy evicts on the reader (vllm_llmd.pd.evict, docs/peer-loading.md "Router
price"): the fleet's last copy costs its re-prefill, a block held elsewhere nothing. Stand-in pods
over a KV-event index fed with real event batches."""

from __future__ import annotations

import pytest
from router_fakes import store_blocks as _store
from test_router_peer import HOLDER, _exposition
from test_tier_prices import BS, _ctx, _pods, _req, _tokens

from vllm_llmd.index import KVBlockIndex
from vllm_llmd.pd.evict import Eviction, duplicate_price, eviction_price
from vllm_llmd.pd.load import TokenPrices
from vllm_llmd.router.config import ProfileConfig
from vllm_llmd.router.pod_metrics import parse_metrics
from vllm_llmd.router.scheduling import build_scheduler
from vllm_llmd.router.scheduling.estimated_ttft import EstimatedTTFTParams, PeerPlans, TTFTCosts
from vllm_llmd.router.scheduling.footprint import LastUse

DOC_A, DOC_B, DOC_C = (_tokens(k, n=2048, tail=64) for k in (1, 2, 3))  # 33 blocks each


def test_the_price_counts_last_copies_among_the_blocks_the_lru_drops() -> None:
    # room for everything: nothing is read from the order
    assert eviction_price(10, 10, iter(()), 64) == Eviction()
    # 4 new blocks, 1 free: the 3 least recently used go; two of them are last copies
    lru = iter([False, True, False, False, False])
    assert eviction_price(4, 1, lru, 64) == Eviction(2 * 64.0, 3, 2, 0)
    assert next(lru) is False  # only the first k were read
    # a full pod (negative room counts as none); the order names fewer blocks than go: unseen, free
    assert eviction_price(5, -7, [False, True], 64, weight=0.5) == Eviction(0.5 * 64, 5, 1, 3)
    assert eviction_price(5, 0, [False] * 5, 64, weight=0.0) == Eviction(0.0, 5)


def test_last_use_orders_by_routing_and_the_walk_drops_what_the_pod_lost() -> None:
    index = KVBlockIndex(block_size=BS, capacity_blocks=100_000)
    _store(index, "p1", DOC_A, 1)
    _store(index, "p1", DOC_B, 2)
    _store(index, "p0", DOC_B, 1)
    a, b, c = (index.block_keys("m", d) for d in (DOC_A, DOC_B, DOC_C))
    lu = LastUse()
    lu.touch("p1", c)  # routed to p1 but the index never saw it there (evicted, or never stored)
    lu.touch("p1", b)
    lu.touch("p1", a)
    lu.touch("p1", b)  # b used again: a is now the least recently used of what p1 holds
    assert lu.oldest("p1") == c + a + b
    walk = lu.walk("p1", index, set())
    got = [next(walk) for _ in range(34)]
    walk.close()
    assert got == [False] * 33 + [True]  # a: only p1 holds it; b: p0 too
    assert lu.oldest("p1") == a + b  # c's keys, passed over, are gone
    assert index.blocks_held("p1") == 66 and index.sharing("p0", [a[0], b[0]]) == [0, 2]
    lu.touch("p1", c, limit=40)
    assert lu.oldest("p1") == b[-7:] + c


def _world(peer_loads: bool = True, shared: bool = False, evict_weight: float | None = None):
    """p1 (idle, full: capacity 66 blocks holding documents A and B, A least recently used) may load
    document C from p0, which holds it in its DRAM tier and has 2,000 prefill tokens queued."""
    index = KVBlockIndex(block_size=BS, capacity_blocks=100_000)
    ctx = _ctx(index)
    params: dict = {"peer_loads": peer_loads}
    if evict_weight is not None:
        params["evict_weight"] = evict_weight
    prof = {"scorers": [{"type": "estimated-ttft", "params": params}]}
    sched = build_scheduler(ProfileConfig.model_validate(prof), ctx)
    pods = _pods(ctx, [TokenPrices()] * 2)
    pods[0].metrics = parse_metrics(_exposition(0, 0))  # p0 serves peer loads
    pods[0].capacity_blocks, pods[1].capacity_blocks = 10_000, 66
    for seq, doc in ((1, DOC_A), (2, DOC_B)):
        _store(index, "p1", doc, seq)
        sched.pre_request(_req(index, doc), "p1")  # routed there earlier: A, then B
    _store(index, "p0", DOC_C, 1, "CPU")
    if shared:
        _store(index, "p0", DOC_A, 2, "CPU")  # p0 holds A as well: evicting it from p1 loses nothing
    ctx.inflight.start("p0", 2000, 0)
    req = _req(index, DOC_C)
    return sched.schedule(req, pods), req


def test_a_load_that_would_evict_the_fleets_last_copy_loses_to_queueing_on_the_holder() -> None:
    d, req = _world()
    costs = req.outputs.get(TTFTCosts).costs
    assert d.chosen.id == "p0"
    # p1's plan still names the load (the cheaper way to serve there), charged A's 33 blocks
    assert req.outputs.get(PeerPlans).plans["p1"].peer == HOLDER
    loaded = _world(evict_weight=0.0)[1].outputs.get(TTFTCosts).costs["p1"]
    assert costs["p1"] == pytest.approx(loaded + 33 * BS)


def test_the_same_load_wins_when_what_it_evicts_is_held_elsewhere() -> None:
    d, req = _world(shared=True)
    assert d.chosen.id == "p1" and req.outputs.get(PeerPlans).plans["p1"].peer == HOLDER
    # and, without the eviction price, the last-copy world loads too (the price is what moved it)
    assert _world(evict_weight=0.0)[0].chosen.id == "p1"


def test_without_peer_loads_the_costs_are_the_formula_as_before() -> None:
    d, req = _world(peer_loads=False)
    # p0: its DRAM hit (all 33 blocks) at the default price 0.1, times prefill_weight, plus its
    # queue; p1: the whole prompt times prefill_weight, no capacity charge (A and B routed once
    # each: not hot)
    pw = EstimatedTTFTParams().prefill_weight
    assert req.outputs.get(TTFTCosts).costs == pytest.approx({"p0": pw * 0.1 * 2112 + 2000, "p1": pw * 2112})
    assert req.outputs.get(PeerPlans) is None and d.chosen.id == "p0"


def test_only_a_full_readers_load_plan_walks_and_only_as_far_as_its_victims() -> None:
    """The hot loop stays cheap: a pod with room computes no victims, and a full one reads its
    least recently used blocks only until it has named the ones the load pushes out."""
    index = KVBlockIndex(block_size=BS, capacity_blocks=100_000)
    asked: list[int] = []
    sharing = index.sharing

    def counting(pod: str, keys: list[int]) -> list[int]:
        asked.append(len(keys))
        return sharing(pod, keys)

    index.sharing = counting  # type: ignore[method-assign]
    ctx = _ctx(index)
    prof = {"scorers": [{"type": "estimated-ttft", "params": {"peer_loads": True}}]}
    sched = build_scheduler(ProfileConfig.model_validate(prof), ctx)
    pods = _pods(ctx, [TokenPrices()] * 2)
    pods[0].metrics = parse_metrics(_exposition(0, 0))
    pods[0].capacity_blocks, pods[1].capacity_blocks = 10_000, 1_000  # p1 has room
    for seq, doc in ((1, DOC_A), (2, DOC_B)):
        _store(index, "p1", doc, seq)
        sched.pre_request(_req(index, doc), "p1")
    _store(index, "p0", DOC_C, 1, "CPU")
    sched.schedule(_req(index, DOC_C), pods)
    assert asked == []
    pods[1].capacity_blocks = 66  # full: 33 victims, read in chunks of 64 keys from the oldest
    sched.schedule(_req(index, DOC_C), pods)
    assert asked == [64]


# ---- the fleet's duplicate budget -----------------------------------------------------------------
def test_the_duplicate_price_counts_copies_beyond_the_room_the_hot_set_leaves() -> None:
    # fleet of 200 blocks, hot set 120: room for 80 duplicates; 50 already, a load of 20 fits
    assert duplicate_price(20, 50, 200, 120, 64) == 0.0
    # 40 more: 10 over the budget, each a hot block's last copy pushed out somewhere
    assert duplicate_price(40, 50, 200, 120, 64) == 10 * 64.0
    # far over: never more than the load's own blocks; weight scales, 0 switches it off
    assert duplicate_price(30, 500, 200, 190, 64, weight=0.5) == 0.5 * 30 * 64
    assert duplicate_price(30, 500, 200, 190, 64, weight=0.0) == 0.0
    assert duplicate_price(0, 500, 200, 190, 64) == 0.0


def test_the_fleets_hot_set_is_what_was_routed_twice_among_its_capacity_of_recent_keys() -> None:
    lu = LastUse()
    lu.fleet_limit = 5
    lu.touch("p0", [1, 2, 3])
    lu.touch("p1", [1, 2])  # 1 and 2 routed twice, to different pods: hot
    assert lu.fleet_hot() == 2
    lu.touch("p0", [1])  # a third time: still one key
    assert lu.fleet_hot() == 2
    lu.touch("p1", [7, 8])  # five distinct keys: nothing leaves yet
    assert lu.fleet_hot() == 2
    lu.touch("p1", [9])  # the least recently routed (3) goes: it was routed once
    assert lu.fleet_hot() == 2
    lu.touch("p0", [10])  # 2 goes (1 was routed after it): 2 was hot
    assert lu.fleet_hot() == 1
    lu.forget("p0")  # a pod's cleared cache does not change what the fleet was asked for
    assert lu.fleet_hot() == 1


DOCS_ELSEWHERE = [_tokens(k, n=2048, tail=64) for k in range(4, 10)]


def _dup_world(elsewhere: int, evict_weight: float | None = None):
    """p1 (idle, room for C) may load document C from p0 (2,000 prefill tokens queued, C in its DRAM
    tier). The fleet has 300 blocks (p0 100, p1 200). Both pods hold A and B (66 duplicate blocks);
    A, B and ``elsewhere`` documents the index no longer holds anywhere were each routed once to
    each pod: the fleet's hot set is 33 blocks per document (no pod's own footprint is hot)."""
    index = KVBlockIndex(block_size=BS, capacity_blocks=100_000)
    ctx = _ctx(index)
    params: dict = {"peer_loads": True}
    if evict_weight is not None:
        params["evict_weight"] = evict_weight
    sched = build_scheduler(
        ProfileConfig.model_validate({"scorers": [{"type": "estimated-ttft", "params": params}]}), ctx
    )
    pods = _pods(ctx, [TokenPrices()] * 2)
    pods[0].metrics = parse_metrics(_exposition(0, 0))
    pods[0].capacity_blocks, pods[1].capacity_blocks = 100, 200
    seq = 0
    for doc in (DOC_A, DOC_B):
        for pod in ("p0", "p1"):
            seq += 1
            _store(index, pod, doc, seq)
            sched.pre_request(_req(index, doc), pod)
    for doc in DOCS_ELSEWHERE[:elsewhere]:
        for pod in ("p0", "p1"):
            sched.pre_request(_req(index, doc), pod)
    _store(index, "p0", DOC_C, seq + 1, "CPU")
    ctx.inflight.start("p0", 2000, 0)
    req = _req(index, DOC_C)
    return sched.schedule(req, pods), req


def test_a_load_beyond_the_fleets_duplicate_budget_loses_though_the_reader_has_room() -> None:
    # hot set 5 documents (165 blocks): room for 135 duplicates; 66 held + C's 32 loaded fit
    roomy, req = _dup_world(3)
    assert roomy.chosen.id == "p1" and req.outputs.get(PeerPlans).plans["p1"].peer == HOLDER
    free_cost = req.outputs.get(TTFTCosts).costs["p1"]
    # hot set 8 documents (264 blocks): room for 36; 66 + 32 is 62 over: the load pays its 32 blocks
    tight, req = _dup_world(6)
    assert tight.chosen.id == "p0"
    assert req.outputs.get(PeerPlans).plans["p1"].peer == HOLDER  # still p1's cheapest plan
    assert req.outputs.get(TTFTCosts).costs["p1"] == pytest.approx(free_cost + 32 * BS)
    # evict_weight 0: neither price, the load is taken as before
    assert _dup_world(6, evict_weight=0.0)[0].chosen.id == "p1"
