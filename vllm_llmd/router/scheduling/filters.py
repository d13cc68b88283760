"""Built-in filters. A filter that would leave no pod returns its input unchanged (fail open),
except ``role``, whose emptiness is a configuration error surfaced as "no pod", and ``accelerator``
with ``when_none: none``."""

from __future__ import annotations

import re
import time
from typing import Literal

from pydantic import Field, model_validator

from vllm_llmd.router.config import ACCELERATOR_PATTERN
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


_NAME = re.compile(ACCELERATOR_PATTERN)


class AcceleratorParams(Params):
    #: traffic class -> the accelerator kinds (pods' ``accelerator`` labels) that may serve it
    classes: dict[str, list[str]]
    #: model name -> traffic class, for requests without the traffic-class header
    models: dict[str, str] = Field(default_factory=dict)
    #: class of a request with neither a known header value nor a listed model (``None``: any pod)
    default_class: str | None = None
    #: when no available pod is of an allowed kind: ``any`` = every pod (fail open, as filters do),
    #: ``none`` = no pod (the request gets 503)
    when_none: Literal["any", "none"] = "any"

    @model_validator(mode="after")
    def _check(self) -> AcceleratorParams:
        if not self.classes:
            raise ValueError("classes: at least one traffic class is needed")
        for c, kinds in self.classes.items():
            bad = [k for k in [c, *kinds] if not _NAME.match(k)]
            if bad:
                raise ValueError(f"classes: {bad} are not lowercase label values ({ACCELERATOR_PATTERN})")
            if not kinds:
                raise ValueError(f"classes.{c}: no accelerator kind listed")
        unknown = sorted({c for c in self.models.values() if c not in self.classes})
        if self.default_class is not None and self.default_class not in self.classes:
            unknown.append(self.default_class)
        if unknown:
            raise ValueError(f"traffic class(es) {unknown} are not in classes ({sorted(self.classes)})")
        return self


@register("filter", "accelerator", AcceleratorParams)
class AcceleratorFilter:
    """Keep the pods whose accelerator kind serves the request's traffic class: the header
    (``traffic_class_header``, default ``x-llmd-traffic-class``) if it names a listed class, else the
    class of the request's model, else ``default_class``; a request with no class keeps every pod.
    See docs/plugins/accelerator.md."""

    def __init__(self, name: str, params: AcceleratorParams, ctx: SchedulingContext) -> None:
        self.name, self.params = name, params
        self._kinds = {c: frozenset(k) for c, k in params.classes.items()}

    def traffic_class(self, req: SchedRequest) -> str | None:
        p = self.params
        if req.traffic_class is not None and req.traffic_class in self._kinds:
            return req.traffic_class
        return p.models.get(req.model, p.default_class)

    def filter(self, req: SchedRequest, pods: list[Candidate]) -> list[Candidate]:
        c = self.traffic_class(req)
        if c is None:
            return pods
        kinds = self._kinds[c]
        keep = [p for p in pods if p.accelerator in kinds]
        if keep or self.params.when_none == "none":
            return keep
        return pods
