"""One try of a request on one pod, and everything it has to account for.

An :class:`Attempt` is used as a context manager around the exchange with the pod. Entering it
counts the request's work on the pod (an in-flight ticket: uncached prompt tokens to prefill,
``max_tokens`` to decode; the pod's queue in every load formula) and, for a pod the scheduler did
not choose itself (a retry, a prefill leg), runs the scheduler's ``PreRequest`` hooks (the routing
memory's pending entry, the KV footprint, the session). :meth:`answering` marks the first byte
(the prefill is done). Leaving it, however it ends (answered, failed, or cancelled because the
client left), releases the ticket and runs the ``PostResponse`` hooks, at once.

A streamed answer that ran to its end leaves its timing for those hooks
(:class:`~vllm_llmd.router.speed.AttemptTiming` in the request's outputs: the work queued on the pod
when it was sent, the time to the first chunk, the SSE events after it and their duration), from
which the pod's speed is learned (:mod:`vllm_llmd.router.speed`).
"""

from __future__ import annotations

import time
from types import TracebackType

from vllm_llmd.pd.load import queued_tokens
from vllm_llmd.router.inflight import InflightTracker, Ticket
from vllm_llmd.router.pool import Pod
from vllm_llmd.router.scheduling import SchedRequest, Scheduler
from vllm_llmd.router.speed import AttemptTiming


class Attempt:
    __slots__ = (
        "_decode",
        "_events",
        "_inflight",
        "_prefill",
        "_scheduled",
        "_scheduler",
        "_t_first",
        "_t_last",
        "_t_sent",
        "_work",
        "completed",
        "pod",
        "req",
        "ticket",
    )

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
        self._work = 0.0
        self._t_sent = self._t_first = self._t_last = 0.0
        self._events = 0
        #: set when a streamed answer was relayed to its end (its timing is then a sample)
        self.completed = False

    def __enter__(self) -> Attempt:
        ld = self.pod.load  # the work queued ahead of this request, before it is counted
        self._work = self._prefill + queued_tokens(
            ld.prefill_tokens, ld.decode_tokens, self._scheduler.ctx.decode_token_weight
        )
        self._t_sent = time.perf_counter()
        self.ticket = self._inflight.start(self.pod.id, self._prefill, self._decode)
        if not self._scheduled:
            self._scheduler.pre_request(self.req, self.pod.id)
        return self

    def answering(self, streamed: bool = False) -> None:
        """The pod's answer started: its prefill is no longer queued work. ``streamed``: its first
        SSE chunk has arrived (the first token: the time to it is a TTFT)."""
        if self.ticket is not None:
            self._inflight.first_token(self.ticket)
        if streamed:
            self._t_first = self._t_last = time.perf_counter()

    def chunk(self, data: bytes) -> None:
        """A later chunk of a streamed answer arrived."""
        self._events += data.count(b"data: ")
        self._t_last = time.perf_counter()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.ticket is not None:
            self._inflight.done(self.ticket)
        if self.completed and self._t_first > 0 and exc_type is None:
            self.req.outputs.put(
                AttemptTiming(
                    self.pod.id,
                    self._work,
                    self._t_first - self._t_sent,
                    self._events,
                    self._t_last - self._t_first,
                    self._prefill,
                )
            )
        self._scheduler.post_response(self.req, self.pod.id)
