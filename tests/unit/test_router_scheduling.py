"""Scheduling plugins and profiles (no HTTP): the cost model, prefix sources, pickers, config errors."""

from __future__ import annotations

import pytest
from router_fakes import store_blocks

from vllm_llmd.index import KVBlockIndex
from vllm_llmd.router.config import ProfileConfig
from vllm_llmd.router.inflight import InflightTracker
from vllm_llmd.router.pod_metrics import PodMetrics, parse_metrics
from vllm_llmd.router.prefix_memory import PrefixMemory
from vllm_llmd.router.prompt import token_block_keys
from vllm_llmd.router.scheduling import Candidate, PluginError, SchedRequest, SchedulingContext, build_scheduler
from vllm_llmd.router.scheduling.estimated_ttft import EstimatedTTFTParams

BS = 64


def _ctx(index: KVBlockIndex | None = None, ttl: float = 10.0) -> SchedulingContext:
    return SchedulingContext(
        index=index, memory=PrefixMemory(), inflight=InflightTracker(), block_size=BS, speculative_ttl_s=ttl
    )


def _pods(
    ctx: SchedulingContext, n: int = 2, events: bool = False, speeds: list[float] | None = None
) -> list[Candidate]:
    return [
        Candidate(
            id=f"p{i}",
            prefill_speed=(speeds or [1.0] * n)[i],
            has_events=events,
            role="both",
            load=ctx.inflight.load(f"p{i}"),
            metrics=PodMetrics(),
        )
        for i in range(n)
    ]


def _tokens(prefix: int, suffix: int, n_prefix: int = 2048, n_suffix: int = 64) -> list[int]:
    return [(prefix * 7919 + i) % 4000 + 1 for i in range(n_prefix)] + [
        (suffix * 31 + i) % 4000 + 1 for i in range(n_suffix)
    ]


def _req(ctx: SchedulingContext, toks: list[int], max_tokens: int = 32, keys: list[int] | None = None) -> SchedRequest:
    if keys is None:
        keys = ctx.index.block_keys("m", toks) if ctx.index is not None else token_block_keys("m", toks, BS, 1 << 20)
    return SchedRequest("m", toks, "", len(toks), max_tokens, keys)


def _default(ctx: SchedulingContext):
    return build_scheduler(ProfileConfig(), ctx)


def test_cost_model_partitions_prefixes_and_sticks_under_concurrency() -> None:
    """16 prefixes arriving 8 at a time (requests still in flight, no events yet): each prefix goes
    to one pod, and the prefixes split evenly."""
    ctx = _ctx()
    sched = _default(ctx)
    pods = _pods(ctx)
    owner: dict[int, set[str]] = {}
    tickets = []
    order = [k % 16 for k in range(160)]
    for i, k in enumerate(order):
        d = sched.schedule(_req(ctx, _tokens(k, i)), pods)
        tickets.append(ctx.inflight.start(d.chosen.id, d.uncached_tokens, 32))
        owner.setdefault(k, set()).add(d.chosen.id)
        if len(tickets) == 8:  # concurrency 8: the oldest finishes
            ctx.inflight.done(tickets.pop(0))
    assert all(len(v) == 1 for v in owner.values()), owner
    per_pod = [sum(1 for v in owner.values() if v == {p}) for p in ("p0", "p1")]
    assert per_pod == [8, 8]


def test_affinity_breaks_when_the_sticky_pod_is_overloaded() -> None:
    ctx = _ctx()
    sched = _default(ctx)
    pods = _pods(ctx)
    first = sched.schedule(_req(ctx, _tokens(1, 0)), pods).chosen.id
    other = "p1" if first == "p0" else "p0"
    # a deep queue of uncached prefill on the sticky pod (twice the prefill_weight x 2048 a spill
    # costs): recomputing 2048 tokens elsewhere is cheaper
    ctx.inflight.start(first, int(2 * EstimatedTTFTParams().prefill_weight * 2048), 0)
    assert sched.schedule(_req(ctx, _tokens(1, 1)), pods).chosen.id == other
    # a small queue does not break affinity
    ctx2 = _ctx()
    sched2 = _default(ctx2)
    pods2 = _pods(ctx2)
    first2 = sched2.schedule(_req(ctx2, _tokens(1, 0)), pods2).chosen.id
    ctx2.inflight.start(first2, 1000, 0)
    assert sched2.schedule(_req(ctx2, _tokens(1, 1)), pods2).chosen.id == first2


def test_prefill_speed_steers_cold_requests_to_the_fast_pod() -> None:
    ctx = _ctx()
    sched = _default(ctx)
    pods = _pods(ctx, speeds=[1.0, 3.0])
    ctx.inflight.start("p1", 2000, 0)  # the fast pod is busier, but still finishes first
    assert sched.schedule(_req(ctx, _tokens(5, 0)), pods).chosen.id == "p1"


def test_precise_index_routes_to_the_pod_holding_the_prefix() -> None:
    index = KVBlockIndex(block_size=BS, capacity_blocks=100_000)
    ctx = _ctx(index, ttl=0.0)  # no speculative entries: only events count
    sched = _default(ctx)
    pods = _pods(ctx, events=True)
    store_blocks(index, "p1", _tokens(3, 0), 1)
    d = sched.schedule(_req(ctx, _tokens(3, 9)), pods)
    assert d.chosen.id == "p1"
    assert d.predicted_cached_tokens == 2048


def test_speculative_entries_expire_in_precise_mode() -> None:
    index = KVBlockIndex(block_size=BS, capacity_blocks=100_000)
    ctx = _ctx(index, ttl=10.0)
    sched = _default(ctx)
    pods = _pods(ctx, events=True)
    first = sched.schedule(_req(ctx, _tokens(2, 0)), pods).chosen.id
    d = sched.schedule(_req(ctx, _tokens(2, 1)), pods)
    assert d.chosen.id == first and d.predicted_cached_tokens == 2048
    # still in flight (no event yet): counted however long it waits
    ctx.speculative_ttl_s = 0.0
    assert sched.schedule(_req(ctx, _tokens(2, 2)), pods).predicted_cached_tokens == 2048
    # the requests finished (the proxy settles the entries) and the TTL passed, no event confirmed it
    for p in pods:
        ctx.memory.insert(p.id, _req(ctx, _tokens(2, 0)).block_keys, now=0.0)
    d2 = sched.schedule(_req(ctx, _tokens(2, 3)), pods)
    assert d2.predicted_cached_tokens == 0


def test_max_score_ties_break_by_load_never_randomly() -> None:
    ctx = _ctx()
    prof = ProfileConfig.model_validate({"scorers": [{"type": "approx-prefix-cache"}]})
    sched = build_scheduler(prof, ctx)
    pods = _pods(ctx, n=3)
    ctx.inflight.start("p0", 500, 0)
    ctx.inflight.start("p2", 100, 0)
    assert [p.id for p in sched.schedule(_req(ctx, [1] * 10), pods).ranked] == ["p1", "p2", "p0"]


def test_session_affinity_and_queue_depth() -> None:
    ctx = _ctx()
    prof = ProfileConfig.model_validate(
        {"scorers": [{"type": "session-affinity", "weight": 2}, {"type": "queue-depth"}]}
    )
    sched = build_scheduler(prof, ctx)
    assert sched.needs_metrics
    pods = _pods(ctx)
    pods[0].metrics = parse_metrics('vllm:num_requests_waiting{engine="0"} 0.0\n')
    pods[1].metrics = parse_metrics('vllm:num_requests_waiting{engine="0"} 4.0\n')
    r = _req(ctx, [1] * 10)
    r.session_id = "s1"
    assert sched.schedule(r, pods).chosen.id == "p0"
    pods[0].metrics = parse_metrics('vllm:num_requests_waiting{engine="0"} 5.0\n')
    r2 = _req(ctx, [2] * 10)
    r2.session_id = "s1"
    assert sched.schedule(r2, pods).chosen.id == "p0"  # the session outweighs the queue


def test_stale_metrics_score_neutral() -> None:
    ctx = _ctx()
    sched = build_scheduler(ProfileConfig.model_validate({"scorers": [{"type": "kv-cache-usage"}]}), ctx)
    pods = _pods(ctx)
    pods[0].metrics = parse_metrics("vllm:kv_cache_usage_perc 0.9\n", now=1.0)  # long ago
    d = sched.schedule(_req(ctx, [1] * 10), pods)
    assert d.scores["kv-cache-usage"] == {"p0": 0.5, "p1": 0.5}


def test_prefix_affinity_filter_and_round_robin() -> None:
    ctx = _ctx()
    prof = ProfileConfig.model_validate(
        {
            "filters": [{"type": "prefix-affinity"}],
            "scorers": [{"type": "inflight-load"}],
            "picker": {"type": "round-robin"},
        }
    )
    sched = build_scheduler(prof, ctx)
    pods = _pods(ctx)
    toks = _tokens(7, 0)
    ctx.memory.insert("p1", token_block_keys("m", toks, BS, 1 << 20))
    for i in range(3):
        assert sched.schedule(_req(ctx, _tokens(7, i)), pods).chosen.id == "p1"


def test_unknown_plugin_and_parameter_are_named() -> None:
    ctx = _ctx()
    with pytest.raises(PluginError, match="unknown scorer type 'nope'"):
        build_scheduler(ProfileConfig.model_validate({"scorers": [{"type": "nope"}]}), ctx)
    with pytest.raises(PluginError, match="unknown parameter 'decode_wieght'"):
        build_scheduler(
            ProfileConfig.model_validate({"scorers": [{"type": "estimated-ttft", "params": {"decode_wieght": 1}}]}), ctx
        )
    with pytest.raises(PluginError, match="smoothing_tokens"):
        build_scheduler(
            ProfileConfig.model_validate({"scorers": [{"type": "estimated-ttft", "params": {"smoothing_tokens": -1}}]}),
            ctx,
        )


def test_prefix_memory_lru_per_pod() -> None:
    m = PrefixMemory(blocks_per_pod=4)
    m.insert("a", [1, 2, 3])
    m.insert("a", [4, 5])  # evicts key 1 from a
    assert m.match([1, 2]) == {}
    assert m.match([2, 3, 4]) == {"a": 3}
    m.insert("b", [2, 3])
    assert m.match([2, 3, 4]) == {"a": 3, "b": 2}
    m.remove_pod("a")
    assert m.match([2, 3, 4]) == {"b": 2}


@pytest.mark.parametrize(("weight", "history", "moves"), [(0.0, 512, False), (600.0, 512, True), (600.0, 2048, False)])
def test_request_weight_moves_a_short_session_off_a_crowded_pod(weight: float, history: int, moves: bool) -> None:
    """A session's next turn, its history held by the pod it ran on, which now has 6 requests in
    flight (decoding) against the other pod's 1. Without ``request_weight`` it stays (the move costs
    ``prefill_weight`` x its history); at 600 tokens per request in flight a 512-token history moves
    (4 x 576 + 600 < 4 x 64 + 3,600) and a 2,048-token one stays (4 x 2,112 + 600 > 3,856)."""
    from vllm_llmd.router.config import PluginRef

    ctx = _ctx()
    profile = ProfileConfig(scorers=[PluginRef(type="estimated-ttft", params={"request_weight": weight})])
    sched = build_scheduler(profile, ctx)
    pods = _pods(ctx)
    holder = sched.schedule(_req(ctx, _tokens(1, 0, n_prefix=history)), pods).chosen.id
    other = "p1" if holder == "p0" else "p0"
    for pod, n in ((holder, 6), (other, 1)):
        for _ in range(n):
            ctx.inflight.first_token(ctx.inflight.start(pod, 200, 32))  # prefilled, decoding
    assert ctx.inflight.load(holder).requests == 6 and ctx.inflight.load(holder).prefill_tokens == 0
    chosen = sched.schedule(_req(ctx, _tokens(1, 1, n_prefix=history)), pods).chosen.id
    assert chosen == (other if moves else holder)
