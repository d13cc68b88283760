"""llm-d's plugin type names, accepted as aliases of ours (issue 14: an llm-d user switches with the
configuration they have).

The llm-d names are those of llm-d-inference-scheduler and the Gateway API Inference Extension's
scheduling plugins (``EndpointPickerConfig`` ``plugins[].type``). Each maps to our plugin of the same
role and, where llm-d's is a fixed variant of ours, the parameters that make it that variant. What
llm-d computes differently is said per entry; ``vllm_llmd.router.llmd_config`` translates whole
``EndpointPickerConfig`` files with this table and names what it cannot translate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Alias:
    #: our registered plugin type
    type: str
    #: parameters that make ours the llm-d variant
    params: dict[str, Any] = field(default_factory=dict)
    #: how it differs from llm-d's, for the translation's report ("" = same role and formula family)
    note: str = ""


ALIASES: dict[str, Alias] = {
    # scorers
    "prefix-cache-scorer": Alias(
        "approx-prefix-cache", note="the router's own routing memory, as llm-d's approximate mode"
    ),
    "precise-prefix-cache-scorer": Alias(
        "precise-prefix-cache", note="KV events from the engines (vLLM's ZMQ publisher)"
    ),
    "queue-scorer": Alias("queue-depth"),
    "kv-cache-utilization-scorer": Alias("kv-cache-usage"),
    "running-requests-size-scorer": Alias("running-requests"),
    "lora-affinity-scorer": Alias("lora-affinity"),
    "session-affinity-scorer": Alias("session-affinity"),
    "load-aware-scorer": Alias(
        "inflight-load", note="the router's in-flight tokens instead of the pod's waiting queue"
    ),
    # pickers
    "max-score-picker": Alias("max-score"),
    "weighted-random-picker": Alias("weighted-random"),
    "random-picker": Alias("weighted-random", note="weighted by score, not uniform"),
    # filters
    "decode-filter": Alias("role", {"role": "decode"}),
    "prefill-filter": Alias("role", {"role": "prefill"}),
}


def resolve(type_name: str) -> tuple[str, dict[str, Any]]:
    """Our plugin type and fixed parameters for ``type_name`` (itself when it is not an alias)."""
    a = ALIASES.get(type_name)
    return (type_name, {}) if a is None else (a.type, dict(a.params))
