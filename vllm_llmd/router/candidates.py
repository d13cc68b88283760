"""The scheduler's view of the pool: one :class:`~vllm_llmd.router.scheduling.Candidate` per pod,
built once and kept (its load is the pod's live in-flight record), refreshed only where the pod's
scraped metrics changed: rebuilding a hundred candidates per request showed in the decision time."""

from __future__ import annotations

from vllm_llmd.router.pool import Pod
from vllm_llmd.router.scheduling import Candidate


class CandidateViews:
    def __init__(self) -> None:
        self._cache: dict[str, tuple[Candidate, Pod]] = {}

    def of(self, pods: list[Pod]) -> list[Candidate]:
        cache = self._cache
        out = []
        for p in pods:
            hit = cache.get(p.id)
            if hit is None or hit[1] is not p:
                cand = Candidate(
                    id=p.id,
                    prefill_speed=p.prefill_speed,
                    has_events=p.config.events is not None,
                    role=p.role,
                    load=p.load,
                    metrics=p.metrics,
                    capacity_blocks=p.capacity_blocks,
                    prices=p.tier_prices.prices,
                )
                cache[p.id] = (cand, p)
            else:
                cand = hit[0]
                if cand.metrics is not p.metrics:
                    cand.metrics = p.metrics
                    cand.capacity_blocks = p.capacity_blocks
                    cand.prices = p.tier_prices.prices
            out.append(cand)
        return out
