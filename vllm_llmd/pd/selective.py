"""Selective P/D among colocated pods: pull a prompt's KV from the peer that can produce it more
cheaply than the chosen decode pod can compute it.

Pure arithmetic on token counts (no HTTP, no router state). The router chooses the decode pod first
with its normal profile, then asks :func:`choose_kv_source` whether another pod should run the
prefill leg. Costs are in prompt-token equivalents, like the ``estimated-ttft`` scorer's::

    local(d)     = (uncached(d) + queued(d)) / speed(d)
    remote(q)    = (uncached(q) + queued(q)) / speed(q) + w_xfer * prompt_tokens + leg_overhead_tokens

where ``queued(p) = queued_prefill(p) + w_dec * queued_decode(p)`` (:mod:`vllm_llmd.pd.load`; the
router passes the weight its profile's cost scorer uses), and the request is disaggregated through
the peer ``q`` with the lowest ``remote(q)`` iff

1. ``uncached(d) > threshold_tokens`` (the decode pod would compute a long prompt part itself),
2. ``uncached(d) - uncached(q) >= threshold_tokens`` (``q`` holds clearly more of the prefix: the
   pull saves real compute, never just moves it), and
3. ``remote(q) < local(d)`` (the KV arrives sooner than ``d`` would compute it, queues included).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from vllm_llmd.pd.load import DECODE_TOKEN_WEIGHT, queued_tokens


@dataclass(frozen=True, slots=True)
class PodCost:
    """What one pod would have to do for this request, in tokens."""

    pod: str
    #: prompt tokens the pod does not hold (prompt minus its prefix view)
    uncached_tokens: int
    #: uncached prompt tokens of requests already routed to the pod and not yet prefilled
    queued_prefill_tokens: int = 0
    #: decode tokens still to generate on the pod
    queued_decode_tokens: int = 0
    #: relative prefill throughput (the pod's ``prefill_speed``)
    prefill_speed: float = 1.0


@dataclass(frozen=True, slots=True)
class SelectiveParams:
    #: the decode pod must face more uncached tokens than this, and the source must save at least this many
    threshold_tokens: int = 256
    #: cost of moving one prompt token's KV, relative to computing it
    transfer_token_weight: float = 0.05
    #: fixed cost (tokens) of the extra prefill leg: a round trip, one generated token, a lease
    leg_overhead_tokens: float = 128.0
    #: weight of one queued decode token (:mod:`vllm_llmd.pd.load`; the router passes the profile's)
    decode_token_weight: float = DECODE_TOKEN_WEIGHT

    def __post_init__(self) -> None:
        if self.threshold_tokens < 0 or self.transfer_token_weight < 0 or self.leg_overhead_tokens < 0:
            raise ValueError("threshold, transfer weight and leg overhead must be non-negative")
        if self.decode_token_weight < 0:
            raise ValueError("decode_token_weight must be non-negative")


@dataclass(frozen=True, slots=True)
class KVSource:
    """The decision to disaggregate: the pod that runs the prefill leg, and the costs compared."""

    pod: str
    remote_cost: float
    local_cost: float


def _queue_cost(c: PodCost, p: SelectiveParams) -> float:
    if c.prefill_speed <= 0:
        raise ValueError(f"pod {c.pod}: prefill_speed must be positive")
    queued = queued_tokens(c.queued_prefill_tokens, c.queued_decode_tokens, p.decode_token_weight)
    return (c.uncached_tokens + queued) / c.prefill_speed


def local_cost(decode: PodCost, p: SelectiveParams) -> float:
    """Tokens' worth of time until the decode pod has computed the prompt itself."""
    return _queue_cost(decode, p)


def remote_cost(source: PodCost, prompt_tokens: int, p: SelectiveParams) -> float:
    """Tokens' worth of time until ``source`` has produced the KV and it has been moved."""
    return _queue_cost(source, p) + p.transfer_token_weight * prompt_tokens + p.leg_overhead_tokens


def choose_kv_source(
    prompt_tokens: int, decode: PodCost, peers: Iterable[PodCost], params: SelectiveParams
) -> KVSource | None:
    """The peer to run the prefill leg, or ``None`` to serve the request on ``decode`` alone."""
    if prompt_tokens < 0 or decode.uncached_tokens < 0:
        raise ValueError("token counts must be non-negative")
    if decode.uncached_tokens <= params.threshold_tokens:
        return None
    local = local_cost(decode, params)
    best: KVSource | None = None
    for q in peers:
        if q.pod == decode.pod:
            continue
        if decode.uncached_tokens - q.uncached_tokens < params.threshold_tokens:
            continue
        cost = remote_cost(q, prompt_tokens, params)
        if cost < local and (best is None or cost < best.remote_cost):
            best = KVSource(q.pod, cost, local)
    return best
