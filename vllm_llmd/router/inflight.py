"""Work the router has sent to each pod and not yet seen finish (reacts to bursts at once, unlike
any scrape): uncached prompt tokens still to prefill, decode tokens still to generate, requests.

A request's prompt counts as queued prefill until its first token arrives; but vLLM prefills the
requests it holds in chunks, several at once (chunked prefill), so a prompt sent a second ago may be
mostly done. Counting it in full made a pod that had just taken a burst of cold prompts look a whole
burst busier than it was, until the first tokens came: on ``hotprefix`` (bench/RESULTS.md, "Issue 12:
ours against the oracle on hotprefix, taken apart") a request for a prefix then being prefilled on
its pod spilled to the other pod, which prefilled the prefix again, and the hot prefix followed it.
So with a rate (``rate_of``: the pod's learned prefill rate in tokens/s, ``vllm_llmd.router.speed``)
the tracker also counts how much of the queued prefill the pod has likely done since it was sent
(:meth:`InflightTracker.drain`)::

    done(p)    <- min(sent(p), done(p) + rate(p) * (now - then))     at every decision and change
    queued(p)  =  sent(p) - done(p)                                   (PodLoad.prefill_tokens)

``sent(p)``: the uncached prompt tokens of the requests on ``p`` without a first token. When a
request's first token arrives its tokens leave ``sent`` and as much of ``done`` (the oldest request
is the one the pod prefilled first, FCFS). While the rate is not known (no pod has answered yet)
nothing drains, and the time waited is credited once it is; with learning off nothing ever drains
(a prompt counts in full until its first token).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class PodLoad:
    requests: int = 0
    #: uncached prompt tokens sent and not yet answered, less what the pod has likely prefilled of
    #: them already (``sent - done`` of the module docstring): what the cost model reads
    prefill_tokens: float = 0.0
    decode_tokens: int = 0
    #: ``sent`` and ``done`` of the module docstring, and when ``done`` was last brought up to date
    prefill_sent: int = 0
    prefill_done: float = 0.0
    drained_at: float = 0.0


@dataclass(slots=True)
class Ticket:
    """One request's contribution; :meth:`InflightTracker.first_token` / :meth:`done` release it."""

    pod: str
    prefill_tokens: int
    decode_tokens: int
    prefilled: bool = False
    finished: bool = False


class InflightTracker:
    def __init__(
        self, rate_of: Callable[[str], float | None] | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._load: dict[str, PodLoad] = {}
        self._clock = clock
        #: pods with queued prefill (the only ones :meth:`drain` has work on)
        self._queued: set[str] = set()
        #: a pod's prefill rate in tokens/s (``None``: not known, nothing drains)
        self.rate_of = rate_of
        #: called when a request ends on a pod (admission control wakes a waiting request)
        self.on_done: Callable[[], None] | None = None

    def load(self, pod: str) -> PodLoad:
        ld = self._load.get(pod)
        if ld is None:
            ld = self._load[pod] = PodLoad()
        return ld

    def drain(self, now: float | None = None) -> None:
        """Bring every pod's ``done`` up to ``now`` (see the module docstring)."""
        if not self._queued:
            return
        now = self._clock() if now is None else now
        for pod in self._queued:
            self._drain(self._load[pod], pod, now)

    def _drain(self, ld: PodLoad, pod: str, now: float) -> None:
        if ld.prefill_sent <= 0:  # nothing queued: idle time drains nothing of later prompts
            ld.drained_at = now
            return
        rate = self.rate_of(pod) if self.rate_of is not None else None
        if rate is None or rate <= 0:
            return  # not known yet: the time since ``drained_at`` is credited once it is
        if now > ld.drained_at:
            ld.prefill_done = min(float(ld.prefill_sent), ld.prefill_done + rate * (now - ld.drained_at))
            ld.prefill_tokens = ld.prefill_sent - ld.prefill_done
        ld.drained_at = now

    def start(self, pod: str, uncached_prompt_tokens: int, decode_tokens: int) -> Ticket:
        ld = self.load(pod)
        self._drain(ld, pod, self._clock())  # the time before it was sent drains nothing of it
        ld.requests += 1
        ld.prefill_sent += uncached_prompt_tokens
        ld.prefill_tokens = ld.prefill_sent - ld.prefill_done
        ld.decode_tokens += decode_tokens
        if ld.prefill_sent > 0:
            self._queued.add(pod)
        return Ticket(pod, uncached_prompt_tokens, decode_tokens)

    def first_token(self, t: Ticket) -> None:
        if t.prefilled or t.finished:
            return
        t.prefilled = True
        ld = self.load(t.pod)
        self._drain(ld, t.pod, self._clock())
        ld.prefill_sent -= t.prefill_tokens
        ld.prefill_done = max(0.0, ld.prefill_done - t.prefill_tokens)
        ld.prefill_tokens = ld.prefill_sent - ld.prefill_done
        if ld.prefill_sent <= 0:
            self._queued.discard(t.pod)

    def done(self, t: Ticket) -> None:
        if t.finished:
            return
        self.first_token(t)
        t.finished = True
        ld = self.load(t.pod)
        ld.requests -= 1
        ld.decode_tokens -= t.decode_tokens
        if self.on_done is not None:
            self.on_done()
