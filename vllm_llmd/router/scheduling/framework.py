"""Types shared by the scheduling plugins: the request as the scheduler sees it, a candidate pod,
the shared context (index, routing memory, in-flight load) and the plugin protocols the scheduler
holds.

Per request the scheduler computes the prefix view once (:attr:`SchedRequest.view`), runs filters
-> scorers -> picker, then the :class:`PreRequest` hooks for the chosen pod. The proxy runs the
:class:`PreRequest` hooks for any other pod it tries, and the :class:`PostResponse` hooks when each
try ends: llm-d's ``PreRequest`` / ``PostResponse`` plugin points. Plugins hand what they compute to
later stages as typed values in :attr:`SchedRequest.outputs`, never under string keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

from vllm_llmd.pd.load import DECODE_TOKEN_WEIGHT, DEFAULT_PRICES, TokenPrices
from vllm_llmd.router.inflight import InflightTracker, PodLoad
from vllm_llmd.router.pod_metrics import PodMetrics
from vllm_llmd.router.prefix_memory import PrefixMemory

T = TypeVar("T")


class PrefixMatchLike(Protocol):
    #: leading prompt tokens the pod holds
    tokens: int
    #: the tier of each matched block
    tiers: list[str]


class PrefixIndex(Protocol):
    """What the scheduler reads of the KV event index (``vllm_llmd.index.KVBlockIndex``)."""

    def match_keys(self, keys: Sequence[int]) -> Mapping[str, PrefixMatchLike]: ...

    def pods(self) -> list[str]: ...

    def epochs_total(self) -> int: ...

    def epoch(self, pod: str) -> int: ...

    # read only with estimated-ttft's peer_loads (what a load's copy evicts: vllm_llmd.pd.evict)
    def blocks_held(self, pod: str) -> int: ...

    def distinct_blocks(self) -> int: ...

    def sharing(self, pod: str, keys: Sequence[int]) -> list[int]: ...


@dataclass(slots=True)
class PrefixView:
    """How many prompt tokens each pod already holds (:mod:`.prefix_view`)."""

    #: best estimate of cached prompt tokens per pod
    cached: dict[str, int] = field(default_factory=dict)
    #: from the index only
    precise: dict[str, int] = field(default_factory=dict)
    #: tiers of the index match per pod (as the index reports them)
    tiers: dict[str, list[str]] = field(default_factory=dict)
    #: cached prompt tokens per pod by where they are (medium -> tokens, summing to ``cached``):
    #: the index's tier of each matched block; tokens only the routing memory knows count as ``GPU``;
    #: pods holding nothing are absent (read it with ``held.get(pod, {})``)
    held: dict[str, dict[str, int]] = field(default_factory=dict)
    #: from the routing memory only (tokens)
    remembered: dict[str, int] = field(default_factory=dict)


class PluginOutputs:
    """What plugins produced for one request, by type: ``put(Costs(...))``, ``get(Costs)``."""

    __slots__ = ("_by_type",)

    def __init__(self) -> None:
        self._by_type: dict[type, Any] = {}

    def put(self, value: object) -> None:
        self._by_type[type(value)] = value

    def get(self, kind: type[T]) -> T | None:
        return self._by_type.get(kind)


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
    #: the prompt's chained block keys (``vllm_llmd.index.keys``; the first ``max_prompt_blocks``)
    block_keys: list[int]
    session_id: str | None = None
    lora: str | None = None
    #: the request's traffic class (header ``traffic_class_header``), for the ``accelerator`` filter
    traffic_class: str | None = None
    #: set by the scheduler before any plugin runs
    view: PrefixView | None = None
    outputs: PluginOutputs = field(default_factory=PluginOutputs)


@dataclass(slots=True)
class Candidate:
    """A pod as the scheduler sees it: id, static traits and live state (read-only here)."""

    id: str
    #: relative prefill speed: learned from the pod's answers, the configured one as prior
    #: (``vllm_llmd.router.speed``)
    prefill_speed: float
    has_events: bool
    role: str
    load: PodLoad
    metrics: PodMetrics
    #: KV capacity in the router's blocks (``index.block_size`` tokens), whatever the pod's block size
    capacity_blocks: int | None = None
    #: relative decode speed (learned; 1.0 until known)
    decode_speed: float = 1.0
    #: accelerator kind label (``PodConfig.accelerator``)
    accelerator: str | None = None
    #: what a prompt token costs this pod by where it finds it (learned: vllm_llmd.router.tier_prices)
    prices: TokenPrices = DEFAULT_PRICES


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

    index: PrefixIndex | None
    memory: PrefixMemory
    inflight: InflightTracker
    block_size: int
    speculative_ttl_s: float
    metrics_stale_s: float = 1.0
    #: the weight of a queued decode token in the profile's cost (:mod:`vllm_llmd.pd.load`)
    decode_token_weight: float = DECODE_TOKEN_WEIGHT
    #: the pods' learned speeds (``vllm_llmd.router.speed.SpeedEstimator``, a ``PostResponse`` hook
    #: every scheduler on this context runs); ``None``: configured speeds only
    speeds: Any = None


@runtime_checkable
class Filter(Protocol):
    name: str

    def filter(self, req: SchedRequest, pods: list[Candidate]) -> list[Candidate]: ...


@runtime_checkable
class Scorer(Protocol):
    name: str
    #: set by plugins that read scraped ``/metrics`` (the pool then runs its scrape loop)
    needs_metrics: bool

    def score(self, req: SchedRequest, pods: list[Candidate]) -> dict[str, float]: ...


@runtime_checkable
class Picker(Protocol):
    name: str

    def rank(self, req: SchedRequest, pods: list[Candidate], totals: dict[str, float]) -> list[Candidate]: ...


@runtime_checkable
class PreRequest(Protocol):
    """Runs when a request is sent to a pod (the scheduler's choice, or a retry elsewhere)."""

    def pre_request(self, req: SchedRequest, pod: str) -> None: ...


@runtime_checkable
class PostResponse(Protocol):
    """Runs when a try of a request on a pod has ended (answered, failed or abandoned)."""

    def post_response(self, req: SchedRequest, pod: str) -> None: ...


@runtime_checkable
class Decider(Protocol):
    """The P/D choice (llm-d's P/D decider): which pods may run a request's prefill leg."""

    name: str

    def active(self, prefill: list[Candidate]) -> bool:
        """Whether P/D applies to this pool at all (its outcomes are counted)."""
        ...

    def sources(
        self, req: SchedRequest, decision: Decision, decode: list[Candidate], prefill: list[Candidate]
    ) -> list[Candidate] | None:
        """Pods for the prefill leg (the prefill profile ranks them), or ``None``: serve colocated."""
        ...
