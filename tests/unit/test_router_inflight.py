"""The router's in-flight record drains queued prefill at each pod's learned rate
(vllm_llmd/router/inflight.py): what it counts, and the spill it prevents on a burst of cold
prompts (bench/RESULTS.md, "Issue 12: ours against the oracle on hotprefix, taken apart")."""

from __future__ import annotations

import pytest

from vllm_llmd.router.config import ProfileConfig, RouterConfig, SpeedConfig
from vllm_llmd.router.inflight import InflightTracker
from vllm_llmd.router.pod_metrics import PodMetrics
from vllm_llmd.router.prefix_memory import PrefixMemory
from vllm_llmd.router.prompt import token_block_keys
from vllm_llmd.router.scheduling import Candidate, SchedRequest, SchedulingContext, build_scheduler
from vllm_llmd.router.server import build_router
from vllm_llmd.router.speed import AttemptTiming, SpeedEstimator


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_without_a_rate_a_prompt_counts_in_full_until_its_first_token() -> None:
    clock = Clock()
    tr = InflightTracker(None, clock)
    t = tr.start("a", 2000, 16)
    clock.t += 30
    tr.drain()
    assert tr.load("a").prefill_tokens == 2000
    tr.first_token(t)
    assert tr.load("a").prefill_tokens == 0 and tr.load("a").decode_tokens == 16
    tr.done(t)
    assert (tr.load("a").requests, tr.load("a").decode_tokens) == (0, 0)


def test_queued_prefill_drains_at_the_rate_and_first_tokens_take_their_share() -> None:
    clock = Clock()
    rates = {"a": 1000.0}
    tr = InflightTracker(rates.get, clock)
    t1 = tr.start("a", 2000, 16)
    clock.t += 0.5
    tr.drain()
    assert tr.load("a").prefill_tokens == pytest.approx(1500)
    t2 = tr.start("a", 1000, 16)  # sent now: none of it done yet
    assert tr.load("a").prefill_tokens == pytest.approx(2500)
    clock.t += 1.0
    tr.drain()
    assert tr.load("a").prefill_tokens == pytest.approx(1500)  # 3000 sent, 1500 done
    tr.first_token(t1)  # the oldest is answered: its 2000 leave, with the 1500 done (all of it was)
    assert tr.load("a").prefill_tokens == pytest.approx(1000)
    clock.t += 100
    tr.drain()
    assert tr.load("a").prefill_tokens == 0  # never below nothing
    tr.first_token(t2)
    ld = tr.load("a")
    assert (ld.prefill_tokens, ld.prefill_sent, ld.prefill_done) == (0, 0, 0)


def test_idle_time_drains_nothing_of_a_later_prompt() -> None:
    clock = Clock()
    tr = InflightTracker({"a": 1000.0}.get, clock)
    tr.done(tr.start("a", 500, 4))
    clock.t += 60  # nothing queued for a minute
    tr.drain()
    tr.start("a", 2000, 16)
    tr.drain()
    assert tr.load("a").prefill_tokens == 2000


def test_the_router_drains_at_the_learned_rate_unless_configured_off() -> None:
    on = build_router(RouterConfig())
    assert on.inflight.rate_of is not None and on.inflight.rate_of("x") is None  # nothing learned yet
    assert build_router(RouterConfig(speed=SpeedConfig(drain_queued_prefill=False))).inflight.rate_of is None
    assert build_router(RouterConfig(speed=SpeedConfig(learn=False))).inflight.rate_of is None


def _req(seed: int, n: int = 2113) -> SchedRequest:
    toks = [(seed * 7919 + j) % 4000 + 1 for j in range(n)]
    return SchedRequest("m", toks, "", len(toks), 32, token_block_keys("m", toks, 64, 1 << 20))


@pytest.mark.parametrize("rate", [None, 3000.0])
def test_a_prefix_being_prefilled_in_a_burst_keeps_its_next_request(rate: float | None) -> None:
    """Pod a took four cold 2,113-token prompts 2 s ago (b took nothing else since); the next request
    for one of them arrives. Counted in full, a looks 8,452 tokens busy and the request spills to b,
    which prefills the prefix again; drained at a's rate (3,000 tokens/s: 6,000 done) it stays."""
    clock = Clock()
    tr = InflightTracker((lambda _p: rate), clock)
    ctx = SchedulingContext(index=None, memory=PrefixMemory(), inflight=tr, block_size=64, speculative_ttl_s=10)
    sched = build_scheduler(ProfileConfig(), ctx)
    a, b = (Candidate(p, 1.0, False, "both", tr.load(p), PodMetrics()) for p in ("a", "b"))
    for seed in range(4):  # the burst, on a
        d = sched.schedule(_req(seed), [a])
        tr.start(d.chosen.id, 2113, 32)
    for seed in range(4, 8):  # and as much on b, answered long ago
        d = sched.schedule(_req(seed), [b])
        tr.done(tr.start(d.chosen.id, 2113, 32))
    clock.t += 2.0
    tr.drain()
    d = sched.schedule(_req(3), [a, b])
    assert d.chosen.id == ("b" if rate is None else "a"), d.totals


def test_time_before_the_rate_is_known_is_credited_once_it_is() -> None:
    clock = Clock()
    rates: dict[str, float] = {}
    tr = InflightTracker(rates.get, clock)
    tr.start("a", 4000, 16)
    clock.t += 1.0
    tr.drain()
    assert tr.load("a").prefill_tokens == 4000  # no rate yet
    rates["a"] = 1000.0  # the pod's first answer taught one
    clock.t += 0.5
    tr.drain()
    assert tr.load("a").prefill_tokens == pytest.approx(2500)  # 1.5 s since it was sent


def test_a_pod_without_samples_drains_at_the_pools_rate_per_unit_of_prior() -> None:
    est = SpeedEstimator(SpeedConfig(refresh_s=0))
    est.set_pods({"a": 1.0, "b": 2.0, "c": 1.0})
    assert est.prefill_rate("a") is None  # nothing learned anywhere
    est.observe(AttemptTiming("a", 3000, 1.0, 0, 0.0, 3000), now=1.0)  # one sample: 3,000 tokens/s
    est.refresh(now=1.0)
    assert est.prefill_rate("a") == pytest.approx(3000)
    assert est.prefill_rate("b") == pytest.approx(6000) and est.prefill_rate("c") == pytest.approx(3000)
    assert est.prefill == {}  # relative speeds still want MIN_SAMPLES on two pods
