"""A scheduling profile assembled from configuration, and the scheduler that runs it."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_llmd.router.config import ProfileConfig
from vllm_llmd.router.scheduling.framework import Candidate, Decision, SchedRequest, SchedulingContext
from vllm_llmd.router.scheduling.prefix_view import prefix_view
from vllm_llmd.router.scheduling.registry import PluginError, create


class NoCandidate(RuntimeError):
    """No pod passed the filters."""


@dataclass
class WeightedScorer:
    scorer: object
    weight: float


class Scheduler:
    def __init__(self, ctx: SchedulingContext, filters: list, scorers: list[WeightedScorer], picker: object) -> None:
        self.ctx = ctx
        self.filters = filters
        self.scorers = scorers
        self.picker = picker
        self._hooks = [p for p in [*filters, *(s.scorer for s in scorers), picker] if hasattr(p, "on_decision")]

    @property
    def needs_metrics(self) -> bool:
        return any(getattr(p, "needs_metrics", False) for p in [*self.filters, *(s.scorer for s in self.scorers)])

    def schedule(self, req: SchedRequest, pods: list[Candidate]) -> Decision:
        if not pods:
            raise NoCandidate("no pod available")
        cands = pods
        for f in self.filters:
            cands = f.filter(req, cands)
            if not cands:
                raise NoCandidate(f"filter {f.name} left no pod")
        totals = {p.id: 0.0 for p in cands}
        per_scorer: dict[str, dict[str, float]] = {}
        for ws in self.scorers:
            s = ws.scorer.score(req, cands)
            per_scorer[ws.scorer.name] = s
            w = ws.weight
            for pid in totals:
                totals[pid] += w * min(1.0, max(0.0, s.get(pid, 0.0)))
        ranked = self.picker.rank(req, cands, totals)
        chosen = ranked[0]
        view = prefix_view(req, cands, self.ctx)
        cached = view.cached.get(chosen.id, 0)
        # remember the decision: speculative entry (precise mode) / approximate index entry
        if req.block_keys:
            # pending until the caller settles it (request finished): see PrefixMemory.insert
            self.ctx.memory.insert(chosen.id, req.block_keys, pending=True)
        for h in self._hooks:
            h.on_decision(req, chosen)
        return Decision(ranked, totals, per_scorer, cached, max(0, req.prompt_tokens - cached))


def build_scheduler(cfg: ProfileConfig, ctx: SchedulingContext, where: str = "profile") -> Scheduler:
    filters = [create("filter", f.type, f.params, ctx, f"{where}.filters[{i}]") for i, f in enumerate(cfg.filters)]
    if not cfg.scorers:
        raise PluginError(f"{where}.scorers: at least one scorer is needed")
    scorers = []
    names: set[str] = set()
    for i, s in enumerate(cfg.scorers):
        sc = create("scorer", s.type, s.params, ctx, f"{where}.scorers[{i}]")
        if sc.name in names:  # two of one type: give each its own key in the per-scorer output
            sc.name = f"{sc.name}#{i}"
        names.add(sc.name)
        scorers.append(WeightedScorer(sc, s.weight))
    picker = create("picker", cfg.picker.type, cfg.picker.params, ctx, f"{where}.picker")
    return Scheduler(ctx, filters, scorers, picker)
