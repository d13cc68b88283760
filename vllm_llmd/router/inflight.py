"""Work the router has sent to each pod and not yet seen finish (reacts to bursts at once, unlike
any scrape): uncached prompt tokens still to prefill, decode tokens still to generate, requests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class PodLoad:
    requests: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0


@dataclass(slots=True)
class Ticket:
    """One request's contribution; :meth:`InflightTracker.first_token` / :meth:`done` release it."""

    pod: str
    prefill_tokens: int
    decode_tokens: int
    prefilled: bool = False
    finished: bool = False


class InflightTracker:
    def __init__(self) -> None:
        self._load: dict[str, PodLoad] = {}
        #: called when a request ends on a pod (admission control wakes a waiting request)
        self.on_done: Callable[[], None] | None = None

    def load(self, pod: str) -> PodLoad:
        ld = self._load.get(pod)
        if ld is None:
            ld = self._load[pod] = PodLoad()
        return ld

    def start(self, pod: str, uncached_prompt_tokens: int, decode_tokens: int) -> Ticket:
        ld = self.load(pod)
        ld.requests += 1
        ld.prefill_tokens += uncached_prompt_tokens
        ld.decode_tokens += decode_tokens
        return Ticket(pod, uncached_prompt_tokens, decode_tokens)

    def first_token(self, t: Ticket) -> None:
        if t.prefilled or t.finished:
            return
        t.prefilled = True
        self.load(t.pod).prefill_tokens -= t.prefill_tokens

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
