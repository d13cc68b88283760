"""A scheduling profile assembled from configuration, and the scheduler that runs it."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_llmd.pd.load import DECODE_TOKEN_WEIGHT
from vllm_llmd.router.config import ProfileConfig
from vllm_llmd.router.scheduling.framework import (
    Candidate,
    Decision,
    Filter,
    Picker,
    PostResponse,
    PreRequest,
    SchedRequest,
    SchedulingContext,
    Scorer,
)
from vllm_llmd.router.scheduling.hooks import RoutingMemoryHook
from vllm_llmd.router.scheduling.prefix_view import prefix_view
from vllm_llmd.router.scheduling.registry import PluginError, create_plugin


class NoCandidate(RuntimeError):
    """No pod passed the filters."""


@dataclass
class WeightedScorer:
    scorer: Scorer
    weight: float


class Scheduler:
    """Prefix view -> filters -> weighted scorers -> picker; then the chosen pod's request hooks."""

    def __init__(
        self, ctx: SchedulingContext, filters: list[Filter], scorers: list[WeightedScorer], picker: Picker
    ) -> None:
        self.ctx = ctx
        self.filters = filters
        self.scorers = scorers
        self.picker = picker
        plugins: list[object] = [RoutingMemoryHook(ctx.memory), *filters, *(s.scorer for s in scorers), picker]
        if ctx.speeds is not None:
            plugins.append(ctx.speeds)
        self._pre = [p for p in plugins if isinstance(p, PreRequest)]
        self._post = [p for p in plugins if isinstance(p, PostResponse)]

    @property
    def needs_metrics(self) -> bool:
        return any(getattr(p, "needs_metrics", False) for p in [*self.filters, *(s.scorer for s in self.scorers)])

    @property
    def prices_tiers(self) -> bool:
        """Whether a scorer prices prompt tokens by KV tier (the pool then learns each pod's prices)."""
        return any(getattr(s.scorer, "prices_tiers", False) for s in self.scorers)

    @property
    def decode_token_weight(self) -> float:
        """The decode weight of the profile's cost: its first scorer that has one."""
        for ws in self.scorers:
            w = getattr(getattr(ws.scorer, "params", None), "decode_token_weight", None)
            if isinstance(w, float | int):
                return float(w)
        return DECODE_TOKEN_WEIGHT

    def schedule(self, req: SchedRequest, pods: list[Candidate]) -> Decision:
        if not pods:
            raise NoCandidate("no pod available")
        req.view = view = prefix_view(req, pods, self.ctx)
        cands = pods
        for f in self.filters:
            cands = f.filter(req, cands)
            if not cands:
                raise NoCandidate(f"filter {f.name} left no pod")
        ids = [p.id for p in cands]
        acc = [0.0] * len(ids)
        per_scorer: dict[str, dict[str, float]] = {}
        for ws in self.scorers:
            s = ws.scorer.score(req, cands)
            per_scorer[ws.scorer.name] = s
            w = ws.weight
            get = s.get
            # each score clamped to [0, 1] (``min(1.0, max(0.0, x))``, NaN -> 0), weighted, summed in
            # scorer order
            acc = [
                a + w * ((x if x < 1.0 else 1.0) if (x := get(pid, 0.0)) > 0.0 else 0.0)
                for a, pid in zip(acc, ids, strict=True)
            ]
        totals = dict(zip(ids, acc, strict=True))
        ranked = self.picker.rank(req, cands, totals)
        chosen = ranked[0]
        cached = view.cached.get(chosen.id, 0)
        self.pre_request(req, chosen.id)
        return Decision(ranked, totals, per_scorer, cached, max(0, req.prompt_tokens - cached))

    def pre_request(self, req: SchedRequest, pod: str) -> None:
        for h in self._pre:
            h.pre_request(req, pod)

    def post_response(self, req: SchedRequest, pod: str) -> None:
        for h in self._post:
            h.post_response(req, pod)


def build_scheduler(cfg: ProfileConfig, ctx: SchedulingContext, where: str = "profile") -> Scheduler:
    filters = [
        create_plugin("filter", f.type, f.params, ctx, f"{where}.filters[{i}]", Filter)
        for i, f in enumerate(cfg.filters)
    ]
    if not cfg.scorers:
        raise PluginError(f"{where}.scorers: at least one scorer is needed")
    scorers = []
    names: set[str] = set()
    for i, s in enumerate(cfg.scorers):
        sc = create_plugin("scorer", s.type, s.params, ctx, f"{where}.scorers[{i}]", Scorer)
        if sc.name in names:  # two of one type: give each its own key in the per-scorer output
            sc.name = f"{sc.name}#{i}"
        names.add(sc.name)
        scorers.append(WeightedScorer(sc, s.weight))
    picker = create_plugin("picker", cfg.picker.type, cfg.picker.params, ctx, f"{where}.picker", Picker)
    return Scheduler(ctx, filters, scorers, picker)
