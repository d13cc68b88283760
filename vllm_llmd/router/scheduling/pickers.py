"""Built-in pickers: they rank the candidates (best first) so the proxy can fall back in order."""

from __future__ import annotations

import random

from pydantic import Field

from vllm_llmd.pd.load import DECODE_TOKEN_WEIGHT
from vllm_llmd.router.scheduling.framework import Candidate, SchedRequest, SchedulingContext
from vllm_llmd.router.scheduling.registry import Params, register


class MaxScoreParams(Params):
    #: totals closer than this count as a tie
    tie_epsilon: float = Field(default=1e-9, ge=0)
    decode_token_weight: float = Field(default=DECODE_TOKEN_WEIGHT, ge=0)


@register("picker", "max-score", MaxScoreParams)
class MaxScorePicker:
    """Highest total first. Ties are broken deterministically, never at random (llm-d #2515): least
    router-tracked load (``queued_prefill + decode_token_weight * queued_decode``), then fewest
    requests in flight, then the pod picked longest ago."""

    def __init__(self, name: str, params: MaxScoreParams, ctx: SchedulingContext) -> None:
        self.name, self.params = name, params
        self._last_pick: dict[str, int] = {}
        self._n = 0

    def rank(self, req: SchedRequest, pods: list[Candidate], totals: dict[str, float]) -> list[Candidate]:
        eps = self.params.tie_epsilon
        dw = self.params.decode_token_weight
        best = max(totals.values())
        last = self._last_pick
        # sort keys built in one comprehension (a key function per pod cost ~7% of a decision over
        # 100 pods); the position breaks full ties as the stable sort did, so ``p`` is never compared.
        # Near-ties of the best score are quantised into one bucket.
        keyed = [
            (
                -best if best - (t := totals[p.id]) <= eps else -t,
                p.load.prefill_tokens + dw * p.load.decode_tokens,  # queued_tokens(...)
                p.load.requests,
                last.get(p.id, -1),
                i,
                p,
            )
            for i, p in enumerate(pods)
        ]
        keyed.sort()
        ranked = [k[5] for k in keyed]
        self._n += 1
        last[ranked[0].id] = self._n
        return ranked


class RandomParams(Params):
    seed: int | None = None


@register("picker", "weighted-random", RandomParams)
class WeightedRandomPicker:
    """Chooses with probability proportional to the total score (uniform if all are 0)."""

    def __init__(self, name: str, params: RandomParams, ctx: SchedulingContext) -> None:
        self.name = name
        self._rng = random.Random(params.seed)

    def rank(self, req: SchedRequest, pods: list[Candidate], totals: dict[str, float]) -> list[Candidate]:
        weights = [max(0.0, totals[p.id]) for p in pods]
        if sum(weights) <= 0:
            weights = [1.0] * len(pods)
        first = self._rng.choices(pods, weights=weights, k=1)[0]
        rest = sorted((p for p in pods if p is not first), key=lambda p: -totals[p.id])
        return [first, *rest]


@register("picker", "round-robin", Params)
class RoundRobinPicker:
    """Ignores scores: rotates through the candidates (the baseline of a Kubernetes Service)."""

    def __init__(self, name: str, params: Params, ctx: SchedulingContext) -> None:
        self.name = name
        self._i = 0

    def rank(self, req: SchedRequest, pods: list[Candidate], totals: dict[str, float]) -> list[Candidate]:
        ordered = sorted(pods, key=lambda p: p.id)
        k = self._i % len(ordered)
        self._i += 1
        return ordered[k:] + ordered[:k]
