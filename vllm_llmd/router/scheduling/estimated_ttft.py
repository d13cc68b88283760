"""The ``estimated-ttft`` scorer: each pod's cost in tokens of serving the request (queue, prefill of
what it does not hold, balance, capacity, and with ``peer_loads`` the cheapest peer-load plan).
Formula, parameters and defaults: ``docs/plugins/estimated-ttft.md``; the docstring below."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from vllm_llmd.pd.evict import NOTHING, Eviction, duplicate_price, eviction_price
from vllm_llmd.pd.load import DECODE_TOKEN_WEIGHT, HBM, MEDIUM_CPU, prefill_equivalent
from vllm_llmd.pd.peer import PeerPlan, peer_plan
from vllm_llmd.router.scheduling.epochs import EpochWatch
from vllm_llmd.router.scheduling.footprint import LAST_USE_DEFAULT_LIMIT, KVFootprint, LastUse
from vllm_llmd.router.scheduling.framework import Candidate, PrefixView, SchedRequest, SchedulingContext
from vllm_llmd.router.scheduling.registry import Params, register
from vllm_llmd.router.scheduling.scorer_base import ScorerBase, prefix_view


@dataclass(frozen=True, slots=True)
class TTFTCosts:
    """What ``estimated-ttft`` produces besides its scores: each pod's cost in tokens."""

    costs: dict[str, float]


@dataclass(frozen=True, slots=True)
class PeerPlans:
    """With ``peer_loads``: per pod, its cheapest plan (:func:`vllm_llmd.pd.peer.peer_plan`), and per
    holder engine id its side channel and block size (what the router's peer-load params name)."""

    plans: dict[str, PeerPlan]
    holders: dict[str, tuple[str, int, int, int]]  # engine id -> (host, port, block size, tokens held)


def peer_offers(v: PrefixView, pods: list[Candidate], block_size: int) -> dict[str, tuple[str, int]]:
    """Pods that can serve a peer load of this prompt: pod id -> (engine id, leading prompt tokens it
    holds in its engine cache or DRAM tier, per the KV-event index; docs/peer-loading.md)."""
    out: dict[str, tuple[str, int]] = {}
    for x in pods:
        ep = x.metrics.kv_endpoint
        if ep is None or not x.has_events:
            continue
        lead = 0
        for t in v.tiers.get(x.id, []):
            if t not in (HBM, MEDIUM_CPU):
                break
            lead += 1
        tokens = min(lead * block_size, v.precise.get(x.id, 0))
        if tokens > 0:
            out[x.id] = (ep[0], tokens)
    return out


# ---- cost model ---------------------------------------------------------------------------------
class EstimatedTTFTParams(Params):
    #: weight of one outstanding decode token relative to one prefill token (vllm_llmd.pd.load)
    decode_token_weight: float = Field(default=DECODE_TOKEN_WEIGHT, ge=0)
    #: with learned speeds: add this times the request's *own* decode time on the pod, in prefill
    #: tokens of a speed-1 pod: ``max_tokens * decode_price / decode_speed(p)`` (decode_price:
    #: vllm_llmd.router.speed.SpeedEstimator.decode_price). A TTFT cost does not see a pod whose
    #: answers stream slowly (its decodes stalled behind the prefills it holds); 0 = off
    decode_time_weight: float = Field(default=0.0, ge=0)
    #: each request in flight on the pod (sent, not finished: prefilling or decoding) counted as this
    #: many prefill tokens. Sessions stick to the pod holding their history, so which sessions are
    #: active decides how the requests in flight split; this prices a crowded pod so that a session
    #: with a short history moves when one pod carries most of them. Measured on multiturn: it evens
    #: the split and gains no throughput, with or without peer loads (bench/RESULTS.md, "Sessions in
    #: flight: evening them out"); experimental, 0 = off
    request_weight: float = Field(default=0.0, ge=0)
    #: weight of the uncached part of *this* request (Dynamo's overlap weight); 4: a request leaves
    #: the pod holding its prefix when that pod's queue is ~4 of its prompts longer (2 until
    #: 2026-12-04: spills re-prefilled prefixes, 0.84-0.91x the static oracle; bench/RESULTS.md,
    #: "Issue 12: ours against the oracle on hotprefix, taken apart")
    prefill_weight: float = Field(default=4.0, ge=0)
    #: smoothing constant (tokens) of the normalisation ``(min + c) / (cost + c)``
    smoothing_tokens: float = Field(default=64.0, gt=0)
    #: how much more placing *new* KV (uncached tokens) costs on a pod per unit of relative excess
    #: of its recent KV footprint over its fair share (``prefill_speed`` share), the excess capped at
    #: 1 (0 = place by instantaneous queue only)
    balance_weight: float = Field(default=8.0, ge=0)
    #: the pool's footprint counts as at least this many of the request's own prompts per pod when
    #: the shares are computed (0 = the footprint as it is): before the pool holds that much there
    #: are no shares to balance, and the cost (queue / speed) places new prefixes
    balance_min_prompts: float = Field(default=2.0, ge=0)
    #: tokens charged per block token by which placing this request's uncached blocks would push
    #: the pod's hot footprint over ``capacity_fraction`` of its KV capacity (0 = ignore capacity;
    #: needs the capacity: pod config or ``vllm:cache_config_info``)
    capacity_weight: float = Field(default=2.0, ge=0)
    capacity_fraction: float = Field(default=0.9, gt=0, le=1)
    #: decisions the footprints are counted over
    footprint_window: int = Field(default=128, ge=1)
    #: price a prefix found in a lower KV tier (DRAM, disk) by what loading it back costs on the
    #: pod (learned per pod and tier, vllm_llmd.pd.load.TokenPrices); false: as if in the engine cache
    price_tiers: bool = True
    #: price a third option per pod: load the rest of the prefix from a peer's DRAM tier
    #: (vllm_llmd.pd.peer.peer_plan, docs/peer-loading.md); the router then sends the chosen pod the
    #: peer-load params. Needs engines with tiers reporting llmd:kv_endpoint_info and KV events.
    peer_loads: bool = False
    #: with ``peer_loads``: tokens charged per token of the fleet's last copy a load's new blocks
    #: would evict on the reader, or per token of its copy beyond the fleet's duplicate budget,
    #: whichever is more (vllm_llmd.pd.evict; replaces the capacity term for plans that load; 1 =
    #: the evicted block is prefilled once more; 0 = loads pay the capacity term instead)
    evict_weight: float = Field(default=1.0, ge=0)


@register("scorer", "estimated-ttft", EstimatedTTFTParams)
class EstimatedTTFTScorer(ScorerBase):
    """Cost in tokens of serving the request on each pod, lower is better:

    ``cost(p) = (prefill_weight * (1 + balance_weight * min(1, excess(p))) * priced(p)
    + capacity_weight * block_size * overflow(p) + queued_prefill(p) + request_weight * requests(p))
    / prefill_speed(p)
    + (decode_token_weight * queued_decode(p) + decode_time_weight * max_tokens * decode_price)
    / decode_speed(p)``; ``priced(p)`` is
    :func:`vllm_llmd.pd.load.prefill_equivalent` of the prompt on ``p`` (engine-cache hits free,
    lower-tier hits at the pod's load-back price, misses 1);
    ``score(p) = (min_q cost(q) + c) / (cost(p) + c)``. ``excess(p)``: how far the pod's share of
    the recent KV footprint exceeds its fair share, relative (the pool's footprint counted as at
    least ``balance_min_prompts`` of this prompt per pod); ``overflow(p)``: blocks by which this
    request would push the pod's hot footprint over its capacity (at most its own uncached blocks).
    See docs/plugins/estimated-ttft.md.
    """

    params: EstimatedTTFTParams

    def __init__(self, name: str, params: Params, ctx: SchedulingContext) -> None:
        super().__init__(name, params, ctx)
        self.prices_tiers = self.params.price_tiers
        self._footprint = KVFootprint(self.params.footprint_window)
        self._epochs = EpochWatch()
        #: with peer loads priced by what they evict: each pod's blocks, least recently routed first,
        #: and how many keys to keep per pod (twice its capacity, once known)
        self._last_use = LastUse() if self.params.peer_loads and self.params.evict_weight > 0 else None
        self._limits: dict[str, int] = {}

    def costs(self, req: SchedRequest, pods: list[Candidate]) -> dict[str, float]:
        # One pass over the pods with everything per request hoisted out of it; a pod holding
        # nothing of the prompt (most of them) skips the tier pricing. Same arithmetic, in the same
        # order, as the formula above (tests/unit/test_sched_fastpath.py holds it to the plain
        # per-pod version): this loop was ~25% of a decision over 100 pods (bench/RESULTS.md).
        v = prefix_view(req)
        prm = self.params
        pw, dw, bw, cw = prm.prefill_weight, prm.decode_token_weight, prm.balance_weight, prm.capacity_weight
        rw = prm.request_weight
        n = req.prompt_tokens
        bs = self.ctx.block_size
        self._sync_epochs()
        fp = self._footprint
        shares: list[float] | None = None  # per pod: its footprint's excess over its fair share
        if bw > 0 and len(pods) > 1:
            speed = sum(p.prefill_speed for p in pods)
            floor = prm.balance_min_prompts * len(req.block_keys) * len(pods)
            shares = fp.excess_of([p.id for p in pods], [p.prefill_speed / speed for p in pods], floor)
        out = {}
        tiered = prm.price_tiers
        held_of, cached_of = v.held, v.cached
        capacity_on = cw > 0
        cap_frac = prm.capacity_fraction
        n_miss = max(0, n)  # every token a miss: prefill_equivalent(n, {}) = 0.0 + miss * n_miss
        offers = peer_offers(v, pods, bs) if prm.peer_loads and tiered else {}
        # the request's own decode, per unit of 1 / decode_speed(p) (0: off or not learned yet)
        own_decode = 0.0
        if prm.decode_time_weight > 0 and self.ctx.speeds is not None:
            price = self.ctx.speeds.decode_price()
            if price is not None:
                own_decode = prm.decode_time_weight * req.max_tokens * price
        plans: dict[str, PeerPlan] = {}
        lu = self._last_use
        fleet: tuple[int, int, int] | None = None  # (duplicates, capacity, hot) once a plan loads
        for i, p in enumerate(pods):
            pid = p.id
            if tiered:
                held = held_of.get(pid)
                if held:
                    priced = prefill_equivalent(n, held, p.prices)
                    uncached = n - held.get(HBM, 0)  # blocks the engine allocates
                else:
                    priced = 0.0 + p.prices.miss * n_miss
                    uncached = n
            else:
                c = cached_of.get(pid, 0)
                priced = uncached = n - c
            loads = False
            if offers:
                others = {e: t for x, (e, t) in offers.items() if x != pid}
                plan = plans[pid] = peer_plan(n, held_of.get(pid) or {}, others, p.prices, block_size=bs)
                priced = plan.cost
                loads = plan.peer is not None and lu is not None
            ex = shares[i] if shares is not None else 0.0
            cost = pw * (1.0 + bw * (ex if ex < 1.0 else 1.0)) * priced
            if loads:  # what the load's copy evicts on p, instead of the capacity term
                if fleet is None:
                    fleet = self._fleet(pods)
                cost += max(self.eviction(req, p).tokens, self._duplicate(plan.tokens // bs, fleet))
            elif capacity_on and p.capacity_blocks and uncached > 0:
                room = cap_frac * p.capacity_blocks - fp.hot_blocks(pid)
                new_blocks = -(-uncached // bs)
                over = new_blocks - room
                if over > 0:  # at most the request's own new blocks: a hit adds none
                    cost += cw * (over if over < new_blocks else new_blocks) * bs
            ps = p.prefill_speed
            ld = p.load
            queued = ld.prefill_tokens + rw * ld.requests
            out[pid] = cost / ps + (queued / ps + (dw * ld.decode_tokens + own_decode) / p.decode_speed)
        if plans:
            by_id = {x.id: x for x in pods}
            holders = {}
            for x, (e, t) in offers.items():
                ep, xbs = by_id[x].metrics.kv_endpoint, by_id[x].metrics.block_size
                if ep is not None and xbs:
                    holders[e] = (ep[1], ep[2], xbs, t)
            req.outputs.put(PeerPlans(plans, holders))
        return out

    def eviction(self, req: SchedRequest, p: Candidate) -> Eviction:
        """:func:`vllm_llmd.pd.evict.eviction_price` of loading this prompt onto ``p``: ``held(p)``
        from the index (engine blocks in any tier, in the router's blocks), the prompt's whole blocks
        ``p`` does not hold as new, ``p``'s blocks in least-recently-routed order as the victims."""
        index, lu, cap = self.ctx.index, self._last_use, p.capacity_blocks
        if index is None or lu is None or not cap:
            return NOTHING
        self._limits[p.id] = 2 * cap
        bs = self.ctx.block_size
        held = prefix_view(req).held.get(p.id)
        new = len(req.block_keys) - (sum(held.values()) // bs if held else 0)
        free = cap - self._held_blocks(p)
        if new <= free:
            return NOTHING
        walk = lu.walk(p.id, index, set(req.block_keys))  # the prompt's own blocks: touched, kept
        try:
            return eviction_price(new, free, walk, bs, self.params.evict_weight)
        finally:
            walk.close()

    def _fleet(self, pods: list[Candidate]) -> tuple[int, int, int]:
        """``(dup, capacity, hot)`` of :func:`vllm_llmd.pd.evict.duplicate_price`, in the router's
        blocks: what the index shows held beyond one copy, the candidates' summed capacity, the
        fleet's hot set (:meth:`LastUse.fleet_hot`, over that capacity's worth of recent keys). A
        pod whose capacity is not known yet leaves the capacity unbounded (no duplicate price)."""
        index, lu = self.ctx.index, self._last_use
        if index is None or lu is None or any(not p.capacity_blocks for p in pods):
            return 0, 1 << 62, 0
        held = sum(self._held_blocks(p) for p in pods)
        dup = max(0, held - index.distinct_blocks())
        cap = sum(p.capacity_blocks for p in pods)
        lu.fleet_limit = cap
        return dup, cap, lu.fleet_hot()

    def _held_blocks(self, p: Candidate) -> int:
        """What the index records on ``p`` in any tier, in the router's blocks (index set)."""
        bs = self.ctx.block_size
        assert self.ctx.index is not None
        return self.ctx.index.blocks_held(p.id) * (p.metrics.block_size or bs) // bs

    def _duplicate(self, loaded_blocks: int, fleet: tuple[int, int, int]) -> float:
        dup, cap, hot = fleet
        return duplicate_price(loaded_blocks, dup, cap, hot, self.ctx.block_size, self.params.evict_weight)

    def _sync_epochs(self) -> None:
        """A pod the event index saw drop everything (cache cleared, restart) starts its footprint
        (and its last-use order) again from nothing."""
        lu = self._last_use
        known = self._footprint.pods() if lu is None else [*self._footprint.pods(), *lu.pods()]
        for pod in self._epochs.dropped(self.ctx.index, known):
            self._footprint.forget(pod)
            if lu is not None:
                lu.forget(pod)

    def pre_request(self, req: SchedRequest, pod: str) -> None:
        if req.block_keys:
            self._footprint.record(pod, req.block_keys)
            if self._last_use is not None:
                self._last_use.touch(pod, req.block_keys, self._limits.get(pod, LAST_USE_DEFAULT_LIMIT))

    def score(self, req: SchedRequest, pods: list[Candidate]) -> dict[str, float]:
        costs = self.costs(req, pods)
        req.outputs.put(TTFTCosts(costs))
        lo = min(costs.values())
        c = self.params.smoothing_tokens
        return {k: (lo + c) / (v + c) for k, v in costs.items()}
