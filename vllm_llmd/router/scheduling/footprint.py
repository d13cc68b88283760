"""Each pod's KV footprint as the router's recent decisions imply it: a long-run placement signal.

The in-flight queue says how busy a pod is *now*; it swings by a whole prompt every time a cold
prefill starts or ends. Where a new prefix is placed decides where all its later requests go and
which pod's cache must hold it, so that choice should also follow how much distinct KV each pod
already has to keep. This module counts, per pod, the distinct block keys routed there in the last
``window`` decisions (a sliding window by count, so it needs no clock and adapts at any request
rate).
"""

from __future__ import annotations


class KVFootprint:
    """Per pod, the distinct block keys of the requests routed there in the last ``window``
    decisions (all pods counted): its *footprint*; and how many of them were routed there at least
    twice: its *hot* footprint, the blocks its KV cache must keep to go on hitting (blocks used
    once, such as unique suffixes, do not count). A hot footprint above the pod's capacity means
    LRU eviction of hot prefixes, which are then prefilled again."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.window = window
        self._seq = 0
        #: pod -> key -> [last decision seq, uses], oldest first
        self._pods: dict[str, dict[int, list[int]]] = {}
        self._hot: dict[str, int] = {}

    def record(self, pod: str, keys: list[int]) -> None:
        self._seq += 1
        d = self._pods.setdefault(pod, {})
        hot = self._hot.get(pod, 0)
        for k in keys:
            e = d.pop(k, None)
            if e is None:
                d[k] = [self._seq, 1]
            else:
                e[0] = self._seq
                e[1] += 1
                if e[1] == 2:
                    hot += 1
                d[k] = e
        self._hot[pod] = hot
        self._trim(pod)

    def _trim(self, pod: str) -> None:
        d = self._pods.get(pod)
        if not d:
            return
        lo = self._seq - self.window
        hot = self._hot.get(pod, 0)
        while d:
            k = next(iter(d))
            e = d[k]
            if e[0] > lo:
                break
            del d[k]
            if e[1] >= 2:
                hot -= 1
        self._hot[pod] = hot

    def hot_blocks(self, pod: str) -> int:
        self._trim(pod)
        return self._hot.get(pod, 0)

    def blocks(self, pod: str) -> int:
        self._trim(pod)
        return len(self._pods.get(pod, ()))

    def excess(self, fair: dict[str, float]) -> dict[str, float]:
        """Per pod in ``fair`` (pod -> fair share, summing to 1): ``max(0, share / fair - 1)``
        where ``share`` is the pod's part of these pods' summed footprints; 0 everywhere while
        nothing was routed."""
        fp = {p: self.blocks(p) for p in fair}
        total = sum(fp.values())
        if total <= 0:
            return {p: 0.0 for p in fair}
        return {p: (max(0.0, fp[p] / (total * f) - 1.0) if f > 0 else 0.0) for p, f in fair.items()}

    def forget(self, pod: str) -> None:
        """Drop the pod's footprint (its cache was cleared: nothing of it is held any more)."""
        self._pods.pop(pod, None)
        self._hot.pop(pod, None)
