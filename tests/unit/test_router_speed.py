"""Learned pod speeds (vllm_llmd.router.speed): convergence on synthetic pods under queueing and
noise, outliers, priors, forgetting unhealthy and departed pods, bounded memory; and what the cost
model makes of them (queued and idle pools)."""

from __future__ import annotations

import random

import pytest

from vllm_llmd.router.config import ProfileConfig, SpeedConfig
from vllm_llmd.router.inflight import InflightTracker
from vllm_llmd.router.pod_metrics import PodMetrics
from vllm_llmd.router.prefix_memory import PrefixMemory
from vllm_llmd.router.prompt import token_block_keys
from vllm_llmd.router.scheduling import Candidate, SchedRequest, SchedulingContext, build_scheduler
from vllm_llmd.router.speed import AttemptTiming, SpeedEstimator, weighted_median

#: tokens/s of the synthetic pods
RATES = {"fast": 4000.0, "mid": 2000.0, "mid2": 2000.0, "slow": 500.0}
OVERHEAD_S = 0.02


def sample(rng: random.Random, pod: str, noise: float = 0.15) -> AttemptTiming:
    """One streamed answer: a request of 256-2048 uncached tokens behind 0-20,000 tokens queued."""
    own = rng.randint(256, 2048)
    ahead = rng.choice([0, 0, rng.randint(0, 20_000)])
    work = own + ahead
    ttft = OVERHEAD_S + work / RATES[pod] * rng.lognormvariate(0, noise)
    itl = 1 / (RATES[pod] / 100) * rng.lognormvariate(0, noise)  # decode: rate/100 tokens/s
    return AttemptTiming(pod, work, ttft, 31, 31 * itl, own)


def _est(**kw) -> SpeedEstimator:
    est = SpeedEstimator(SpeedConfig(refresh_s=0, **kw))
    est.set_pods(dict.fromkeys(RATES, 1.0))
    return est


def _feed(est: SpeedEstimator, n: int, rng: random.Random, t0: float = 0.0, **kw) -> float:
    t = t0
    for _ in range(n):
        for pod in RATES:
            t += 0.01
            est.observe(sample(rng, pod, **kw), now=t)
    return t


def test_converges_on_synthetic_pods_despite_queueing_and_noise() -> None:
    est = _est()
    rng = random.Random(1)
    t = _feed(est, 60, rng)
    est.refresh(now=t)
    ps, ds = est.prefill, est.decode
    # relative to the median pod (2000 tokens/s): 2, 1, 1, 0.25; 60 samples against the prior's 1:
    # speed = learned ** (60 / 61) (the prior is 1)
    shrink = 60 / 61
    assert ps["fast"] == pytest.approx(2.0**shrink, rel=0.1)
    assert ps["mid"] == pytest.approx(1.0, rel=0.1)
    assert ps["slow"] == pytest.approx(0.25**shrink, rel=0.1)
    assert ds["fast"] / ds["slow"] == pytest.approx(8.0, rel=0.25)


def test_ignores_outliers() -> None:
    """A fifth of the answers 50x slower (pauses, work the router cannot see): the medians hold."""
    est = _est()
    rng = random.Random(2)
    t = 0.0
    for i in range(60):
        for pod in RATES:
            t += 0.01
            s = sample(rng, pod)
            if i % 5 == 0:
                s = AttemptTiming(pod, s.work_tokens, s.ttft_s * 50, s.decode_events, s.decode_s * 50, s.own_tokens)
            est.observe(s, now=t)
    est.refresh(now=t)
    assert est.prefill["slow"] == pytest.approx(0.25 ** (60 / 61), rel=0.15)
    assert est.prefill["fast"] == pytest.approx(2.0 ** (60 / 61), rel=0.15)


def test_prior_weighs_until_samples_come_and_cheap_requests_teach_nothing() -> None:
    est = SpeedEstimator(SpeedConfig(refresh_s=0, prior_samples=8))
    est.set_pods({"fast": 4.0, "mid": 1.0, "mid2": 1.0, "slow": 1.0})
    assert est.prefill_speed("fast", 4.0) == 4.0  # no samples: the configured speed
    rng = random.Random(3)
    t = 0.0
    for pod in RATES:  # 8 samples each: halfway between the prior and what was measured
        for _ in range(8):
            t += 0.01
            est.observe(sample(rng, pod, noise=0.0), now=t)
    est.refresh(now=t)
    # rate/prior: fast 1000, mid 2000, mid2 2000, slow 500 -> R = 1500; slow learned 1/3, prior 1
    assert est.prefill["slow"] == pytest.approx((1 / 3) ** 0.5, rel=0.05)
    assert est.prefill["fast"] == pytest.approx((4.0 * 4000 / 1500) ** 0.5, rel=0.05)
    cheap = SpeedEstimator(SpeedConfig(refresh_s=0))
    cheap.observe(AttemptTiming("a", 64, 0.02, 0, 0.0))  # a warm request: overhead, not speed
    cheap.observe(AttemptTiming("a", 64, None, 2, 0.01))  # not streamed; too few tokens
    # a warm request behind a queue: its wait is the queue's, partly overlapped by chunked prefill
    cheap.observe(AttemptTiming("a", 5000, 0.3, 0, 0.0, own_tokens=64))
    assert cheap.refresh() == 0 and not cheap._pods["a"].prefill and not cheap._pods["a"].decode


def test_forgets_unhealthy_pods_and_pods_that_leave() -> None:
    est = _est()
    rng = random.Random(4)
    t = _feed(est, 30, rng)
    est.refresh(now=t)
    assert est.prefill["slow"] < 0.4
    est.forget("slow")  # turned unhealthy (an engine restart fails its health checks)
    t += 10
    est.refresh(now=t)
    assert "slow" not in est.prefill and est.prefill_speed("slow", 1.0) == 1.0
    est.forget("fast")  # turned unhealthy (PodPool.on_pod_lost)
    est.set_pods({"mid": 1.0, "mid2": 1.0, "slow": 1.0})  # left the pool
    t += 10
    est.refresh(now=t)
    assert set(est._pods) <= {"mid", "mid2", "slow"} and "fast" not in est.prefill
    est.observe(sample(rng, "fast"), now=t)  # not a member: not kept
    assert "fast" not in est._pods


def test_samples_age_out_and_memory_is_bounded() -> None:
    est = _est(window=16, max_age_s=60)
    rng = random.Random(5)
    t = _feed(est, 100, rng)
    assert all(len(s.prefill) <= 16 and len(s.decode) <= 16 for s in est._pods.values())
    est.refresh(now=t)
    assert est.prefill
    est.refresh(now=t + 61)  # nothing new for longer than max_age_s: learned again from the prior
    assert est.prefill == {} and all(not s.prefill for s in est._pods.values())


def test_decode_samples_can_age_out_sooner_than_prefill_samples() -> None:
    """``decode_max_age_s``: a pod learned slow at decode is back at its prior once its decode samples
    are that old, while its prefill speed (``max_age_s``) is kept."""
    est = _est(max_age_s=300, decode_max_age_s=10)
    t = _feed(est, 30, random.Random(6))
    est.refresh(now=t)
    assert est.decode["slow"] < 0.4 and est.prefill["slow"] < 0.4
    est.refresh(now=t + 11)
    assert est.decode == {} and est.decode_speed("slow", 1.0) == 1.0
    assert est.prefill["slow"] < 0.4
    default = _est(max_age_s=300)  # unset: the decode samples live as long as the prefill ones
    t = _feed(default, 30, random.Random(6))
    default.refresh(now=t + 11)
    assert default.decode["slow"] < 0.4


def test_learned_speeds_steer_the_cost_model() -> None:
    """Two pods, equal by configuration: once one is learned to be 4x slower, the estimated-ttft cost
    sends cold prompts to the fast one even while it has a queue (until the queue outweighs the speed)."""
    inflight = InflightTracker()
    est = SpeedEstimator(SpeedConfig(refresh_s=0))
    ctx = SchedulingContext(
        index=None, memory=PrefixMemory(), inflight=inflight, block_size=64, speculative_ttl_s=10, speeds=est
    )
    sched = build_scheduler(ProfileConfig(), ctx)
    est.set_pods({"a": 1.0, "b": 1.0})
    for i in range(20):
        est.observe(AttemptTiming("a", 2000, 2000 / 4000, 31, 31 / 40), now=i)
        est.observe(AttemptTiming("b", 2000, 2000 / 1000, 31, 31 / 10), now=i)
    est.refresh(now=20)
    pods = [Candidate(p, est.prefill_speed(p, 1.0), False, "both", inflight.load(p), PodMetrics()) for p in ("a", "b")]
    for c in pods:
        c.decode_speed = est.decode_speed(c.id, 1.0)
    sent = {"a": 0, "b": 0}
    for i in range(10):
        toks = [(i * 7919 + j) % 4000 + 1 for j in range(1024)]
        req = SchedRequest("m", toks, "", len(toks), 16, token_block_keys("m", toks, 64, 1 << 20))
        d = sched.schedule(req, pods)
        inflight.start(d.chosen.id, 1024, 16)  # never finishes: the queue grows
        sent[d.chosen.id] += 1
    assert sent["a"] >= 6 and sent["b"] >= 1, sent  # ~4:1 by speed, not 5:5


def test_decode_time_weight_keeps_requests_off_a_pod_whose_answers_stream_slowly() -> None:
    """Two pods equally fast at prefill, one decoding 4x slower (its decodes stalled): with
    ``decode_time_weight`` a request both hold equally goes to the fast decoder until its queue
    outweighs the slower decode; without it the cost does not tell them apart. The decode price is
    the learned ``R_prefill / R_decode``: 2000 prefill tokens/s over 25 decode tokens/s (the median of
    the pods' 40 and 10) = 80."""
    from vllm_llmd.router.config import PluginRef

    est = SpeedEstimator(SpeedConfig(refresh_s=0))
    est.set_pods({"a": 1.0, "b": 1.0})
    for i in range(20):
        est.observe(AttemptTiming("a", 2000, 1.0, 31, 31 / 40), now=i)
        est.observe(AttemptTiming("b", 2000, 1.0, 31, 31 / 10), now=i)
    est.refresh(now=20)
    assert est.decode_price() == pytest.approx(2000 / 25)
    toks = list(range(1, 1025))
    sent = {}
    for weight in (0.0, 1.0):
        inflight = InflightTracker()
        ctx = SchedulingContext(
            index=None, memory=PrefixMemory(), inflight=inflight, block_size=64, speculative_ttl_s=10, speeds=est
        )
        profile = ProfileConfig(
            scorers=[PluginRef(type="estimated-ttft", params={"decode_time_weight": weight, "balance_weight": 0})]
        )
        sched = build_scheduler(profile, ctx)
        pods = [Candidate(p, 1.0, False, "both", inflight.load(p), PodMetrics()) for p in ("a", "b")]
        for c in pods:
            c.decode_speed = est.decode_speed(c.id, 1.0)
        req = SchedRequest("m", toks, "", len(toks), 16, token_block_keys("m", toks, 64, 1 << 20))
        sent[weight] = sched.schedule(req, pods).totals
    assert est.decode["b"] < 0.5 and est.decode["a"] > 1.5  # 0.4 and 1.6, shrunk a little
    assert sent[0.0]["a"] == pytest.approx(sent[0.0]["b"])  # the TTFT cost alone: a tie
    assert sent[1.0]["a"] > sent[1.0]["b"]  # totals of scores: higher is better


def _pair(rates: dict[str, float], n: int, seed: int, noise: float = 0.3) -> SpeedEstimator:
    """Pods answering requests of 256-2048 uncached tokens at ``rates`` tokens/s, each TTFT times a
    log-normal factor of sigma ``noise``, ``n`` samples per pod."""
    rng = random.Random(seed)
    est = SpeedEstimator(SpeedConfig(refresh_s=0))
    est.set_pods(dict.fromkeys(rates, 1.0))
    t = 0.0
    for _ in range(n):
        for pod, rate in rates.items():
            t += 0.01
            own = rng.randint(256, 2048)
            est.observe(AttemptTiming(pod, own, own / rate * rng.lognormvariate(0, noise)), now=t)
    est.refresh(now=t)
    return est


def test_identical_pods_keep_their_priors_until_their_samples_differ_beyond_the_scatter() -> None:
    """Two identical engines learned 0.87 / 1.13 on the README's workload (bench/RESULTS.md, "The 7/9
    split"): the difference of two medians of a few noisy samples. Over 20 seeds of 8 samples each
    (noise 0.3), both pods stay exactly at their prior in at least 15 (18 measured; the fixed prior
    weight of one sample kept none there, and left half of them more than 10% apart); pods 2x apart,
    same noise and count, are still learned apart (19 of 20 by more than 10%, median ratio 1.64; the
    fixed weight 1.74)."""
    same = [_pair({"a": 1000.0, "b": 1000.0}, 8, seed) for seed in range(20)]
    kept = [e for e in same if e.prefill == {"a": 1.0, "b": 1.0}]
    assert len(kept) >= 15, [e.prefill for e in same]
    assert all(e.prefill_shrink.n0 == float("inf") and e.prefill_shrink.sigma > 0.1 for e in kept)
    apart = [_pair({"a": 1000.0, "b": 2000.0}, 8, seed) for seed in range(20)]
    ratios = sorted(e.prefill["b"] / e.prefill["a"] for e in apart)
    assert ratios[10] > 1.5 and sum(r > 1.1 for r in ratios) >= 18, ratios
    assert sum(e.prefill_shrink.n0 < float("inf") for e in apart) >= 18
    # no scatter at all (every sample the same): any difference is real, the floor prior_samples holds
    exact = _pair({"a": 1000.0, "b": 2000.0}, 4, 0, noise=0.0)
    assert exact.prefill_shrink.n0 == 1.0 and exact.prefill["b"] / exact.prefill["a"] == pytest.approx(2**0.8)


def test_weighted_median() -> None:
    assert weighted_median([(1.0, 1.0), (10.0, 1.0), (2.0, 5.0)]) == 2.0
    assert weighted_median([(3.0, 1.0)]) == 3.0


def test_new_prefixes_follow_the_learned_speeds_on_an_idle_pool() -> None:
    """Issue 13's cold-prefix placement: three pods configured alike, learned 2 / 1 / 0.5. With no queue
    anywhere, new prefixes go by the footprint's fair share, which follows the learned speeds: the fast
    pod gets the most, the slow one the fewest; the same pods with nothing learned split them evenly."""
    inflight = InflightTracker()
    est = SpeedEstimator(SpeedConfig(refresh_s=0))
    ctx = SchedulingContext(
        index=None, memory=PrefixMemory(), inflight=inflight, block_size=64, speculative_ttl_s=10, speeds=est
    )
    sched = build_scheduler(ProfileConfig(), ctx)
    rates = {"fast": 4000.0, "mid": 2000.0, "slow": 1000.0}
    est.set_pods(dict.fromkeys(rates, 1.0))
    for i in range(8):
        for pod, r in rates.items():
            est.observe(AttemptTiming(pod, 2112, 2112 / r, 31, 31 / (r / 100), 2112), now=i)
    est.refresh(now=8)
    assert est.prefill == pytest.approx({"fast": 2.0, "mid": 1.0, "slow": 0.5}, rel=0.1)
    pods = [Candidate(p, est.prefill_speed(p, 1.0), False, "both", inflight.load(p), PodMetrics()) for p in rates]
    sent = dict.fromkeys(rates, 0)
    for i in range(35):
        toks = [(i * 7919 + j) % 4000 + 1 for j in range(2048)]
        req = SchedRequest("m", toks, "", len(toks), 16, token_block_keys("m", toks, 64, 1 << 20))
        d = sched.schedule(req, pods)
        inflight.done(inflight.start(d.chosen.id, 2048, 16))  # answered at once: no queue anywhere
        sent[d.chosen.id] += 1
    blind = build_scheduler(
        ProfileConfig(),
        SchedulingContext(index=None, memory=PrefixMemory(), inflight=inflight, block_size=64, speculative_ttl_s=10),
    )
    even = dict.fromkeys(rates, 0)
    same = [Candidate(p, 1.0, False, "both", inflight.load(p), PodMetrics()) for p in rates]
    for i in range(35):
        toks = [(i * 7919 + j) % 4000 + 1 for j in range(2048)]
        req = SchedRequest("m", toks, "", len(toks), 16, token_block_keys("m", toks, 64, 1 << 20))
        d = blind.schedule(req, same)
        inflight.done(inflight.start(d.chosen.id, 2048, 16))
        even[d.chosen.id] += 1
    assert max(even.values()) - min(even.values()) <= 2, even
    # speed divides the cost and weighs the fair share: an idle slow pod's cold prefill takes 4x the fast
    # one's, so it gets a new prefix only once the others are well past their share (24 / 11 / 0 here)
    assert sent["fast"] > 1.5 * sent["mid"] and sent["mid"] > sent["slow"], sent


def test_a_pod_back_from_unhealthy_gets_the_speeds_published_while_it_was_down() -> None:
    """A pod left out of the candidates while it is down (unhealthy, ejected) is resynced when it is
    back: a restarted pod competes at its prior, not at the slow speed learned before its crash (CI,
    2026-12-03: the speeds were recomputed while it was down, and its cached candidate kept 0.33, so
    every single request on the idle pool went to the survivor)."""
    import time

    from vllm_llmd.router.candidates import CandidateViews
    from vllm_llmd.router.config import PodConfig
    from vllm_llmd.router.pool import Pod

    a, b = Pod(PodConfig(url="http://10.0.0.1:8000")), Pod(PodConfig(url="http://10.0.0.2:8000"))
    est = SpeedEstimator(SpeedConfig(refresh_s=0))
    est.set_pods({a.id: 1.0, b.id: 1.0})
    now = time.monotonic()
    for k in range(8):  # a prefills at 500 tokens/s, b at 4000
        est.observe(AttemptTiming(a.id, 1000, 2.0, 31, 1.0, 1000), now=now + k * 0.01)
        est.observe(AttemptTiming(b.id, 1000, 0.25, 31, 1.0, 1000), now=now + k * 0.01)
    views = CandidateViews(64, est)
    ca = views.of([a, b])[0]
    assert ca.prefill_speed < 0.5
    est.forget(a.id)  # a's health checks failed (PodPool.on_pod_lost); it is not a candidate meanwhile
    assert views.of([b])[0].prefill_speed == 1.0  # only b has samples: every pod at its prior
    ca, cb = views.of([a, b])  # a is healthy again
    assert ca.prefill_speed == cb.prefill_speed == 1.0
    assert ca.decode_speed == cb.decode_speed == 1.0
