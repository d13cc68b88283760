"""How many prompt tokens each pod already holds, computed once per request by the scheduler
(:attr:`~.framework.SchedRequest.view`) and read by the plugins.

* precise: the KV event index (``index.match_keys(block_keys)`` -> ``{pod: PrefixMatch}``; the
  request's block keys are the index's own, ``vllm_llmd.index.keys``), for pods that publish events;
* speculative: the router's own routing decisions younger than ``speculative_ttl_s`` (events for a
  request just routed have not arrived yet);
* approximate: for pods without events (or without a tokenizer) the routing memory, LRU-bounded.

``cached[p] = min(prompt_tokens, max(precise[p], speculative[p]))``, and ``held[p]`` splits it by
where the tokens are (the index's tier of each matched block, in prompt order; tokens beyond the
index's match, known from the routing memory only, count as the engine's own cache): what
:func:`vllm_llmd.pd.load.prefill_equivalent` prices.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from vllm_llmd.pd.load import HBM
from vllm_llmd.router.scheduling.framework import (
    Candidate,
    PrefixMatchLike,
    PrefixView,
    SchedRequest,
    SchedulingContext,
)

log = logging.getLogger(__name__)


def held_by_tier(tiers: list[str], block_size: int, cached: int) -> dict[str, int]:
    """``cached`` leading tokens split by tier: block ``i`` (``block_size`` tokens) is in
    ``tiers[i]``; tokens past the listed blocks are in the engine cache (:data:`HBM`)."""
    if not tiers or tiers.count(HBM) == len(tiers):
        return {HBM: cached} if cached > 0 else {}
    held: dict[str, int] = {}
    left = cached
    for t in tiers:
        if left <= 0:
            break
        k = block_size if left > block_size else left
        held[t] = held.get(t, 0) + k
        left -= k
    if left > 0:
        held[HBM] = held.get(HBM, 0) + left
    return held


def prefix_view(req: SchedRequest, pods: list[Candidate], ctx: SchedulingContext) -> PrefixView:
    """Per request, over every candidate; only the pods the index or the routing memory names hold
    anything, so the per-pod work is one ``dict.fromkeys`` for ``cached`` and ``remembered`` (zeros)
    plus a loop over those few pods: over 100 pods a pod-by-pod loop was ~15% of the decision
    (bench/bench_router_decision.py profiled; figures in bench/RESULTS.md). ``held`` names only pods
    that hold something (readers use ``held.get(pod, {})``)."""
    v = PrefixView()
    bs = ctx.block_size
    keys = req.block_keys
    precise_on = ctx.index is not None and req.token_ids is not None
    if precise_on:
        assert ctx.index is not None
        try:
            matches: Mapping[str, PrefixMatchLike] = ctx.index.match_keys(keys)
        except Exception:  # the index is another component: never fail a request on it
            log.exception("index match failed; using routing memory only")
            matches = {}
        for pod_id, m in matches.items():
            v.precise[pod_id] = int(m.tokens)
            v.tiers[pod_id] = list(m.tiers)
        spec = ctx.memory.match(keys, max_age_s=ctx.speculative_ttl_s)
        approx: dict[str, int] = {}
        if any(not p.has_events for p in pods):
            approx = ctx.memory.match(keys)
    else:
        spec = ctx.memory.match(keys)
        approx = spec
    ids = [p.id for p in pods]
    v.remembered = dict.fromkeys(ids, 0)
    v.cached = cached_of = dict.fromkeys(ids, 0)
    named = v.precise.keys() | spec.keys() | approx.keys() if precise_on else approx.keys()
    if not named:
        return v
    n = req.prompt_tokens
    precise, tiers, held, remembered = v.precise, v.tiers, v.held, v.remembered
    for p in pods:
        pid = p.id
        if pid not in named:
            continue
        if precise_on and p.has_events:
            rem = spec.get(pid, 0) * bs
            c = max(precise.get(pid, 0), rem)
        else:
            rem = approx.get(pid, 0) * bs
            c = rem
        remembered[pid] = rem
        cached_of[pid] = cached = min(n, c)
        if cached > 0:
            held[pid] = held_by_tier(tiers.get(pid, []) if p.has_events else [], bs, cached)
    return v
