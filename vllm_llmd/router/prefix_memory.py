"""What the router itself remembers about where prompts went: chained block hashes -> pods.

Used two ways:

* **approximate prefix cache** (pods that publish no KV events): every routing decision inserts the
  prompt's block keys for the chosen pod; a per-pod LRU bounded in blocks stands in for the engine's
  own eviction (llm-d's approximate prefix producer, peers.md §3);
* **speculative entries** (pods with events): a decision counts while the request is in flight and
  for ``ttl_s`` seconds after it ends, closing the gap between routing a request and the engine's
  ``BlockStored`` events for it (a queued request may wait many seconds for its prefill), so
  concurrent requests of a new prefix follow the first one instead of spreading.

Keys: a request's block keys (``vllm_llmd.router.prompt``: the KV index's own chained keys, or text
keys without a tokenizer). Nothing here touches HTTP.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence


class PrefixMemory:
    """Block key -> {pod: last time routed}, with a per-pod LRU bounded in blocks."""

    def __init__(self, blocks_per_pod: int = 100_000) -> None:
        self.blocks_per_pod = blocks_per_pod
        self._where: dict[int, dict[str, float]] = {}
        self._lru: dict[str, OrderedDict[int, None]] = {}

    def __len__(self) -> int:
        return len(self._where)

    def blocks_on(self, pod: str) -> int:
        lru = self._lru.get(pod)
        return 0 if lru is None else len(lru)

    def insert(self, pod: str, keys: Iterable[int], now: float | None = None, pending: bool = False) -> None:
        """Record that ``pod`` got a prompt with ``keys``. ``pending``: the request is still in
        flight, so the entry does not age until it is inserted again without ``pending``."""
        t = float("inf") if pending else (time.monotonic() if now is None else now)
        lru = self._lru.setdefault(pod, OrderedDict())
        where = self._where
        for k in keys:
            pods = where.get(k)
            if pods is None:
                where[k] = {pod: t}
            else:
                pods[pod] = t
            if k in lru:
                lru.move_to_end(k)
            else:
                lru[k] = None
        while len(lru) > self.blocks_per_pod:
            old, _ = lru.popitem(last=False)
            pods = where.get(old)
            if pods is not None:
                pods.pop(pod, None)
                if not pods:
                    del where[old]

    def match(self, keys: Sequence[int], max_age_s: float | None = None, now: float | None = None) -> dict[str, int]:
        """Number of leading blocks of ``keys`` each pod holds (consecutive from the first)."""
        out: dict[str, int] = {}
        if not keys:
            return out
        cutoff = None
        if max_age_s is not None:
            cutoff = (time.monotonic() if now is None else now) - max_age_s
        where = self._where
        alive: set[str] | None = None
        for i, k in enumerate(keys):
            pods = where.get(k)
            if not pods:
                break
            cur = {p for p, t in pods.items() if cutoff is None or t >= cutoff}
            alive = cur if alive is None else alive & cur
            if not alive:
                break
            for p in alive:
                out[p] = i + 1
        return out

    def remove_pod(self, pod: str) -> None:
        lru = self._lru.pop(pod, None)
        if not lru:
            return
        for k in lru:
            pods = self._where.get(k)
            if pods is not None:
                pods.pop(pod, None)
                if not pods:
                    del self._where[k]
