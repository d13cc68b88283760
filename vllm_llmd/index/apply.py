"""Applying one pod's normalized events (:mod:`.adapter`) to the tier store (:mod:`.store`), in
bounded steps.

The appliers of a batch and of a reset are generators: the work between two ``yield`` s is bounded
(``CHUNK_WORK`` units, a unit being one engine block plus one per 16 of its tokens; or
``CHUNK_RECORDS`` records of a reset),
and :class:`vllm_llmd.index.block_index.KVBlockIndex` holds its lock only while a step runs. A
``BlockStored`` of 200,000 blocks is applied as a chain of smaller ones (each continuing from the
last block of the one before, exactly as the engine's own chained events are), so ``match`` on
the router's event loop waits for one step, not for the whole batch (before: up to 280 ms, issue 9
case 7; ``bench/bench_index.py --lock-holds``). Clearing a pod walks only that pod's own records and,
per record, only the tiers that record was stored in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from vllm_llmd.index.adapter import CLEARED, REMOVED, STORED, DecodedBatch
from vllm_llmd.index.chain import CKEYS, Record, extra_bytes, link, split_extra
from vllm_llmd.index.keys import TOKEN_BYTES
from vllm_llmd.index.store import TierStore

logger = logging.getLogger("vllm_llmd.index.block_index")

#: the most work one step (one lock hold) does: ~500k units/s were applied on the 2-core CI box
#: (bench/bench_index.py), so a step takes a few milliseconds
CHUNK_WORK = 2048
CHUNK_RECORDS = 8192


class PodState:
    __slots__ = ("bit", "epoch", "index", "name", "nonfull_groups", "records", "stream", "tiers")

    def __init__(self, name: str, index: int, stream: Any) -> None:
        self.name = name
        self.index = index
        self.bit = 1 << index
        #: bumped whenever everything the pod held is dropped (cache cleared, engine restarted)
        self.epoch = 0
        #: engine block hash -> record (:mod:`.chain`)
        self.records: dict[int, Record] = {}
        #: engine block hash -> bitset of the tiers it is held in
        self.tiers: dict[int, int] = {}
        self.stream = stream
        self.nonfull_groups: set[int] = set()


class Applier:
    """Applies events for every pod of one index (shares its store, counters and root-key cache)."""

    def __init__(
        self, store: TierStore, counters: dict[str, int], root: Callable[[str, str | None], int], block_size: int
    ) -> None:
        self.store = store
        self.c = counters
        self.root = root
        self.block_size = block_size
        self.on_reset: Callable[[], None] = lambda: None
        self._media_logged = False

    def _tier(self, medium: str, nblocks: int) -> int | None:
        t = self.store.tier(medium)
        if t is None:
            self.c["unknown_media"] += nblocks
            if not self._media_logged:
                self._media_logged = True
                logger.warning(
                    "kv index: events name media beyond the %d tiers kept (%s; first unknown: %r): "
                    "their blocks are dropped and counted in unknown_media (logged once)",
                    self.store.max_tiers,
                    ", ".join(self.store.names),
                    medium,
                )
        return t

    # ---- a batch -------------------------------------------------------------------------------
    def batch(self, p: PodState, model: str, batch: DecodedBatch) -> Iterator[None]:
        c = self.c
        c["decode_errors"] += batch.bad_events
        c["unknown_events"] += batch.unknown_events
        c["unknown_fields"] += batch.unknown_fields
        work = 0
        for ev in batch.events:
            kind = ev[0]
            if kind == STORED:
                per_block = 1 + ev[4] // 16
                n = len(ev[1])
                if n * per_block <= CHUNK_WORK:
                    self.stored(p, model, ev)
                    work += n * per_block
                else:  # a long event: a chain of shorter ones, one step each
                    for sub in split_stored(ev, max(1, CHUNK_WORK // per_block)):
                        if work:
                            yield
                        self.stored(p, model, sub)
                        work = len(sub[1]) * per_block
            elif kind == REMOVED:
                hashes = ev[1]
                for i in range(0, len(hashes), CHUNK_WORK):
                    if work >= CHUNK_WORK:
                        work = 0
                        yield
                    part = hashes[i : i + CHUNK_WORK]
                    self.removed(p, (REMOVED, part, ev[2], ev[3]))
                    work += len(part)
            elif kind == CLEARED:
                yield from self.reset(p)
                c["clears"] += 1
            if work >= CHUNK_WORK:
                work = 0
                yield

    # ---- one pod dropped -----------------------------------------------------------------------
    def reset(self, p: PodState) -> Iterator[None]:
        """Drop everything ``p`` holds: O(its own records), one step per ``CHUNK_RECORDS``."""
        p.epoch += 1
        self.on_reset()
        drop = self.store.drop
        records, ptiers, bit = p.records, p.tiers, p.bit
        pop, tpop = records.popitem, ptiers.pop
        while records:
            for _ in range(min(CHUNK_RECORDS, len(records))):
                h, rec = pop()
                drop(rec[CKEYS], bit, tpop(h, 0))
            if records:
                yield
        ptiers.clear()
        p.nonfull_groups.clear()

    # ---- events --------------------------------------------------------------------------------
    def stored(self, p: PodState, model: str, ev: tuple[Any, ...]) -> None:
        _, hashes, parent, tb, bs, medium, lora, extra_keys, group, full = ev
        c = self.c
        nblocks = len(hashes)
        if not full:
            if group is not None:
                p.nonfull_groups.add(group)
            c["skipped_blocks"] += nblocks
            return
        store = self.store
        t = self._tier(medium, nblocks)
        if t is None:
            return
        tbit = 1 << t
        bit = p.bit
        records = p.records
        if not tb:  # a location update: known blocks now also in this tier
            ptiers = p.tiers
            for h in hashes:
                rec = records.get(h)
                if rec is None:
                    c["orphans"] += 1
                    continue
                ptiers[h] = ptiers.get(h, 0) | tbit
                c["evictions"] += store.add(rec[CKEYS], bit, t)
            c["block_events"] += nblocks
            return
        if parent is None:
            salt = None if extra_keys is None else split_extra(extra_keys[0], lora, True)[0]
            prec, root = None, self.root(lora or model, salt)
        else:
            prec, root = records.get(parent), 0
            if prec is None:
                c["orphans"] += nblocks
                return
        xb = None if extra_keys is None else extra_bytes(extra_keys, lora, parent is None)
        keys = link(records, p.tiers, tbit, hashes, tb, bs, self.block_size, prec, root, xb)
        c["evictions"] += store.add(keys, bit, t)
        c["block_events"] += nblocks

    def removed(self, p: PodState, ev: tuple[Any, ...]) -> None:
        _, hashes, medium, group = ev
        c = self.c
        if group is not None and group in p.nonfull_groups:
            c["skipped_blocks"] += len(hashes)
            return
        store = self.store
        t = self._tier(medium, len(hashes))
        if t is None:
            return
        tbit = 1 << t
        bit = p.bit
        records = p.records
        ptiers = p.tiers
        multi_tier = store.others_used(t)  # any pod holds any other tier
        # the common case, written out (the hot loop of removals): this pod only ever used tier t
        td = store.masks[t]
        tget = td.get
        anyd = store.any
        aget = anyd.get
        nbit = ~bit
        for h in hashes:
            held = ptiers.get(h)
            if held is None:
                c["unknown_removals"] += 1
                continue
            if held == tbit and not multi_tier:
                held = 0
                for k in records[h][CKEYS]:
                    v = tget(k)
                    if v is not None and v & bit:
                        v &= nbit
                        if v:
                            td[k] = v
                        else:
                            del td[k]
                        v = aget(k)
                        if v is not None:
                            v &= nbit
                            if v:
                                anyd[k] = v
                            else:
                                del anyd[k]
            elif held & tbit:
                held &= ~tbit
                for k in records[h][CKEYS]:
                    store.clear(k, bit, t)
            if held:
                ptiers[h] = held
            else:
                del ptiers[h]
                del records[h]
        c["block_events"] += len(hashes)


def split_stored(ev: tuple[Any, ...], step: int) -> Iterator[tuple[Any, ...]]:
    """A ``BlockStored`` of many blocks as consecutive events of at most ``step`` blocks, each the
    child of the last block of the one before (the chain records carry the state across)."""
    _, hashes, parent, tb, bs, medium, lora, extra_keys, group, full = ev
    eb = bs * TOKEN_BYTES
    for i in range(0, len(hashes), step):
        yield (
            STORED,
            hashes[i : i + step],
            parent if i == 0 else hashes[i - 1],
            tb[i * eb : (i + step) * eb] if tb else tb,
            bs,
            medium,
            lora,
            None if extra_keys is None else extra_keys[i : i + step],
            group,
            full,
        )
