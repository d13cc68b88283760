"""The scheduler's per-pod hot path as it was before the fast path (commit 6da6460), kept here only
as the reference ``tests/unit/test_sched_fastpath.py`` compares the shipped code against: the
prefix view, ``estimated-ttft``'s costs, the footprint's excess, the ``max-score`` ranking and the
scheduler's weighted totals, written the straightforward way (one dict entry and one call per pod)."""

from __future__ import annotations

from collections.abc import Mapping

from vllm_llmd.pd.load import HBM, prefill_equivalent, queued_time, queued_tokens
from vllm_llmd.router.scheduling.estimated_ttft import EstimatedTTFTScorer, TTFTCosts
from vllm_llmd.router.scheduling.framework import (
    Candidate,
    Decision,
    PrefixMatchLike,
    PrefixView,
    SchedRequest,
    SchedulingContext,
)
from vllm_llmd.router.scheduling.pickers import MaxScorePicker
from vllm_llmd.router.scheduling.prefix_view import held_by_tier
from vllm_llmd.router.scheduling.profile import Scheduler


def prefix_view(req: SchedRequest, pods: list[Candidate], ctx: SchedulingContext) -> PrefixView:
    v = PrefixView()
    bs = ctx.block_size
    keys = req.block_keys
    precise_on = ctx.index is not None and req.token_ids is not None
    if precise_on:
        assert ctx.index is not None
        matches: Mapping[str, PrefixMatchLike] = ctx.index.match_keys(keys)
        for pod_id, m in matches.items():
            v.precise[pod_id] = int(m.tokens)
            v.tiers[pod_id] = list(m.tiers)
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
        v.cached[p.id] = cached = min(n, c)
        v.held[p.id] = held_by_tier(v.tiers.get(p.id, []) if p.has_events else [], bs, cached)
    return v


def excess(fp_pods: dict, fair: dict[str, float], min_total: float = 0.0) -> dict[str, float]:
    fp = {p: len(fp_pods.get(p, ())) for p in fair}
    total = sum(fp.values())
    if total <= 0:
        return dict.fromkeys(fair, 0.0)
    total = max(total, min_total)
    return {p: (max(0.0, fp[p] / (total * f) - 1.0) if f > 0 else 0.0) for p, f in fair.items()}


def ttft_costs(self: EstimatedTTFTScorer, req: SchedRequest, pods: list[Candidate]) -> dict[str, float]:
    v = req.view
    assert v is not None
    prm = self.params
    pw, dw, bw, cw = prm.prefill_weight, prm.decode_token_weight, prm.balance_weight, prm.capacity_weight
    n = req.prompt_tokens
    bs = self.ctx.block_size
    self._sync_epochs()
    ex: dict[str, float] = {}
    if bw > 0 and len(pods) > 1:
        speed = sum(p.prefill_speed for p in pods)
        floor = prm.balance_min_prompts * len(req.block_keys) * len(pods)
        ex = excess(self._footprint._pods, {p.id: p.prefill_speed / speed for p in pods}, floor)
    out = {}
    tiered = prm.price_tiers
    for p in pods:
        held = v.held.get(p.id, {})
        priced = prefill_equivalent(n, held, p.prices) if tiered else n - v.cached.get(p.id, 0)
        uncached = n - (held.get(HBM, 0) if tiered else v.cached.get(p.id, 0))
        ld = p.load
        cost = pw * (1.0 + bw * min(1.0, ex.get(p.id, 0.0))) * priced
        if cw > 0 and p.capacity_blocks and uncached > 0:
            room = prm.capacity_fraction * p.capacity_blocks - self._footprint.hot_blocks(p.id)
            over = min(-(-uncached // bs), -(-uncached // bs) - room)
            if over > 0:
                cost += cw * over * bs
        ps = p.prefill_speed
        queued = ld.prefill_tokens + prm.request_weight * ld.requests
        out[p.id] = cost / ps + queued_time(queued, ld.decode_tokens, dw, ps, p.decode_speed)
    return out


def ttft_score(self: EstimatedTTFTScorer, req: SchedRequest, pods: list[Candidate]) -> dict[str, float]:
    costs = ttft_costs(self, req, pods)
    req.outputs.put(TTFTCosts(costs))
    lo = min(costs.values())
    c = self.params.smoothing_tokens
    return {k: (lo + c) / (v + c) for k, v in costs.items()}


def rank(self: MaxScorePicker, req: SchedRequest, pods: list[Candidate], totals: dict[str, float]) -> list[Candidate]:
    eps = self.params.tie_epsilon
    dw = self.params.decode_token_weight
    best = max(totals.values())
    last = self._last_pick

    def key(p: Candidate) -> tuple[float, float, int, int]:
        t = totals[p.id]
        bucket = -best if best - t <= eps else -t
        load = queued_tokens(p.load.prefill_tokens, p.load.decode_tokens, dw)
        return (bucket, load, p.load.requests, last.get(p.id, -1))

    ranked = sorted(pods, key=key)
    self._n += 1
    last[ranked[0].id] = self._n
    return ranked


def schedule(self: Scheduler, req: SchedRequest, pods: list[Candidate]) -> Decision:
    """``Scheduler.schedule`` before the fast path, with the reference plugins above."""
    req.view = view = prefix_view(req, pods, self.ctx)
    cands = pods
    for f in self.filters:
        cands = f.filter(req, cands)
    totals = {p.id: 0.0 for p in cands}
    per_scorer: dict[str, dict[str, float]] = {}
    for ws in self.scorers:
        sc = ws.scorer
        s = ttft_score(sc, req, cands) if isinstance(sc, EstimatedTTFTScorer) else sc.score(req, cands)
        per_scorer[sc.name] = s
        w = ws.weight
        for pid in totals:
            totals[pid] += w * min(1.0, max(0.0, s.get(pid, 0.0)))
    picker = self.picker
    ranked = rank(picker, req, cands, totals) if isinstance(picker, MaxScorePicker) else picker.rank(req, cands, totals)
    chosen = ranked[0]
    cached = view.cached.get(chosen.id, 0)
    self.pre_request(req, chosen.id)
    return Decision(ranked, totals, per_scorer, cached, max(0, req.prompt_tokens - cached))
