"""``lora-affinity``: prefer pods that already have the request's LoRA adapter loaded, and pods
with a free adapter slot over pods whose slots (``--max-loras``) are all taken.

The scores are those of llm-d's ``lora-affinity-scorer`` (the Gateway API Inference Extension's
scheduler plugin) over ``vllm:lora_requests_info`` (labels ``running_lora_adapters``,
``waiting_lora_adapters``, ``max_lora``; ``vllm/v1/metrics/loggers.py``), scraped from each pod's
``/metrics``. A request that names no adapter gets 1 everywhere. docs/plugins/lora-affinity.md.
"""

from __future__ import annotations

import time

from pydantic import Field

from vllm_llmd.router.scheduling.framework import Candidate, SchedRequest, SchedulingContext
from vllm_llmd.router.scheduling.registry import Params, register


class LoraAffinityParams(Params):
    #: the adapter is in the pod's running requests
    active_score: float = Field(default=1.0, ge=0, le=1)
    #: the pod has a free adapter slot (running + waiting adapters < max_lora)
    free_slot_score: float = Field(default=0.8, ge=0, le=1)
    #: the adapter is only in the pod's waiting requests (being loaded)
    waiting_score: float = Field(default=0.6, ge=0, le=1)
    #: every slot is taken by other adapters
    full_score: float = Field(default=0.0, ge=0, le=1)
    #: a pod whose scraped metrics are stale, or that publishes no LoRA metrics
    stale_score: float = Field(default=0.5, ge=0, le=1)


@register("scorer", "lora-affinity", LoraAffinityParams)
class LoraAffinityScorer:
    needs_metrics = True
    params: LoraAffinityParams

    def __init__(self, name: str, params: Params, ctx: SchedulingContext) -> None:
        self.name = name
        self.params = params  # type: ignore[assignment]
        self.ctx = ctx

    def score(self, req: SchedRequest, pods: list[Candidate]) -> dict[str, float]:
        if req.lora is None:
            return {p.id: 1.0 for p in pods}
        now = time.monotonic()
        return {p.id: self._one(req.lora, p, now) for p in pods}

    def _one(self, lora: str, pod: Candidate, now: float) -> float:
        m, pr = pod.metrics, self.params
        if m.max_lora is None or not m.is_fresh(self.ctx.metrics_stale_s, now):
            return pr.stale_score
        if lora in m.lora_running:
            return pr.active_score
        if lora in m.lora_waiting:
            return pr.waiting_score
        if len(m.lora_running | m.lora_waiting) < m.max_lora:
            return pr.free_slot_score
        return pr.full_score
