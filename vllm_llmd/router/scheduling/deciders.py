"""P/D deciders, chosen by name in ``pd.decider`` as llm-d's P/D profile handler picks its decider:
which requests get a prefill leg on another pod, and which pods may run it.

* ``prefix-threshold`` (default with ``role: prefill`` pods; llm-d's prefix-based decider): after
  the decode pod is chosen, disaggregate when it would compute more than ``threshold_tokens`` of
  the prompt itself (:func:`vllm_llmd.pd.should_disaggregate`); the prefill pods are the sources.
* ``selective-peers`` (``pd.peers: true``): among ``role: both`` pods, pull the prompt's KV from the
  peer that can produce it sooner than the decode pod computes it (:mod:`vllm_llmd.pd.selective`,
  docs/plugins/selective-pd.md), with the profile's decode weight.

Nothing here touches HTTP: the prefill leg itself is ``vllm_llmd.router.pd_legs``.
"""

from __future__ import annotations

import logging

from pydantic import Field

from vllm_llmd.pd import PodCost, SelectiveParams, choose_kv_source, should_disaggregate
from vllm_llmd.pd.load import prefill_equivalent
from vllm_llmd.router.scheduling.estimated_ttft import PeerPlans
from vllm_llmd.router.scheduling.framework import Candidate, Decision, SchedRequest, SchedulingContext
from vllm_llmd.router.scheduling.registry import Params, register

#: the P/D deciders' defaults have one owner: vllm_llmd.pd.SelectiveParams
_PD_DEFAULTS = SelectiveParams()

log = logging.getLogger(__name__)


class ThresholdParams(Params):
    #: disaggregate when the chosen decode pod would compute more than this many prompt tokens itself
    threshold_tokens: int = Field(default=_PD_DEFAULTS.threshold_tokens, ge=0)


@register("decider", "prefix-threshold", ThresholdParams)
class PrefixThresholdDecider:
    def __init__(self, name: str, params: ThresholdParams, ctx: SchedulingContext) -> None:
        self.name, self.params = name, params

    def active(self, prefill: list[Candidate]) -> bool:
        return bool(prefill)

    def sources(
        self, req: SchedRequest, decision: Decision, decode: list[Candidate], prefill: list[Candidate]
    ) -> list[Candidate] | None:
        if prefill and should_disaggregate(
            req.prompt_tokens, decision.predicted_cached_tokens, self.params.threshold_tokens
        ):
            return prefill
        return None


class SelectivePeersParams(Params):
    threshold_tokens: int = Field(default=_PD_DEFAULTS.threshold_tokens, ge=0)
    #: cost of moving one prompt token's KV, relative to computing it
    transfer_token_weight: float = Field(default=_PD_DEFAULTS.transfer_token_weight, ge=0)
    #: fixed cost (tokens) of the extra prefill leg
    leg_overhead_tokens: float = Field(default=_PD_DEFAULTS.leg_overhead_tokens, ge=0)


@register("decider", "selective-peers", SelectivePeersParams)
class SelectivePeersDecider:
    def __init__(self, name: str, params: SelectivePeersParams, ctx: SchedulingContext) -> None:
        self.name = name
        self.params = SelectiveParams(
            params.threshold_tokens, params.transfer_token_weight, params.leg_overhead_tokens, ctx.decode_token_weight
        )

    def active(self, prefill: list[Candidate]) -> bool:
        return True

    def sources(
        self, req: SchedRequest, decision: Decision, decode: list[Candidate], prefill: list[Candidate]
    ) -> list[Candidate] | None:
        view = req.view
        chosen = decision.chosen
        if view is None or chosen.role != "both":
            return None
        n = req.prompt_tokens

        plans = req.outputs.get(PeerPlans)

        def cost(c: Candidate) -> PodCost:
            ld = c.load
            # the prompt's prefill work on c: lower-tier hits at c's load-back price (vllm_llmd.pd.load),
            # or, with estimated-ttft's peer_loads, c's cheapest plan including a peer load (vllm_llmd.pd.peer)
            plan = plans.plans.get(c.id) if plans is not None else None
            uncached = round(
                plan.cost if plan is not None else prefill_equivalent(n, view.held.get(c.id, {}), c.prices)
            )
            return PodCost(c.id, uncached, ld.prefill_tokens, ld.decode_tokens, c.prefill_speed)

        peers = [c for c in decode if c.role == "both" and c.id != chosen.id]
        src = choose_kv_source(n, cost(chosen), [cost(c) for c in peers], self.params)
        if src is None:
            return None
        log.debug(
            "peer P/D: %s pulls from %s (remote %.0f < local %.0f)", chosen.id, src.pod, src.remote_cost, src.local_cost
        )
        return [c for c in peers if c.id == src.pod]
