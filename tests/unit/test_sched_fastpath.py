"""The scheduler's fast path decides exactly as the plain per-pod code did (tests/unit/sched_reference.py).

Two identical worlds (pods, loads, KV index contents by tier, routing memory, learned prices,
capacities) are driven through the same random request sequence, one by the shipped scheduler and
one by the reference; every decision must match bit for bit: the ranking, every total and
per-scorer score, the costs handed to later stages and the prefix view.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from sched_reference import schedule as reference_schedule

from vllm_llmd.pd.load import TokenPrices
from vllm_llmd.router.config import PluginRef, ProfileConfig
from vllm_llmd.router.inflight import InflightTracker
from vllm_llmd.router.pod_metrics import PodMetrics
from vllm_llmd.router.prefix_memory import PrefixMemory
from vllm_llmd.router.scheduling import Candidate, SchedRequest, SchedulingContext, build_scheduler
from vllm_llmd.router.scheduling.estimated_ttft import TTFTCosts

BS = 16
TIERS = ["GPU", "CPU", "STORAGE"]


@dataclass
class _Match:
    tokens: int
    tiers: list[str]


class TableIndex:
    """The scheduler's ``PrefixIndex`` protocol (``vllm_llmd.router.scheduling.framework``) over a
    table: block keys are ``family * 1000 + j``; each pod holds a leading run of some families'
    blocks, each block in a tier (what ``KVBlockIndex.match_keys`` reports)."""

    def __init__(self, held: dict[str, dict[int, list[str]]]) -> None:
        self.held = held

    def match_keys(self, keys: list[int]) -> dict[str, _Match]:
        if not keys:
            return {}
        fam = keys[0] // 1000
        out = {}
        for pod, fams in self.held.items():
            tiers = fams.get(fam)
            if tiers:
                n = min(len(tiers), len(keys))
                out[pod] = _Match(n * BS, tiers[:n])
        return out

    def pods(self) -> list[str]:
        return list(self.held)

    def epochs_total(self) -> int:
        return 0

    def epoch(self, pod: str) -> int:
        return 0


def _world(seed: int, n_pods: int, profile: ProfileConfig) -> tuple:
    rng = random.Random(seed)
    ids = [f"10.0.0.{i}:8000" for i in range(n_pods)]
    held: dict[str, dict[int, list[str]]] = {}
    for pid in ids:
        if rng.random() < 0.5:
            held[pid] = {
                f: [rng.choice(TIERS) if rng.random() < 0.3 else "GPU" for _ in range(rng.randrange(1, 40))]
                for f in rng.sample(range(12), rng.randrange(1, 5))
            }
    ctx = SchedulingContext(
        index=TableIndex(held), memory=PrefixMemory(), inflight=InflightTracker(), block_size=BS, speculative_ttl_s=1e4
    )
    cands = []
    for pid in ids:
        ld = ctx.inflight.load(pid)
        ld.requests = rng.randrange(0, 4)
        ld.prefill_tokens = rng.choice([0, 0, rng.randrange(0, 5000)])
        ld.decode_tokens = rng.choice([0, rng.randrange(0, 3000)])
        prices = TokenPrices({"CPU": rng.random(), "STORAGE": rng.random()}) if rng.random() < 0.5 else TokenPrices()
        cands.append(
            Candidate(
                id=pid,
                prefill_speed=rng.choice([1.0, 1.0, rng.uniform(0.3, 4.0)]),
                has_events=rng.random() < 0.8,
                role="both",
                load=ld,
                metrics=PodMetrics(),
                capacity_blocks=rng.choice([None, rng.randrange(1, 200)]),
                decode_speed=rng.choice([1.0, rng.uniform(0.3, 4.0)]),
                prices=prices,
            )
        )
    for _ in range(30):  # aged routing memory: approximate prefix entries only
        fam = rng.randrange(12)
        ctx.memory.insert(rng.choice(ids), [fam * 1000 + j for j in range(rng.randrange(1, 30))], now=-1e9)
    return ctx, cands, build_scheduler(profile, ctx)


PROFILES = {
    "default": ProfileConfig(),
    "requests-priced": ProfileConfig(scorers=[PluginRef(type="estimated-ttft", params={"request_weight": 600.0})]),
    "untiered-no-balance": ProfileConfig(
        scorers=[PluginRef(type="estimated-ttft", params={"price_tiers": False, "balance_weight": 0})]
    ),
    "mixed": ProfileConfig(
        scorers=[
            PluginRef(type="estimated-ttft", weight=2.0, params={"capacity_weight": 0}),
            PluginRef(type="precise-prefix-cache", weight=1.5),
            PluginRef(type="inflight-load", weight=0.5),
            PluginRef(type="approx-prefix-cache", weight=0.3),
        ]
    ),
}


@pytest.mark.parametrize("name", sorted(PROFILES))
@pytest.mark.parametrize("seed", range(4))
def test_fast_path_decides_as_the_reference(name: str, seed: int) -> None:
    profile = PROFILES[name]
    n_pods = [1, 7, 40, 100][seed]
    _, new_pods, new = _world(seed, n_pods, profile)
    _, old_pods, old = _world(seed, n_pods, profile)
    rng = random.Random(1000 + seed)
    picked: set[str] = set()
    for step in range(120):
        fam = rng.randrange(14)  # families 12, 13: held by no pod
        nblocks = rng.randrange(0, 40)
        keys = [fam * 1000 + j for j in range(nblocks)]
        n = nblocks * BS + rng.randrange(0, BS)
        toks = None if rng.random() < 0.15 else list(range(n))
        reqs = [SchedRequest("m", toks, "", n, rng.randrange(1, 200), list(keys)) for _ in range(2)]
        d_new = new.schedule(reqs[0], new_pods)
        d_old = reference_schedule(old, reqs[1], old_pods)
        where = f"{name} seed {seed} step {step}"
        assert [c.id for c in d_new.ranked] == [c.id for c in d_old.ranked], where
        assert d_new.totals == d_old.totals, where
        assert d_new.scores == d_old.scores, where
        assert (d_new.predicted_cached_tokens, d_new.uncached_tokens) == (
            d_old.predicted_cached_tokens,
            d_old.uncached_tokens,
        ), where
        c_new, c_old = reqs[0].outputs.get(TTFTCosts), reqs[1].outputs.get(TTFTCosts)
        assert (c_new and c_new.costs) == (c_old and c_old.costs), where
        v_new, v_old = reqs[0].view, reqs[1].view
        assert v_new is not None and v_old is not None
        assert v_new.cached == v_old.cached and v_new.remembered == v_old.remembered, where
        assert v_new.precise == v_old.precise and v_new.tiers == v_old.tiers, where
        assert v_new.held == {k: h for k, h in v_old.held.items() if h}, where
        picked.add(d_new.chosen.id)
        # the same load change in both worlds: the chosen pod starts the request, a random one ends work
        for pods in (new_pods, old_pods):
            by_id = {p.id: p for p in pods}
            by_id[d_new.chosen.id].load.prefill_tokens += d_new.uncached_tokens
            by_id[d_new.chosen.id].load.requests += 1
        if step % 3 == 0:
            j = rng.randrange(n_pods)
            for pods in (new_pods, old_pods):
                pods[j].load.prefill_tokens = max(0, pods[j].load.prefill_tokens - 3000)
                pods[j].load.requests = max(0, pods[j].load.requests - 1)
    if n_pods >= 40:
        assert len(picked) > 3, "the random worlds should spread decisions over several pods"
