"""How many prompt tokens each pod already holds, computed once per request and shared by plugins.

* precise: the KV event index (``index.match(model, token_ids, lora)`` -> ``{pod: PrefixMatch}``),
  for pods that publish events;
* speculative: the router's own routing decisions younger than ``speculative_ttl_s`` (events for a
  request just routed have not arrived yet);
* approximate: for pods without events (or without a tokenizer) the routing memory, LRU-bounded.

``cached[p] = min(prompt_tokens, max(precise[p], speculative[p]))``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from vllm_llmd.router.scheduling.framework import Candidate, SchedRequest, SchedulingContext

log = logging.getLogger(__name__)

DEFAULT_TIER_WEIGHTS = {"gpu": 1.0, "cpu": 0.8, "disk": 0.5, "storage": 0.3}


@dataclass(slots=True)
class PrefixView:
    #: best estimate of cached prompt tokens per pod
    cached: dict[str, int] = field(default_factory=dict)
    #: from the index only
    precise: dict[str, int] = field(default_factory=dict)
    #: tiers of the index match per pod (as the index reports them)
    tiers: dict[str, list[str]] = field(default_factory=dict)
    #: from the routing memory only (tokens)
    remembered: dict[str, int] = field(default_factory=dict)


def tier_weight(tiers: list[str], weights: dict[str, float]) -> float:
    """Mean weight of the matched blocks; ``tiers`` holds each block's best tier (unknown tiers: 1.0)."""
    if not tiers:
        return 1.0
    return sum(weights.get(t.lower(), 1.0) for t in tiers) / len(tiers)


def prefix_view(req: SchedRequest, pods: list[Candidate], ctx: SchedulingContext) -> PrefixView:
    v = req.scratch.get("prefix_view")
    if v is not None:
        return v
    v = PrefixView()
    bs = ctx.block_size
    keys = req.block_keys
    precise_on = ctx.index is not None and req.token_ids is not None
    if precise_on:
        try:
            if hasattr(ctx.index, "match_keys"):  # the request's keys are the index's own keys
                matches: dict[str, Any] = ctx.index.match_keys(keys)
            else:
                matches = ctx.index.match(req.model, req.token_ids, lora=req.lora)
        except Exception:  # the index is another component: never fail a request on it
            log.exception("index match failed; using routing memory only")
            matches = {}
        for pod_id, m in matches.items():
            v.precise[pod_id] = int(getattr(m, "tokens", 0))
            v.tiers[pod_id] = list(getattr(m, "tiers", []) or [])
        spec = ctx.memory.match(keys, max_age_s=ctx.speculative_ttl_s)
        approx = None
        if any(not p.has_events for p in pods):
            approx = ctx.memory.match(keys)
    else:
        spec = ctx.memory.match(keys)
        approx = spec
    n = req.prompt_tokens
    for p in pods:
        if precise_on and p.has_events:
            rem = spec.get(p.id, 0) * bs
            c = max(v.precise.get(p.id, 0), rem)
        else:
            rem = (approx or {}).get(p.id, 0) * bs
            c = rem
        v.remembered[p.id] = rem
        v.cached[p.id] = min(n, c)
    req.scratch["prefix_view"] = v
    return v
