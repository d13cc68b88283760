"""Tier-aware cost (issue 11): the price of a prompt token by where a pod finds it (engine cache,
DRAM or disk tier, nowhere), each pod's load-back speed learned from its ``/metrics``, and the
scorers that price with it (vllm_llmd.pd.load, vllm_llmd.router.tier_prices, docs/plugins)."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from router_fakes import store_blocks

from vllm_llmd.index import KVBlockIndex
from vllm_llmd.pd.load import DEFAULT_OTHER_TIER_PRICE, DEFAULT_TIER_PRICES, TokenPrices, prefill_equivalent, tier_price
from vllm_llmd.router.config import PodConfig, PoolConfig, ProfileConfig
from vllm_llmd.router.inflight import InflightTracker
from vllm_llmd.router.pod_metrics import PodMetrics, parse_metrics
from vllm_llmd.router.pool import PodPool
from vllm_llmd.router.prefix_memory import PrefixMemory
from vllm_llmd.router.scheduling import Candidate, SchedRequest, SchedulingContext, build_scheduler
from vllm_llmd.router.scheduling.estimated_ttft import EstimatedTTFTParams
from vllm_llmd.router.scheduling.prefix_view import held_by_tier
from vllm_llmd.router.tier_prices import TierPriceLearner

BS = 64
#: the default profile's prefill_weight (its one owner: EstimatedTTFTParams)
PW = EstimatedTTFTParams().prefill_weight


# ---- the price function ----------------------------------------------------------------------------
def test_three_prices_hit_lower_tier_miss() -> None:
    p = TokenPrices(tiers={"CPU": 0.1, "STORAGE": 0.4})
    assert prefill_equivalent(1000, {}, p) == 1000  # all miss
    assert prefill_equivalent(1000, {"GPU": 1000}, p) == 0  # all in the engine cache
    assert prefill_equivalent(1000, {"CPU": 800}, p) == pytest.approx(0.1 * 800 + 200)
    assert prefill_equivalent(1000, {"GPU": 200, "CPU": 300, "STORAGE": 400}, p) == pytest.approx(30 + 160 + 100)
    # a medium nobody priced (another connector's): its documented default; unlisted keys use the table
    assert TokenPrices(tiers={}).of("CPU") == DEFAULT_TIER_PRICES["CPU"]
    assert TokenPrices().of("LMCACHE") == DEFAULT_OTHER_TIER_PRICE
    # a new kind of source is one more key (issue 12 adds peers this way)
    assert prefill_equivalent(100, {"peer:x": 100}, TokenPrices(tiers={"peer:x": 0.2})) == pytest.approx(20)


def test_tier_price_is_the_speed_ratio_clamped_with_a_default_until_known() -> None:
    assert tier_price(None, 1e-4, 0.1) == 0.1
    assert tier_price(1e-6, None, 0.1) == 0.1
    assert tier_price(1e-6, 1e-4, 0.1) == pytest.approx(0.01)
    assert tier_price(1e-3, 1e-4, 0.1) == 1.0  # slower than prefilling: never more than a miss


def test_held_by_tier_splits_cached_tokens_in_prompt_order() -> None:
    assert held_by_tier([], BS, 0) == {}
    assert held_by_tier(["GPU"] * 4, BS, 256) == {"GPU": 256}
    assert held_by_tier(["GPU", "CPU", "STORAGE"], BS, 192) == {"GPU": 64, "CPU": 64, "STORAGE": 64}
    # routing memory knows more than the index: the rest is the engine cache (just routed there)
    assert held_by_tier(["CPU"], BS, 192) == {"CPU": 64, "GPU": 128}
    # the prompt is shorter than the match: cut at the end
    assert held_by_tier(["CPU", "STORAGE"], BS, 100) == {"CPU": 64, "STORAGE": 36}


# ---- learning from /metrics -------------------------------------------------------------------------
def _exposition(
    prefill_tok: float, prefill_s: float, dram_tok: float, disk_tok: float, dram_s: float, disk_s: float
) -> str:
    return (
        "# HELP vllm:request_prefill_time_seconds x\n"
        f'vllm:request_prefill_time_seconds_sum{{engine="0",model_name="m"}} {prefill_s}\n'
        f'vllm:request_prefill_kv_computed_tokens_sum{{engine="0",model_name="m"}} {prefill_tok}\n'
        f'llmd:kv_tier_loaded_tokens_total{{engine="0",model_name="m",tier="dram"}} {dram_tok}\n'
        f'llmd:kv_tier_loaded_tokens_total{{engine="0",model_name="m",tier="disk"}} {disk_tok}\n'
        f'llmd:kv_tier_load_seconds_sum{{engine="0",model_name="m",tier="dram"}} {dram_s}\n'
        f'llmd:kv_tier_load_seconds_sum{{engine="0",model_name="m",tier="disk"}} {disk_s}\n'
        f'llmd:kv_tier_load_seconds_count{{engine="0",model_name="m",tier="dram"}} 3\n'
    )


def test_parse_metrics_reads_the_tier_series_by_tier_and_the_prefill_sums() -> None:
    m = parse_metrics(_exposition(1000, 2.0, 300, 100, 0.01, 0.02))
    assert m.prefill_tokens == 1000 and m.prefill_seconds == 2.0
    assert m.tier_tokens == {"dram": 300, "disk": 100}
    assert m.tier_seconds == {"dram": 0.01, "disk": 0.02}
    # hostile values: negative, not finite, unlabelled, too many tiers -> ignored, bounded
    bad = "".join(f'llmd:kv_tier_loaded_tokens_total{{tier="t{chr(97 + i)}"}} 1\n' for i in range(20))
    bad += 'llmd:kv_tier_load_seconds_sum{tier="dram"} -5\nllmd:kv_tier_load_seconds_sum{tier="disk"} nan\n'
    bad += "llmd:kv_tier_load_seconds_sum 7\n"
    m = parse_metrics(bad)
    assert len(m.tier_tokens) == 8 and m.tier_seconds == {}


def test_the_learner_prices_each_tier_by_its_load_back_speed() -> None:
    lr = TierPriceLearner()
    # nothing learned: the documented defaults
    assert lr.observe(parse_metrics(_exposition(0, 0, 0, 0, 0, 0))).tiers == DEFAULT_TIER_PRICES
    # prefill: 1000 tokens in 1 s (1 ms/token); dram: 0.02 s for 400 tokens loaded (50 us/token);
    # disk: 0.03 s for the 100 disk tokens (300 us/token read, plus the DRAM copy)
    p = lr.observe(parse_metrics(_exposition(1000, 1.0, 300, 100, 0.02, 0.03)))
    assert p.tiers["CPU"] == pytest.approx(0.05)
    assert p.tiers["STORAGE"] == pytest.approx(0.35)
    # a slower window moves the mean by ALPHA = 0.3: dram now 200 us/token -> 50 + 0.3 * 150 = 95 us
    p = lr.observe(parse_metrics(_exposition(2000, 2.0, 400, 100, 0.04, 0.03)))
    assert p.tiers["CPU"] == pytest.approx(0.095)
    # a counter going down (engine restart) opens a new window; the learned values stay
    p = lr.observe(parse_metrics(_exposition(10, 0.01, 0, 0, 0, 0)))
    assert p.tiers["CPU"] == pytest.approx(0.095)
    # a window in which only one side moved waits for the other
    before = lr.speeds()
    lr.observe(parse_metrics(_exposition(10, 0.01, 100, 0, 0, 0)))
    assert lr.speeds() == before
    lr.observe(parse_metrics(_exposition(10, 0.01, 100, 0, 0.001, 0)))  # 1 ms for those 100 tokens
    assert lr.speeds()["dram"] == pytest.approx(95e-6 + 0.3 * (10e-6 - 95e-6))


def test_tier_series_absent_before_the_first_load_count_as_zero() -> None:
    """An engine exports a labelled tier series only once it has a value (found by the engine test:
    the first load-back after start-up was never learned)."""
    lr = TierPriceLearner()
    lr.observe(parse_metrics(_exposition(0, 0, 0, 0, 0, 0).split("llmd:")[0]))  # no llmd: lines at all
    lr.observe(parse_metrics(_exposition(1000, 1.0, 400, 0, 0.02, 0)))
    assert lr.speeds()["dram"] == pytest.approx(50e-6)


def test_prices_object_changes_only_when_the_prices_do() -> None:
    lr = TierPriceLearner()
    a = lr.observe(parse_metrics(_exposition(0, 0, 0, 0, 0, 0)))
    assert lr.observe(parse_metrics(_exposition(0, 0, 0, 0, 0, 0))) is a


async def test_the_pool_learns_prices_from_the_health_checks_scrapes() -> None:
    """With a tier-pricing profile and no fast scrape, the health check reads /metrics once every
    ``tier_prices_interval_s`` and the pod's candidate carries the learned prices."""
    state = {"text": _exposition(0, 0, 0, 0, 0, 0), "scrapes": 0}

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(_: web.Request) -> web.Response:
        state["scrapes"] += 1
        return web.Response(text=state["text"])

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    async with TestServer(app, host="127.0.0.1") as server:
        port = server.port
        pool = PodPool(PoolConfig(tier_prices_interval_s=60.0))
        pool.learn_tier_prices = True
        pool.set_pods([PodConfig(url=f"http://127.0.0.1:{port}", capacity_blocks=100)])
        pod = pool.pods[0]
        async with aiohttp.ClientSession() as session:
            pool._session = session
            assert await pool.check_health(pod)  # the first check reads /metrics (capacity, prices)
            state["text"] = _exposition(1000, 1.0, 400, 0, 0.02, 0)
            assert await pool.check_health(pod)
            assert state["scrapes"] == 1  # not due again for tier_prices_interval_s
            pod.tier_prices_due = 0.0  # the interval passed
            assert await pool.check_health(pod)
        assert state["scrapes"] == 2
        assert pod.tier_prices.prices.tiers["CPU"] == pytest.approx(0.05)
        from vllm_llmd.router.candidates import CandidateViews

        assert CandidateViews().of([pod])[0].prices is pod.tier_prices.prices


# ---- the scorers ------------------------------------------------------------------------------------
def _ctx(index: KVBlockIndex) -> SchedulingContext:
    return SchedulingContext(
        index=index, memory=PrefixMemory(), inflight=InflightTracker(), block_size=BS, speculative_ttl_s=0.0
    )


def _pods(ctx: SchedulingContext, prices: list[TokenPrices]) -> list[Candidate]:
    return [
        Candidate(
            id=f"p{i}",
            prefill_speed=1.0,
            has_events=True,
            role="both",
            load=ctx.inflight.load(f"p{i}"),
            metrics=PodMetrics(),
            prices=pr,
        )
        for i, pr in enumerate(prices)
    ]


def _tokens(prefix: int, n: int = 2048, tail: int = 64) -> list[int]:
    return [(prefix * 7919 + i) % 4000 + 1 for i in range(n)] + [(prefix * 31 + i) % 4000 + 1 for i in range(tail)]


def _req(index: KVBlockIndex, toks: list[int]) -> SchedRequest:
    return SchedRequest("m", toks, "", len(toks), 16, index.block_keys("m", toks))


def _costs(profile: dict, hbm: str | None, lower: str | None, prices: TokenPrices, lower_medium: str = "CPU"):
    index = KVBlockIndex(block_size=BS, capacity_blocks=100_000)
    ctx = _ctx(index)
    sched = build_scheduler(ProfileConfig.model_validate(profile), ctx)
    pods = _pods(ctx, [prices, prices, prices])
    toks = _tokens(1, n=2048, tail=0)
    store_blocks(index, "p0", toks, 1, "GPU")
    store_blocks(index, "p1", toks, 1, lower_medium)  # p2 holds nothing
    from vllm_llmd.router.scheduling.estimated_ttft import TTFTCosts

    req = _req(index, toks)
    d = sched.schedule(req, pods)
    return d, req.outputs.get(TTFTCosts)


def test_estimated_ttft_sees_three_prices() -> None:
    d, costs = _costs({}, "p0", "p1", TokenPrices(tiers={"CPU": 0.1}))
    assert costs is not None
    c = costs.costs
    assert c["p0"] < c["p1"] < c["p2"]
    # the DRAM hit costs prefill_weight x price x tokens, the miss prefill_weight x tokens
    assert c["p1"] == pytest.approx(PW * 0.1 * 2048)
    assert c["p2"] == pytest.approx(PW * 2048 + 0)  # nothing overflows without a capacity
    assert d.chosen.id == "p0"


def test_a_slow_tier_is_priced_like_a_miss_and_a_disk_hit_above_a_dram_hit() -> None:
    _, slow = _costs({}, "p0", "p1", TokenPrices(tiers={"CPU": 1.0}))
    assert slow is not None and slow.costs["p1"] == pytest.approx(slow.costs["p2"])
    _, disk = _costs({}, "p0", "p1", TokenPrices(tiers={"CPU": 0.1, "STORAGE": 0.4}), lower_medium="STORAGE")
    assert disk is not None and disk.costs["p1"] == pytest.approx(PW * 0.4 * 2048)


def test_price_tiers_false_is_the_tier_blind_cost() -> None:
    prof = {"scorers": [{"type": "estimated-ttft", "params": {"price_tiers": False}}]}
    _, blind = _costs(prof, "p0", "p1", TokenPrices(tiers={"CPU": 0.5}))
    assert blind is not None and blind.costs["p1"] == blind.costs["p0"]


def test_a_queue_on_the_hbm_pod_sends_the_request_to_the_dram_pod_not_to_a_miss() -> None:
    index = KVBlockIndex(block_size=BS, capacity_blocks=100_000)
    ctx = _ctx(index)
    sched = build_scheduler(ProfileConfig(), ctx)
    pods = _pods(ctx, [TokenPrices(tiers={"CPU": 0.05})] * 3)
    toks = _tokens(2, tail=0)
    store_blocks(index, "p0", toks, 1, "GPU")
    store_blocks(index, "p1", toks, 1, "CPU")
    ctx.inflight.start("p0", 4000, 0)  # the HBM pod is 4000 prefill tokens behind
    assert sched.schedule(_req(index, toks), pods).chosen.id == "p1"


def test_precise_prefix_scorer_discounts_lower_tiers_by_their_price() -> None:
    index = KVBlockIndex(block_size=BS, capacity_blocks=100_000)
    ctx = _ctx(index)
    sched = build_scheduler(ProfileConfig.model_validate({"scorers": [{"type": "precise-prefix-cache"}]}), ctx)
    pods = _pods(ctx, [TokenPrices(tiers={"CPU": 0.5})] * 2)
    toks = _tokens(4, tail=0)
    store_blocks(index, "p0", toks, 1, "CPU")
    store_blocks(index, "p1", toks[:1024], 1, "GPU")
    d = sched.schedule(_req(index, toks), pods)
    assert d.scores["precise-prefix-cache"]["p0"] == pytest.approx(0.5)
    assert d.scores["precise-prefix-cache"]["p1"] == pytest.approx(0.5)
    assert sched.prices_tiers
    blind = build_scheduler(
        ProfileConfig.model_validate({"scorers": [{"type": "precise-prefix-cache", "params": {"price_tiers": False}}]}),
        ctx,
    )
    assert blind.schedule(_req(index, toks), pods).scores["precise-prefix-cache"]["p0"] == pytest.approx(1.0)
    assert not blind.prices_tiers
