"""Scheduling pipeline modelled on llm-d's: filters -> scorers ([0, 1] per pod, weighted sum) -> picker.

Plugins register by type name (:mod:`.registry`); a profile is assembled from YAML (:mod:`.profile`).
Importing this package registers the built-in plugins. Nothing here touches HTTP.
"""

from vllm_llmd.router.scheduling import filters, pickers, scorers  # noqa: F401  (registration)
from vllm_llmd.router.scheduling.framework import Candidate, Decision, SchedRequest, SchedulingContext
from vllm_llmd.router.scheduling.profile import Scheduler, build_scheduler
from vllm_llmd.router.scheduling.registry import PluginError, registered

__all__ = [
    "Candidate",
    "Decision",
    "PluginError",
    "SchedRequest",
    "Scheduler",
    "SchedulingContext",
    "build_scheduler",
    "registered",
]
