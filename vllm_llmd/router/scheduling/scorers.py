"""Built-in scorers besides ``estimated-ttft`` (:mod:`.estimated_ttft`). Each returns a score in
[0, 1] per candidate pod (higher is better). Formulas, parameters and defaults are documented in
``docs/plugins/<type>.md``."""

from __future__ import annotations

import time

from pydantic import Field

from vllm_llmd.pd.load import DECODE_TOKEN_WEIGHT, prefill_equivalent, queued_tokens
from vllm_llmd.router.scheduling.framework import Candidate, SchedRequest, SchedulingContext
from vllm_llmd.router.scheduling.registry import Params, register
from vllm_llmd.router.scheduling.scorer_base import ScorerBase, prefix_view, tier_blind


# ---- prefix affinity ----------------------------------------------------------------------------
class PrecisePrefixParams(Params):
    #: discount a prefix found in a lower KV tier by the pod's load-back price (as ``estimated-ttft``)
    price_tiers: bool = True


@register("scorer", "precise-prefix-cache", PrecisePrefixParams)
class PrecisePrefixScorer(ScorerBase):
    """``(prompt_tokens - prefill_equivalent(p)) / prompt_tokens`` for pods with KV events: the
    share of the prompt the pod need not prefill, a lower-tier token counting ``1 - price``
    (cached tokens from the KV event index plus speculative entries for requests just routed)."""

    params: PrecisePrefixParams

    def __init__(self, name: str, params: Params, ctx: SchedulingContext) -> None:
        super().__init__(name, params, ctx)
        self.prices_tiers = self.params.price_tiers

    def score(self, req: SchedRequest, pods: list[Candidate]) -> dict[str, float]:
        v = prefix_view(req)
        n = max(1, req.prompt_tokens)
        out = {}
        for p in pods:
            if not p.has_events:
                out[p.id] = 0.0
                continue
            held = v.held.get(p.id, {})
            if not self.prices_tiers:
                held = tier_blind(held)
            out[p.id] = min(1.0, max(0.0, n - prefill_equivalent(n, held, p.prices)) / n)
        return out


class ApproxPrefixParams(Params):
    pass


@register("scorer", "approx-prefix-cache", ApproxPrefixParams)
class ApproxPrefixScorer(ScorerBase):
    """Matched leading blocks / prompt blocks, from the router's own routing decisions (per-pod LRU)."""

    def score(self, req: SchedRequest, pods: list[Candidate]) -> dict[str, float]:
        total = len(req.block_keys)
        if total == 0:
            return {p.id: 0.0 for p in pods}
        m = self.ctx.memory.match(req.block_keys)
        return {p.id: m.get(p.id, 0) / total for p in pods}


# ---- load -------------------------------------------------------------------------------------
class InflightParams(Params):
    #: tokens of outstanding work at which the score halves
    scale_tokens: float = Field(default=4096.0, gt=0)
    decode_token_weight: float = Field(default=DECODE_TOKEN_WEIGHT, ge=0)


@register("scorer", "inflight-load", InflightParams)
class InflightLoadScorer(ScorerBase):
    """``1 / (1 + (queued_prefill + decode_token_weight * queued_decode) / scale_tokens)`` from the
    router's own in-flight tracking."""

    params: InflightParams

    def score(self, req: SchedRequest, pods: list[Candidate]) -> dict[str, float]:
        s, dw = self.params.scale_tokens, self.params.decode_token_weight
        return {p.id: 1.0 / (1.0 + queued_tokens(p.load.prefill_tokens, p.load.decode_tokens, dw) / s) for p in pods}


class ScrapedParams(Params):
    #: score given to a pod whose scraped metrics are stale
    stale_score: float = Field(default=0.5, ge=0, le=1)


def _min_max_low_is_good(values: dict[str, float]) -> dict[str, float]:
    lo, hi = min(values.values()), max(values.values())
    if hi - lo <= 1e-12:
        return {k: 1.0 for k in values}
    return {k: (hi - v) / (hi - lo) for k, v in values.items()}


class _ScrapedScorer(ScorerBase):
    needs_metrics = True
    params: ScrapedParams
    attr = ""

    def score(self, req: SchedRequest, pods: list[Candidate]) -> dict[str, float]:
        now = time.monotonic()
        stale_after = self.ctx.metrics_stale_s
        fresh = {p.id: float(getattr(p.metrics, self.attr)) for p in pods if p.metrics.is_fresh(stale_after, now)}
        out = {p.id: self.params.stale_score for p in pods}
        if fresh:
            out.update(self.normalise(fresh))
        return out

    def normalise(self, values: dict[str, float]) -> dict[str, float]:
        return _min_max_low_is_good(values)


@register("scorer", "queue-depth", ScrapedParams)
class QueueDepthScorer(_ScrapedScorer):
    """Min-max over ``vllm:num_requests_waiting`` (fewest waiting -> 1)."""

    attr = "waiting"


@register("scorer", "running-requests", ScrapedParams)
class RunningRequestsScorer(_ScrapedScorer):
    """Min-max over ``vllm:num_requests_running`` (fewest running -> 1)."""

    attr = "running"


@register("scorer", "kv-cache-usage", ScrapedParams)
class KVCacheUsageScorer(_ScrapedScorer):
    """``1 - vllm:kv_cache_usage_perc``."""

    attr = "kv_usage"

    def normalise(self, values: dict[str, float]) -> dict[str, float]:
        return {k: min(1.0, max(0.0, 1.0 - v)) for k, v in values.items()}


# ---- session affinity ---------------------------------------------------------------------------
class SessionParams(Params):
    ttl_s: float = Field(default=300.0, gt=0)
    max_sessions: int = Field(default=100_000, ge=1)


@register("scorer", "session-affinity", SessionParams)
class SessionAffinityScorer(ScorerBase):
    """1 for the pod that served the request's session (header, default ``x-session-id``) within
    ``ttl_s``, else 0."""

    params: SessionParams

    def __init__(self, name: str, params: Params, ctx: SchedulingContext) -> None:
        super().__init__(name, params, ctx)
        self._sessions: dict[str, tuple[str, float]] = {}

    def score(self, req: SchedRequest, pods: list[Candidate]) -> dict[str, float]:
        out = {p.id: 0.0 for p in pods}
        if req.session_id is None:
            return out
        hit = self._sessions.get(req.session_id)
        if hit is not None and time.monotonic() - hit[1] <= self.params.ttl_s and hit[0] in out:
            out[hit[0]] = 1.0
        return out

    def pre_request(self, req: SchedRequest, pod: str) -> None:
        if req.session_id is None:
            return
        s = self._sessions
        s.pop(req.session_id, None)
        s[req.session_id] = (pod, time.monotonic())
        while len(s) > self.params.max_sessions:
            s.pop(next(iter(s)))
