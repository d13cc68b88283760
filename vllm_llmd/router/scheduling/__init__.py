"""Scheduling pipeline modelled on llm-d's: filters -> scorers ([0, 1] per pod, weighted sum) -> picker.

Plugins register by type name (:mod:`.registry`); a profile is assembled from YAML (:mod:`.profile`).
Importing this package registers the built-in plugins. Nothing here touches HTTP.
"""

from vllm_llmd.router.scheduling import deciders, estimated_ttft, filters, lora, pickers, scorers  # noqa: F401  (registration)
from vllm_llmd.router.scheduling.framework import (
    Candidate,
    Decider,
    Decision,
    PrefixIndex,
    PrefixView,
    SchedRequest,
    SchedulingContext,
)
from vllm_llmd.router.scheduling.profile import NoCandidate, Scheduler, build_scheduler
from vllm_llmd.router.scheduling.registry import PluginError, registered

__all__ = [
    "Candidate",
    "Decider",
    "Decision",
    "NoCandidate",
    "PluginError",
    "PrefixIndex",
    "PrefixView",
    "SchedRequest",
    "Scheduler",
    "SchedulingContext",
    "build_scheduler",
    "registered",
]
