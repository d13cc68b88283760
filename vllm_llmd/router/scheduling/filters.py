"""Built-in filters. A filter that would leave no pod returns its input unchanged (fail open),
except ``role``, whose emptiness is a configuration error surfaced as "no pod"."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import Field

from vllm_llmd.router.scheduling.framework import Candidate, SchedRequest, SchedulingContext
from vllm_llmd.router.scheduling.registry import Params, register


class RoleParams(Params):
    role: Literal["prefill", "decode", "both"] = "both"


@register("filter", "role", RoleParams)
class RoleFilter:
    """Keep pods whose role is ``role`` or ``both``."""

    def __init__(self, name: str, params: RoleParams, ctx: SchedulingContext) -> None:
        self.name, self.params = name, params

    def filter(self, req: SchedRequest, pods: list[Candidate]) -> list[Candidate]:
        r = self.params.role
        return [p for p in pods if p.role in (r, "both")]


class UtilizationParams(Params):
    max_waiting: float = Field(default=5.0, ge=0)
    max_kv_usage: float = Field(default=0.95, gt=0, le=1)


@register("filter", "utilization", UtilizationParams)
class UtilizationFilter:
    """Drop pods whose fresh scraped metrics show ``waiting > max_waiting`` or
    ``kv_usage > max_kv_usage``; fail open when that drops every pod."""

    needs_metrics = True

    def __init__(self, name: str, params: UtilizationParams, ctx: SchedulingContext) -> None:
        self.name, self.params, self.ctx = name, params, ctx

    def filter(self, req: SchedRequest, pods: list[Candidate]) -> list[Candidate]:
        now = time.monotonic()
        st = self.ctx.metrics_stale_s
        p_ = self.params
        keep = [
            p
            for p in pods
            if not p.metrics.is_fresh(st, now)
            or (p.metrics.waiting <= p_.max_waiting and p.metrics.kv_usage <= p_.max_kv_usage)
        ]
        return keep or pods


class PrefixAffinityParams(Params):
    #: keep pods holding at least this fraction of the prompt
    threshold: float = Field(default=0.8, ge=0, le=1)
    #: break stickiness when the sticky pods' queued prefill exceeds the others' by this many tokens
    max_extra_queued_tokens: float = Field(default=8192.0, ge=0)


@register("filter", "prefix-affinity", PrefixAffinityParams)
class PrefixAffinityFilter:
    """llm-d's prefix-cache-affinity-filter: keep pods with ``cached/prompt >= threshold`` unless
    none, or unless their least queued prefill exceeds the others' least by ``max_extra_queued_tokens``."""

    def __init__(self, name: str, params: PrefixAffinityParams, ctx: SchedulingContext) -> None:
        self.name, self.params, self.ctx = name, params, ctx

    def filter(self, req: SchedRequest, pods: list[Candidate]) -> list[Candidate]:
        v = req.view
        assert v is not None, "the scheduler computes the prefix view before any filter runs"
        n = max(1, req.prompt_tokens)
        sticky = [p for p in pods if v.cached.get(p.id, 0) / n >= self.params.threshold]
        if not sticky or len(sticky) == len(pods):
            return pods
        others = [p for p in pods if p not in sticky]
        best_sticky = min(p.load.prefill_tokens for p in sticky)
        best_other = min(p.load.prefill_tokens for p in others)
        if best_sticky - best_other > self.params.max_extra_queued_tokens:
            return pods
        return sticky
