"""The scheduler's view of the pool: one :class:`~vllm_llmd.router.scheduling.Candidate` per pod,
built once and kept (its load is the pod's live in-flight record), refreshed only where the pod's
scraped metrics or the learned speeds (:mod:`vllm_llmd.router.speed`) changed: rebuilding a hundred
candidates per request showed in the decision time.

A pod's KV capacity is handed to the scheduler in the router's blocks (``index.block_size`` tokens):
``capacity_blocks * pod_block_size // index.block_size``, the pod's block size from its
``vllm:cache_config_info`` (the router's when unknown), so pods with 16- and 128-token blocks
compare by tokens.

Each cached candidate remembers the version of the learned speeds it was last given: a pod left
out of some calls (unhealthy, ejected, full) gets the speeds published meanwhile when it is back.
(A view-wide version stranded a restarted pod with the slow speed learned before its crash: the
speeds were recomputed while it was down, so on its return it was never resynced; at low load
every request then went to the survivor; CI, 2026-12-03.)
"""

from __future__ import annotations

from vllm_llmd.router.pool import Pod
from vllm_llmd.router.scheduling import Candidate
from vllm_llmd.router.speed import SpeedEstimator


class CandidateViews:
    def __init__(self, block_size: int = 64, speeds: SpeedEstimator | None = None) -> None:
        #: pod id -> (its candidate, the pod it was built for, the speeds' version it was given)
        self._cache: dict[str, tuple[Candidate, Pod, int]] = {}
        self.block_size = block_size
        self.speeds = speeds

    def capacity(self, p: Pod) -> int | None:
        """The pod's KV capacity in the router's blocks."""
        tokens = p.capacity_tokens(self.block_size)
        return None if tokens is None else max(1, tokens // self.block_size)

    def of(self, pods: list[Pod]) -> list[Candidate]:
        cache = self._cache
        speeds = self.speeds
        v = speeds.refresh() if speeds is not None else 0
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
                    capacity_blocks=self.capacity(p),
                    accelerator=p.config.accelerator,
                    prices=p.tier_prices.prices,
                )
                if speeds is not None:
                    cand.prefill_speed = speeds.prefill_speed(p.id, p.prefill_speed)
                    cand.decode_speed = speeds.decode_speed(p.id, p.prefill_speed)
                cache[p.id] = (cand, p, v)
                if len(cache) > 2 * len(pods) + 16:  # pods come and go (discovery): drop the departed
                    live = {q.id for q in pods}
                    for k in [k for k in cache if k not in live]:
                        del cache[k]
            else:
                cand = hit[0]
                if cand.metrics is not p.metrics:
                    cand.metrics = p.metrics
                    cand.capacity_blocks = self.capacity(p)
                    cand.prices = p.tier_prices.prices
                if hit[2] != v and speeds is not None:
                    cand.prefill_speed = speeds.prefill_speed(p.id, p.prefill_speed)
                    cand.decode_speed = speeds.decode_speed(p.id, p.prefill_speed)
                    cache[p.id] = (cand, p, v)
            out.append(cand)
        return out
