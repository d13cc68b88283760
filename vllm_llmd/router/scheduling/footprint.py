"""Each pod's KV footprint as the router's recent decisions imply it: a long-run placement signal.

The in-flight queue says how busy a pod is *now*; it swings by a whole prompt every time a cold
prefill starts or ends. Where a new prefix is placed decides where all its later requests go and
which pod's cache must hold it, so that choice should also follow how much distinct KV each pod
already has to keep. This module counts, per pod, the distinct block keys routed there in the last
``window`` decisions (a sliding window by count, so it needs no clock and adapts at any request
rate).

With peer loads, :class:`LastUse` keeps a second, unwindowed record per pod: its block keys in the
order they were last routed there, the router's estimate of the order in which the pod's LRU drops
them (``vllm_llmd.pd.evict``).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from itertools import islice

from vllm_llmd.router.scheduling.framework import PrefixIndex

#: keys kept per pod by :class:`LastUse` when its capacity is not known
LAST_USE_DEFAULT_LIMIT = 1 << 16


class KVFootprint:
    """Per pod, the distinct block keys of the requests routed there in the last ``window``
    decisions (all pods counted): its *footprint*; and how many of them were routed there at least
    twice: its *hot* footprint, the blocks its KV cache must keep to go on hitting (blocks used
    once, such as unique suffixes, do not count). A hot footprint above the pod's capacity means
    LRU eviction of hot prefixes, which are then prefilled again.

    Decisions expire from a log as new ones are recorded, so reading a pod's footprint is O(1) and
    recording costs O(keys) amortised, however many pods there are."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.window = window
        self._seq = 0
        #: pod -> key -> last decision seq, and pod -> key -> uses (int-only dicts: the garbage
        #: collector does not track them)
        self._pods: dict[str, dict[int, int]] = {}
        self._uses: dict[str, dict[int, int]] = {}
        self._hot: dict[str, int] = {}
        #: the decisions still in the window: (seq, pod, keys)
        self._log: deque[tuple[int, str, tuple[int, ...]]] = deque()

    def record(self, pod: str, keys: list[int]) -> None:
        self._seq += 1
        seq = self._seq
        last = self._pods.setdefault(pod, {})
        uses = self._uses.setdefault(pod, {})
        hot = self._hot.get(pod, 0)
        for k in keys:
            n = uses.get(k, 0) + 1
            uses[k] = n
            last[k] = seq
            if n == 2:
                hot += 1
        self._hot[pod] = hot
        self._log.append((seq, pod, tuple(keys)))
        self._expire()

    def _expire(self) -> None:
        """Drop the keys whose last use is ``window`` or more decisions old."""
        lo = self._seq - self.window
        log = self._log
        while log and log[0][0] <= lo:
            s, pod, keys = log.popleft()
            last = self._pods.get(pod)
            if last is None:
                continue
            uses = self._uses[pod]
            hot = self._hot.get(pod, 0)
            for k in keys:
                if last.get(k) == s:  # not used again since
                    del last[k]
                    if uses.pop(k, 0) >= 2:
                        hot -= 1
            self._hot[pod] = hot

    def hot_blocks(self, pod: str) -> int:
        return self._hot.get(pod, 0)

    def blocks(self, pod: str) -> int:
        d = self._pods.get(pod)
        return len(d) if d is not None else 0

    def excess(self, fair: dict[str, float], min_total: float = 0.0) -> dict[str, float]:
        """Per pod in ``fair`` (pod -> fair share, summing to 1): ``max(0, fp / (fair * T) - 1)``
        with ``fp`` the pod's footprint and ``T`` the larger of these pods' summed footprints and
        ``min_total`` (blocks); 0 everywhere while nothing was routed.

        ``min_total`` keeps a nearly empty pool (a fresh start, caches just cleared) from having
        shares at all: with 20 pods and 4 prompts placed, a pod's fair share is a fifth of a prompt,
        so every pod holding one prompt is "over" and each new prefix went to an idle pod, however
        slow (bench/RESULTS.md, "Simulated fleet at offered 10 and 14: where ours lost time")."""
        return dict(zip(fair, self.excess_of(list(fair), list(fair.values()), min_total), strict=True))

    def excess_of(self, pods: list[str], fair: list[float], min_total: float = 0.0) -> list[float]:
        """:meth:`excess` over parallel lists (distinct pods), without building a dict per call."""
        d = self._pods
        fp = [len(d[p]) if p in d else 0 for p in pods]
        total = sum(fp)
        if total <= 0:
            return [0.0] * len(pods)
        total = max(total, min_total)
        # max(0.0, y) as a conditional (same value, NaN -> 0.0), no call per pod
        return [
            ((y if (y := x / (total * f) - 1.0) > 0.0 else 0.0) if f > 0 else 0.0)
            for x, f in zip(fp, fair, strict=True)
        ]

    def pods(self) -> list[str]:
        return list(self._pods)

    def forget(self, pod: str) -> None:
        """Drop the pod's footprint (its cache was cleared: nothing of it is held any more)."""
        self._pods.pop(pod, None)
        self._uses.pop(pod, None)
        self._hot.pop(pod, None)


class LastUse:
    """Per pod, the block keys of the requests routed there, least recently routed first.

    vLLM's prefix cache and the DRAM tier's LRU policy both touch a request's blocks when it uses
    them (the tier's at the request's end: ``on_request_finished`` in vLLM 0.32's
    ``vllm/v1/kv_offload/cpu/policies/base.py``), so the order in which the router last sent each
    block to a pod is its estimate of the order in which the pod evicts them
    (``vllm_llmd.pd.evict``); blocks put on the pod by others (another router, a client going
    around it) are not seen. Unlike :class:`KVFootprint` it has no window: the blocks a full pod
    drops next are exactly the ones no recent request used. A pod keeps at most ``limit`` keys (the
    caller passes twice the pod's capacity; the oldest go first), and keys the pod no longer holds
    are dropped when a walk passes them (:meth:`walk`).

    Fleet-wide it also keeps the most recently routed distinct keys, at most ``fleet_limit`` (the
    caller sets the fleet's summed capacity: older keys than that are gone from every LRU anyway),
    with how often each was routed since it entered: :meth:`fleet_hot` counts those routed twice or
    more, the blocks the fleet must keep one copy of to go on hitting (``vllm_llmd.pd.evict``'s
    duplicate budget). Unlike the capacity term's footprint window (128 decisions) this horizon
    scales with the fleet: on ``longrag`` a document comes back every 100-500 requests, and the
    windowed count saw half the documents as cold (bench/RESULTS.md "Issue 12 last copies,
    measured")."""

    def __init__(self) -> None:
        self._pods: dict[str, OrderedDict[int, None]] = {}
        self._fleet: OrderedDict[int, int] = OrderedDict()
        self._fleet_hot = 0
        self.fleet_limit = LAST_USE_DEFAULT_LIMIT

    def touch(self, pod: str, keys: Iterable[int], limit: int = LAST_USE_DEFAULT_LIMIT) -> None:
        d = self._pods.get(pod)
        if d is None:
            d = self._pods[pod] = OrderedDict()
        move = d.move_to_end
        for k in keys:
            if k in d:
                move(k)
            else:
                d[k] = None
        over = len(d) - max(1, limit)
        for _ in range(over):
            d.popitem(last=False)
        f = self._fleet
        hot = self._fleet_hot
        for k in keys:
            n = f.get(k)
            if n is None:
                f[k] = 1
            else:
                f[k] = n + 1
                f.move_to_end(k)
                if n == 1:
                    hot += 1
        for _ in range(len(f) - max(1, self.fleet_limit)):
            if f.popitem(last=False)[1] >= 2:
                hot -= 1
        self._fleet_hot = hot

    def fleet_hot(self) -> int:
        """Distinct keys among the fleet's ``fleet_limit`` most recently routed that were routed at
        least twice (to any pods), O(1)."""
        return self._fleet_hot

    def oldest(self, pod: str) -> list[int]:
        """The pod's keys, least recently routed first."""
        d = self._pods.get(pod)
        return list(d) if d is not None else []

    def walk(self, pod: str, index: PrefixIndex, skip: set[int], chunk: int = 64) -> Iterator[bool]:
        """``pod``'s blocks that the index shows it holding, least recently routed first (``skip``
        left out), each ``True`` when another pod holds it too (``False``: the fleet's last copy).
        Keys the pod no longer holds are dropped from the order when the walk is closed; close it
        (``.close()``) before the next :meth:`touch`."""
        d = self._pods.get(pod)
        if d is None:
            return
        stale: list[int] = []
        it = iter(d)
        try:
            while batch := list(islice(it, chunk)):
                keys = [k for k in batch if k not in skip]
                for k, s in zip(keys, index.sharing(pod, keys) if keys else (), strict=True):
                    if s == 0:
                        stale.append(k)
                    else:
                        yield s == 2
        finally:
            for k in stale:
                d.pop(k, None)

    def __len__(self) -> int:
        return sum(len(d) for d in self._pods.values())

    def pods(self) -> list[str]:
        return list(self._pods)

    def forget(self, pod: str) -> None:
        self._pods.pop(pod, None)
