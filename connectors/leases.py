"""Prefill side of ``LLMDConnector``'s worker: blocks held under a lease for a decode engine.

The scheduler tells the worker (``meta.send``) which requests' blocks it now holds and for how
long; the worker answers vLLM with ``finished_sending`` when the consumer's completion notice
(``DONE_PREFIX`` + request id, sent by the decode side's transport once its read completed)
arrives or the lease runs out, and vLLM frees the blocks. A notice may arrive before the scheduler
announced the lease (the decode engine was quick): it is remembered for ten minutes and releases
the lease the moment it starts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping

from vllm_llmd.connectors.stats import LLMDConnectorStats

logger = logging.getLogger("vllm.vllm_llmd.connectors")

DONE_PREFIX = b"llmd:done:"
#: how long a completion notice for a lease not (yet) announced is remembered
EARLY_NOTICE_SECONDS = 600


class Leases:
    def __init__(self, stats: LLMDConnectorStats) -> None:
        self._stats = stats
        self._expiry: dict[str, float] = {}
        self._early_done: dict[str, float] = {}
        self._early_released: set[str] = set()

    def __len__(self) -> int:
        """Leases held, plus releases not yet reported to vLLM (0: the transport may park)."""
        return len(self._expiry) + len(self._early_released)

    def start(self, send: Mapping[str, float]) -> None:
        """Leases the scheduler started this step: request id -> seconds."""
        now = time.monotonic()
        for rid, seconds in send.items():
            if self._early_done.pop(rid, None) is not None:  # the consumer already read it
                self._stats.add("leases_released")
                self._early_released.add(rid)
            else:
                self._expiry[rid] = now + seconds

    def poll(self, notifs: Iterable[tuple[str, bytes]]) -> set[str]:
        """Requests whose blocks may be freed now (consumer done, or lease expired)."""
        released, self._early_released = self._early_released, set()
        now = time.monotonic()
        for _peer, msg in notifs:
            if not msg.startswith(DONE_PREFIX):
                continue
            rid = msg[len(DONE_PREFIX) :].decode(errors="replace")
            if self._expiry.pop(rid, None) is not None:
                released.add(rid)
                self._stats.add("leases_released")
            else:  # arrived before the scheduler told us about the lease
                self._early_done[rid] = now
        for rid, expiry in list(self._expiry.items()):
            if now >= expiry:
                del self._expiry[rid]
                released.add(rid)
                self._stats.add("leases_expired")
                logger.info("LLMDConnector: lease of %s expired; blocks freed", rid)
        for rid, seen in list(self._early_done.items()):
            if now - seen > EARLY_NOTICE_SECONDS:
                del self._early_done[rid]
        return released
