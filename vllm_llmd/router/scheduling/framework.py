"""Types shared by the scheduling plugins: the request as the scheduler sees it, a candidate pod,
the shared context (index, routing memory, in-flight load) and the plugin protocols."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from vllm_llmd.router.inflight import InflightTracker, PodLoad
from vllm_llmd.router.pod_metrics import PodMetrics
from vllm_llmd.router.prefix_memory import PrefixMemory


@dataclass(slots=True)
class SchedRequest:
    model: str
    #: prompt token ids (``None`` when the tokenizer is unavailable)
    token_ids: Sequence[int] | None
    #: prompt text (chat: the rendered or serialised conversation); used only without token ids
    text: str
    #: prompt length in tokens (estimated as ``len(text) / 4`` without a tokenizer)
    prompt_tokens: int
    max_tokens: int
    #: the router's own chained block keys of the prompt (see :mod:`vllm_llmd.router.prefix_memory`)
    block_keys: list[int]
    session_id: str | None = None
    lora: str | None = None
    #: per-request data computed once and shared by plugins (e.g. the prefix view)
    scratch: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Candidate:
    """A pod as the scheduler sees it: id, static traits and live state (read-only here)."""

    id: str
    prefill_speed: float
    has_events: bool
    role: str
    load: PodLoad
    metrics: PodMetrics
    capacity_blocks: int | None = None


@dataclass(slots=True)
class Decision:
    #: candidates best first (the proxy tries them in this order)
    ranked: list[Candidate]
    totals: dict[str, float]
    #: per scorer, per pod
    scores: dict[str, dict[str, float]]
    #: prefix tokens the router expects the chosen pod to hold
    predicted_cached_tokens: int
    uncached_tokens: int

    @property
    def chosen(self) -> Candidate:
        return self.ranked[0]


@dataclass
class SchedulingContext:
    """What plugins may read: the KV index (``None`` without events), the routing memory, load."""

    index: Any | None
    memory: PrefixMemory
    inflight: InflightTracker
    block_size: int
    speculative_ttl_s: float
    metrics_stale_s: float = 1.0


class Filter(Protocol):
    name: str

    def filter(self, req: SchedRequest, pods: list[Candidate]) -> list[Candidate]: ...


class Scorer(Protocol):
    name: str
    #: set by plugins that read scraped ``/metrics`` (the pool then runs its scrape loop)
    needs_metrics: bool

    def score(self, req: SchedRequest, pods: list[Candidate]) -> dict[str, float]: ...


class Picker(Protocol):
    name: str

    def rank(self, req: SchedRequest, pods: list[Candidate], totals: dict[str, float]) -> list[Candidate]: ...


class DecisionHook(Protocol):
    def on_decision(self, req: SchedRequest, chosen: Candidate) -> None: ...
