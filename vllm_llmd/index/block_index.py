"""KVBlockIndex: which pod holds which KV blocks, in which tier, fed by vLLM's KV-event stream.

The jobs are split by module (see docs/kv-events.md):

* :mod:`.stream`: framing, sequence numbers, duplicates, gaps, engine restarts (per pod);
* :mod:`.adapter`: a batch's payload -> normalized events;
* :mod:`.chain` and :mod:`.keys`: engine blocks -> the index's own canonical block keys, with one
  record per engine block hash per pod;
* :mod:`.store`: canonical key -> pod bitmask, overall (LRU-bounded) and per tier.

This module owns the pods (a pod is a bit position: 100 pods holding a block cost one entry), the
lock, and the order of work. ``match`` walks the prompt's canonical keys once, AND-ing pod masks:
O(blocks) big-int operations, independent of the number of pods holding the prefix.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from vllm_llmd.index.adapter import CLEARED, REMOVED, STORED, DecodedBatch, decode_payload
from vllm_llmd.index.chain import CKEYS, Record, extra_bytes, link, split_extra
from vllm_llmd.index.keys import chain_keys, prompt_keys, root_key, token_bytes
from vllm_llmd.index.store import DEFAULT_TIERS, TierStore
from vllm_llmd.index.stream import RECENT_SEQS, SeqState, Verdict, parse_frames
from vllm_llmd.wire.topic import parse_topic

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class PrefixMatch:
    """What one pod holds of a prompt's leading blocks."""

    #: leading prompt tokens the pod holds (any tier), a multiple of the index's block size
    tokens: int
    #: the tier of each matched canonical block, in order (best tier if held in several)
    tiers: list[str]

    @property
    def blocks(self) -> int:
        return len(self.tiers)


@dataclass(slots=True)
class IndexStats:
    block_size: int
    capacity_blocks: int
    blocks: int  # canonical keys held by at least one pod
    pods: int
    engine_blocks: int  # engine block records tracked (all pods)
    batches: int
    block_events: int  # blocks stored + removed, as applied
    evictions: int
    decode_errors: int  # bad frames, bad batches, bad events
    unknown_events: int
    unknown_fields: int
    seq_gaps: int  # batches that arrived after a gap in seq
    missing_batches: int  # batches skipped over by those gaps
    duplicates: int
    resets: int  # engine restarts detected (seq went backwards)
    clears: int  # AllBlocksCleared applied
    orphans: int  # stored blocks dropped because their parent was unknown
    unknown_removals: int
    skipped_blocks: int  # blocks of non-full-attention groups

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


_COUNTERS = tuple(
    f
    for f in IndexStats.__dataclass_fields__
    if f not in ("block_size", "capacity_blocks", "blocks", "pods", "engine_blocks")
)


class _Pod:
    __slots__ = ("bit", "epoch", "index", "name", "nonfull_groups", "records", "stream", "tiers")

    def __init__(self, name: str, index: int) -> None:
        self.name = name
        self.index = index
        self.bit = 1 << index
        #: bumped whenever everything the pod held is dropped (cache cleared, engine restarted)
        self.epoch = 0
        #: engine block hash -> record (:mod:`.chain`)
        self.records: dict[int, Record] = {}
        #: engine block hash -> bitset of the tiers it is held in
        self.tiers: dict[int, int] = {}
        self.stream = SeqState()
        self.nonfull_groups: set[int] = set()


class KVBlockIndex:
    """Global index of KV blocks held by every pod, keyed by our own token-derived block keys.

    Thread-safe: ``ingest`` (subscriber thread) and ``match`` (router) may run concurrently.
    """

    def __init__(self, block_size: int = 64, capacity_blocks: int = 4_000_000, tiers: Iterable[str] = DEFAULT_TIERS):
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        if capacity_blocks <= 0:
            raise ValueError("capacity_blocks must be positive")
        self.block_size = block_size
        self.capacity_blocks = capacity_blocks
        self._lock = threading.Lock()
        self._epochs_total = 0
        self._store = TierStore(tiers, capacity_blocks)
        self._pods: dict[str, _Pod] = {}
        self._by_index: list[_Pod | None] = []
        self._free: list[int] = []
        self._roots: dict[tuple[str, str | None], int] = {}
        self._c: dict[str, int] = dict.fromkeys(_COUNTERS, 0)

    # ------------------------------------------------------------------ keys

    def _root(self, model: str, salt: str | None) -> int:
        k = (model, salt)
        r = self._roots.get(k)
        if r is None:
            if len(self._roots) > 4096:
                self._roots.clear()
            r = self._roots[k] = root_key(model, salt)
        return r

    def block_keys(
        self, model: str, token_ids: Sequence[int], *, lora: str | None = None, extra: str | None = None
    ) -> list[int]:
        """The prompt's canonical block keys (hash a prompt once, then :meth:`match_keys` many times).

        ``lora``: the adapter name if the request uses one (it replaces the model in the key chain).
        ``extra``: the request's ``cache_salt``.
        """
        n = len(token_ids) - len(token_ids) % self.block_size
        if n <= 0:
            return []
        return chain_keys(self._root(lora or model, extra), token_bytes(token_ids[:n]), self.block_size)

    # ----------------------------------------------------------------- match

    def match(
        self, model: str, token_ids: Sequence[int], *, lora: str | None = None, extra: str | None = None
    ) -> dict[str, PrefixMatch]:
        """Pods holding a leading part of the prompt -> what they hold. Pods holding nothing are absent."""
        return self.match_keys(self.block_keys(model, token_ids, lora=lora, extra=extra))

    def match_keys(self, keys: Sequence[int]) -> dict[str, PrefixMatch]:
        if not keys:
            return {}
        with self._lock:
            store = self._store
            ends, nontop = store.walk(keys)
            out: dict[str, PrefixMatch] = {}
            top = store.names[0]
            bs = self.block_size
            by_index = self._by_index
            for mask, length in ends:
                while mask:
                    low = mask & -mask
                    mask ^= low
                    pod = by_index[low.bit_length() - 1]
                    if pod is None:
                        continue
                    mixed = low & nontop  # some matched block of this pod is not in the top tier
                    tiers = [store.best_tier(keys[j], low) for j in range(length)] if mixed else [top] * length
                    out[pod.name] = PrefixMatch(length * bs, tiers)
            return out

    # ---------------------------------------------------------------- ingest

    def ingest(self, pod: str, frames: Sequence[bytes], *, hold: bool = False) -> Verdict:
        """Apply one raw ZMQ multipart message ``[topic, seq (8B BE), msgpack batch]``; return what it
        was (:class:`Verdict`). With ``hold``, a batch after a gap or from a restarted engine is not
        applied (nothing changes): the caller can fetch the missing batches first. Never raises."""
        try:
            return self._ingest(pod, frames, hold)
        except Exception:  # a bug of ours must not kill the subscriber; count it
            logger.exception("kv index: failed to apply a batch from %s", pod)
            with self._lock:
                self._c["decode_errors"] += 1
            return Verdict.BAD

    def _ingest(self, pod: str, frames: Sequence[bytes], hold: bool) -> Verdict:
        frame = parse_frames(frames)
        if frame is None:
            with self._lock:
                self._c["decode_errors"] += 1
            return Verdict.BAD
        batch = decode_payload(frame.payload)
        if batch.bad_batch:  # only a well-formed batch may move the stream (a garbage one is no restart)
            with self._lock:
                self._c["decode_errors"] += 1
            return Verdict.BAD
        digest = frame.digest
        with self._lock:
            c = self._c
            p = self._pods.get(pod) or self._add_pod_locked(pod)
            seq = frame.seq
            verdict = p.stream.classify(seq, digest)
            if verdict is Verdict.DUPLICATE:
                c["duplicates"] += 1
                return verdict
            if hold and verdict in (Verdict.GAP, Verdict.RESTART):
                return verdict
            if verdict is Verdict.RESTART:
                logger.info(
                    "kv index: %s seq went back (%d after %s): engine restart, dropping its blocks",
                    pod,
                    seq,
                    p.stream.last,
                )
                self._reset_pod_locked(p)
                c["resets"] += 1
            elif verdict is Verdict.GAP:
                assert p.stream.last is not None
                c["seq_gaps"] += 1
                c["missing_batches"] += seq - p.stream.last - 1
            p.stream.accept(seq, digest)
            c["batches"] += 1
            self._apply_locked(p, frame.model, batch)
            return verdict

    def _apply_locked(self, p: _Pod, model: str, batch: DecodedBatch) -> None:
        c = self._c
        c["decode_errors"] += batch.bad_events
        c["unknown_events"] += batch.unknown_events
        c["unknown_fields"] += batch.unknown_fields
        for ev in batch.events:
            kind = ev[0]
            if kind == STORED:
                self._stored_locked(p, model, ev)
            elif kind == REMOVED:
                self._removed_locked(p, ev)
            elif kind == CLEARED:
                self._reset_pod_locked(p)
                c["clears"] += 1

    def _stored_locked(self, p: _Pod, model: str, ev: tuple[Any, ...]) -> None:
        _, hashes, parent, tokens, bs, medium, lora, extra_keys, group, full = ev
        c = self._c
        nblocks = len(hashes)
        if not full:
            if group is not None:
                p.nonfull_groups.add(group)
            c["skipped_blocks"] += nblocks
            return
        store = self._store
        t = store.tier(medium)
        tbit = 1 << t
        bit = p.bit
        records = p.records
        if not tokens:  # a location update: known blocks now also in this tier
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
        try:
            tb = token_bytes(tokens)
        except (OverflowError, TypeError, ValueError):
            c["decode_errors"] += 1
            return
        if parent is None:
            salt = None if extra_keys is None else split_extra(extra_keys[0], lora, True)[0]
            prec, root = None, self._root(lora or model, salt)
        else:
            prec, root = records.get(parent), 0
            if prec is None:
                c["orphans"] += nblocks
                return
        xb = None if extra_keys is None else extra_bytes(extra_keys, lora, parent is None)
        keys = link(records, p.tiers, tbit, hashes, tb, bs, self.block_size, prec, root, xb)
        c["evictions"] += store.add(keys, bit, t)
        c["block_events"] += nblocks

    def _removed_locked(self, p: _Pod, ev: tuple[Any, ...]) -> None:
        _, hashes, medium, group = ev
        c = self._c
        if group is not None and group in p.nonfull_groups:
            c["skipped_blocks"] += len(hashes)
            return
        store = self._store
        t = store.tier(medium)
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

    # ------------------------------------------------------------------ pods

    def _add_pod_locked(self, name: str) -> _Pod:
        if self._free:
            i = self._free.pop()
        else:
            i = len(self._by_index)
            self._by_index.append(None)
        p = _Pod(name, i)
        self._by_index[i] = p
        self._pods[name] = p
        return p

    def _reset_pod_locked(self, p: _Pod) -> None:
        drop = self._store.drop
        for rec in p.records.values():
            drop(rec[CKEYS], p.bit, -1)
        p.records.clear()
        p.tiers.clear()
        p.nonfull_groups.clear()
        p.epoch += 1
        self._epochs_total += 1

    def reset_pod(self, pod: str) -> None:
        """Drop everything the index holds for ``pod`` and its seq state (engine restart, resync);
        the pod stays known. Counted in ``resets``."""
        with self._lock:
            p = self._pods.get(pod)
            if p is not None:
                self._reset_pod_locked(p)
                p.stream.reset()
                self._c["resets"] += 1

    def continues(self, pod: str, replayed: Iterable[Sequence[bytes]]) -> bool:
        """Whether the replayed batches (``[topic, seq, payload]`` each) still hold the last batch
        applied for ``pod``: same engine, nothing lost (see :meth:`.stream.SeqState.continues`)."""
        frames = [f for f in map(parse_frames, replayed) if f is not None]
        with self._lock:
            p = self._pods.get(pod)
            return p is not None and p.stream.continues((f.seq, f.digest) for f in frames)

    def remove_pod(self, pod: str) -> None:
        """Forget ``pod`` entirely (it left the pool)."""
        with self._lock:
            p = self._pods.pop(pod, None)
            if p is None:
                return
            self._reset_pod_locked(p)
            self._by_index[p.index] = None
            self._free.append(p.index)

    def pods(self) -> list[str]:
        with self._lock:
            return list(self._pods)

    def epochs_total(self) -> int:
        """Sum of every pod's :meth:`epoch` so far: unchanged means no pod dropped anything."""
        return self._epochs_total

    def epoch(self, pod: str) -> int:
        """How many times everything ``pod`` held was dropped (``AllBlocksCleared``, engine restart,
        resync); 0 for a pod the index has not seen. Lets consumers forget their own per-pod
        estimates of what the pod holds."""
        p = self._pods.get(pod)
        return 0 if p is None else p.epoch

    def last_seq(self, pod: str) -> int | None:
        """The seq of the last batch applied for ``pod`` (``None`` if none since its last reset)."""
        with self._lock:
            p = self._pods.get(pod)
            return None if p is None else p.stream.last

    def stats(self) -> IndexStats:
        with self._lock:
            return IndexStats(
                block_size=self.block_size,
                capacity_blocks=self.capacity_blocks,
                blocks=len(self._store.any),
                pods=len(self._pods),
                engine_blocks=sum(len(p.records) for p in self._pods.values()),
                **self._c,
            )


__all__ = [
    "DEFAULT_TIERS",
    "RECENT_SEQS",
    "IndexStats",
    "KVBlockIndex",
    "PrefixMatch",
    "Verdict",
    "chain_keys",
    "parse_topic",
    "prompt_keys",
    "root_key",
    "token_bytes",
]
