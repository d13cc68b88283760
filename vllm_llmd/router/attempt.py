"""One try of a request on one pod, and everything it has to account for.

An :class:`Attempt` is used as a context manager around the exchange with the pod. Entering it
counts the request's work on the pod (an in-flight ticket: uncached prompt tokens to prefill,
``max_tokens`` to decode; the pod's queue in every load formula) and, for a pod the scheduler did
not choose itself (a retry, a prefill leg), runs the scheduler's ``PreRequest`` hooks (the routing
memory's pending entry, the KV footprint, the session). :meth:`answering` marks the first byte
(the prefill is done). Leaving it, however it ends (answered, failed, or cancelled because the
client left), releases the ticket and runs the ``PostResponse`` hooks, at once.
"""

from __future__ import annotations

from types import TracebackType

from vllm_llmd.router.inflight import InflightTracker, Ticket
from vllm_llmd.router.pool import Pod
from vllm_llmd.router.scheduling import SchedRequest, Scheduler


class Attempt:
    __slots__ = ("_decode", "_inflight", "_prefill", "_scheduled", "_scheduler", "pod", "req", "ticket")

    def __init__(
        self,
        pod: Pod,
        req: SchedRequest,
        scheduler: Scheduler,
        inflight: InflightTracker,
        *,
        prefill_tokens: int,
        decode_tokens: int,
        scheduled: bool,
    ) -> None:
        self.pod = pod
        self.req = req
        self._scheduler = scheduler
        self._inflight = inflight
        self._prefill = prefill_tokens
        self._decode = decode_tokens
        #: the scheduler chose this pod and already ran its PreRequest hooks for it
        self._scheduled = scheduled
        self.ticket: Ticket | None = None

    def __enter__(self) -> Attempt:
        self.ticket = self._inflight.start(self.pod.id, self._prefill, self._decode)
        if not self._scheduled:
            self._scheduler.pre_request(self.req, self.pod.id)
        return self

    def answering(self) -> None:
        """The pod's answer started: its prefill is no longer queued work."""
        if self.ticket is not None:
            self._inflight.first_token(self.ticket)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.ticket is not None:
            self._inflight.done(self.ticket)
        self._scheduler.post_response(self.req, self.pod.id)
