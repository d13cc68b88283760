"""Admission control: when every pod that could take a request is saturated, the request waits in
a bounded queue for a free slot, and is refused with 429 + ``Retry-After`` when the queue is full
or its wait runs out.

A pod is saturated when the router has ``admission.max_requests_per_pod`` requests in flight on it
(the in-flight tracker's count, :mod:`.inflight`: the same in the proxy and in gateway mode). Off
by default (``null``): vLLM queues requests itself, and the router's circuit breaker
(``pool.max_inflight_per_pod``) only stops a runaway. With a limit, the queue is FIFO: a new request
waits behind those already waiting; each request that ends on a pod wakes the first waiter, which
goes on if one of its pods has room (else it waits again, at the head). A request that was admitted
is never refused later, and a waiting request whose client leaves is dropped from the queue.
Envoy's and llm-d's equivalents shed load the same way (llm-d's saturation detector + 429 from the
EPP; Envoy's ``max_pending_requests`` overflow).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence

from vllm_llmd.router.config import AdmissionConfig
from vllm_llmd.router.errors import HTTPError
from vllm_llmd.router.scheduling import Candidate


class Admission:
    def __init__(self, cfg: AdmissionConfig) -> None:
        self.cfg = cfg
        self._waiters: deque[asyncio.Future[None]] = deque()
        #: requests refused with 429, and requests that waited and were admitted
        self.rejected = 0
        self.queued = 0

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _room(self, pods: Sequence[Candidate]) -> bool:
        limit = self.cfg.max_requests_per_pod
        return limit is None or any(p.load.requests < limit for p in pods)

    def _refuse(self, why: str) -> HTTPError:
        self.rejected += 1
        return HTTPError(429, why, "RateLimitError", headers={"Retry-After": str(self.cfg.retry_after_s)})

    async def admit(self, pods: Sequence[Candidate]) -> None:
        """Return when the request may go to one of ``pods``; :class:`HTTPError` 429 if it may not."""
        if self.cfg.max_requests_per_pod is None or (not self._waiters and self._room(pods)):
            return
        if len(self._waiters) >= self.cfg.queue_size:
            raise self._refuse("every pod serving the model is saturated and the admission queue is full")
        deadline = time.monotonic() + self.cfg.queue_timeout_s
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append(fut)
        self.queued += 1
        admitted = False
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._refuse(
                        f"every pod serving the model stayed saturated for {self.cfg.queue_timeout_s:g} s"
                    )
                try:
                    await asyncio.wait_for(asyncio.shield(fut), left)
                except TimeoutError:
                    continue
                if self._room(pods):
                    admitted = True
                    return
                fut = loop.create_future()  # no room after all: wait again, first in line
                self._waiters.appendleft(fut)
        finally:
            woken = fut.done() and not fut.cancelled()
            if fut in self._waiters:
                self._waiters.remove(fut)
            if not fut.done():
                fut.cancel()
            if woken and not admitted:
                self._wake()  # a wake-up this waiter leaves unused goes to the next one

    def released(self) -> None:
        """A request ended on some pod: the first waiter may go."""
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
