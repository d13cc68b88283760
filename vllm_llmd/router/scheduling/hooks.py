"""The routing memory written by request hooks, as llm-d's prefix plugins do in ``PreRequest``:
when a request is sent to a pod its block keys are recorded there as *pending* (they count for
concurrent requests of the same prefix, and never age while the request is in flight); when the
try ends they are recorded again without ``pending``, so the entry starts to age
(``vllm_llmd.router.prefix_memory.PrefixMemory``, ``index.speculative_ttl_s``)."""

from __future__ import annotations

from vllm_llmd.router.prefix_memory import PrefixMemory
from vllm_llmd.router.scheduling.framework import SchedRequest


class RoutingMemoryHook:
    """Built into every scheduler (a :class:`~.framework.PreRequest` and :class:`~.framework.PostResponse`)."""

    name = "routing-memory"

    def __init__(self, memory: PrefixMemory) -> None:
        self.memory = memory

    def pre_request(self, req: SchedRequest, pod: str) -> None:
        if req.block_keys:
            self.memory.insert(pod, req.block_keys, pending=True)

    def post_response(self, req: SchedRequest, pod: str) -> None:
        if req.block_keys:
            self.memory.insert(pod, req.block_keys)
