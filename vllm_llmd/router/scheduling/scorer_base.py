"""What every built-in scorer shares: the plugin base class and two helpers over the prefix view.
Scorers: :mod:`vllm_llmd.router.scheduling.scorers` and :mod:`.estimated_ttft`."""

from __future__ import annotations

from vllm_llmd.pd.load import HBM
from vllm_llmd.router.scheduling.framework import PrefixView, SchedRequest, SchedulingContext
from vllm_llmd.router.scheduling.registry import Params


class ScorerBase:
    needs_metrics = False
    #: prices prompt tokens by KV tier (the pool then learns each pod's load-back speeds)
    prices_tiers = False

    def __init__(self, name: str, params: Params, ctx: SchedulingContext) -> None:
        self.name = name
        self.params = params
        self.ctx = ctx


def prefix_view(req: SchedRequest) -> PrefixView:
    assert req.view is not None, "the scheduler computes the prefix view before any plugin runs"
    return req.view


def tier_blind(held: dict[str, int]) -> dict[str, int]:
    """Every tier counted as the engine cache (``price_tiers: false``: a tier-blind cost)."""
    return {HBM: sum(held.values())} if held else held
