"""The per-tier bitmask store: which pods hold each canonical block key, overall and per tier.

* ``any``: key -> pod bitmask (bit ``i`` is the pod with index ``i``) of pods holding it in any
  tier; an ``OrderedDict`` in least-recently-stored order gives the LRU bound (``capacity``).
* ``masks[t]``: key -> pod bitmask for tier ``t``; ``names[t]`` is the tier's medium.

Tiers are the known media (``DEFAULT_TIERS``, in order of preference) plus the first media seen
later, up to ``max_tiers`` in all: the medium string comes from the event stream, and every tier
costs a dict that ``match``, removals and resets walk (with ~60,000 distinct media one
``AllBlocksCleared`` held the index lock 39 s, issue 9). Further media are refused
(:meth:`tier` returns ``None``); the caller counts and drops their events.

Not thread-safe: :class:`vllm_llmd.index.block_index.KVBlockIndex` holds its lock around every call.
The loops are written out (locals for bound methods, no helper calls per key) because they are the
index's hot path (bench/bench_index.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

#: Tiers in order of preference; a block held in several tiers is reported by the first of them.
DEFAULT_TIERS = ("GPU", "CPU", "STORAGE")
#: At most this many tiers (the defaults included); events of further media are dropped.
MAX_TIERS = 8


class TierStore:
    __slots__ = ("any", "capacity", "ids", "masks", "max_tiers", "names")

    def __init__(self, tiers: Iterable[str], capacity: int, max_tiers: int = MAX_TIERS) -> None:
        self.names: list[str] = []
        self.masks: list[dict[int, int]] = []
        self.ids: dict[str, int] = {}
        self.max_tiers = max_tiers
        for t in tiers:
            t = t.upper()
            if t not in self.ids:
                self.ids[t] = len(self.names)
                self.names.append(t)
                self.masks.append({})
        self.max_tiers = max(max_tiers, len(self.names))
        self.any: OrderedDict[int, int] = OrderedDict()
        self.capacity = capacity

    def tier(self, medium: str) -> int | None:
        """The tier index of ``medium`` (a new tier if there is room), ``None`` if there is none."""
        t = self.ids.get(medium)
        if t is None and len(self.names) < self.max_tiers:
            t = self.ids[medium] = len(self.names)
            self.names.append(medium)
            self.masks.append({})
        return t

    def add(self, keys: Iterable[int], bit: int, t: int) -> int:
        """Mark ``keys`` held by the pod ``bit`` in tier ``t``; evict the least recently stored keys
        beyond ``capacity``. Returns how many were evicted."""
        anyd = self.any
        aget = anyd.get
        move = anyd.move_to_end
        td = self.masks[t]
        tget = td.get
        for k in keys:
            v = aget(k)
            if v is None:
                anyd[k] = bit
            else:
                anyd[k] = v | bit
                move(k)
            td[k] = tget(k, 0) | bit
        over = len(anyd) - self.capacity
        if over > 0:
            masks = self.masks
            for _ in range(over):
                k, _v = anyd.popitem(last=False)
                for d in masks:
                    d.pop(k, None)
            return over
        return 0

    def clear(self, key: int, bit: int, t: int) -> None:
        """The pod ``bit`` no longer holds ``key`` in tier ``t``."""
        masks = self.masks
        td = masks[t]
        v = td.get(key)
        if v is None or not v & bit:
            return
        v &= ~bit
        if v:
            td[key] = v
        else:
            del td[key]
        for d in masks:
            if d.get(key, 0) & bit:
                return  # still held in another tier
        v = self.any.get(key)
        if v is not None:
            v &= ~bit
            if v:
                self.any[key] = v
            else:
                del self.any[key]

    def others_used(self, t: int) -> bool:
        """Whether any pod holds anything in a tier other than ``t``."""
        td = self.masks[t]
        return any(d for d in self.masks if d is not td)

    def drop(self, keys: Iterable[int], bit: int, tiers: int) -> None:
        """The pod ``bit`` holds none of ``keys`` any more, in the tiers of the bitset ``tiers``
        (the tiers its engine blocks were recorded in) nor overall."""
        anyd = self.any
        aget = anyd.get
        keep = ~bit
        masks = [self.masks[t] for t in range(len(self.masks)) if tiers >> t & 1]
        for k in keys:
            v = aget(k)
            if v is None:
                continue
            for d in masks:
                m = d.get(k)
                if m is not None:
                    m &= keep
                    if m:
                        d[k] = m
                    else:
                        del d[k]
            v &= keep
            if v:
                anyd[k] = v
            else:
                del anyd[k]

    def walk(self, keys: Sequence[int]) -> tuple[list[tuple[int, int]], int]:
        """Match ``keys`` as a prefix: ``([(pods mask, matched length), ...], pods with a matched
        key outside the top tier)``. O(len(keys)) big-int operations, whatever the number of pods."""
        anyget = self.any.get
        topget = self.masks[0].get
        k = keys[0]
        active = anyget(k)
        if not active:
            return [], 0
        nontop = active & ~topget(k, 0)
        ends: list[tuple[int, int]] = []
        n = len(keys)
        for i in range(1, n):
            k = keys[i]
            m = active & anyget(k, 0)
            if m != active:
                ends.append((active ^ m, i))
                active = m
                if not m:
                    break
            nontop |= active & ~topget(k, 0)
        if active:
            ends.append((active, n))
        return ends, nontop

    def best_tier(self, key: int, bit: int) -> str:
        for t, masks in enumerate(self.masks):
            if masks.get(key, 0) & bit:
                return self.names[t]
        return self.names[0]  # pragma: no cover - any-mask set implies a tier bit
