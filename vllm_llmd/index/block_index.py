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
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

from vllm_llmd.index.adapter import DecodedBatch, decode_payload
from vllm_llmd.index.apply import Applier, PodState
from vllm_llmd.index.keys import chain_keys, prompt_keys, root_key, token_bytes
from vllm_llmd.index.store import DEFAULT_TIERS, TierStore
from vllm_llmd.index.stream import RECENT_SEQS, SeqState, Verdict, parse_frames
from vllm_llmd.wire.logs import LogLimiter
from vllm_llmd.wire.topic import parse_topic

logger = logging.getLogger(__name__)
_bug_log = LogLimiter(logger)


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
    unknown_media: int  # blocks of events naming a medium beyond the tiers kept (dropped)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


_COUNTERS = tuple(
    f
    for f in IndexStats.__dataclass_fields__
    if f not in ("block_size", "capacity_blocks", "blocks", "pods", "engine_blocks")
)


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
        #: held by readers and by each bounded step of a writer (see :mod:`.apply`)
        self._lock = threading.Lock()
        #: serialises writers (ingest, reset_pod, remove_pod) across their steps
        self._write = threading.Lock()
        self._epochs_total = 0
        self._store = TierStore(tiers, capacity_blocks)
        self._pods: dict[str, PodState] = {}
        self._by_index: list[PodState | None] = []
        self._free: list[int] = []
        self._roots: dict[tuple[str, str | None], int] = {}
        self._c: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self._apply = Applier(self._store, self._c, self._root, block_size)
        self._apply.on_reset = self._count_epoch

    def _count_epoch(self) -> None:
        self._epochs_total += 1

    def _drive(self, steps: Iterator[None]) -> None:
        """Run ``steps`` (caller holds ``_write``), holding ``_lock`` for one step at a time."""
        lock = self._lock
        while True:
            with lock:
                try:
                    next(steps)
                except StopIteration:
                    return
            time.sleep(0)  # let a match() waiting for the lock in before the next step

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

    def blocks_held(self, pod: str) -> int:
        """Engine blocks ``pod`` holds in any tier (its records; in the pod's own block size), O(1);
        0 for a pod the index has not seen."""
        p = self._pods.get(pod)
        return 0 if p is None else len(p.records)

    def distinct_blocks(self) -> int:
        """Canonical blocks (the index's block size) at least one pod holds in any tier, O(1): the
        fleet's distinct KV, each block counted once however many pods hold it."""
        return len(self._store.any)

    def sharing(self, pod: str, keys: Sequence[int]) -> list[int]:
        """Per canonical key: 0 ``pod`` does not hold it, 1 only ``pod`` holds it (the fleet's last
        copy), 2 ``pod`` and at least one other pod hold it (any tier each)."""
        with self._lock:
            p = self._pods.get(pod)
            if p is None:
                return [0] * len(keys)
            bit = p.bit
            get = self._store.any.get
            out = []
            for k in keys:
                m = get(k, 0)
                out.append(0 if not m & bit else 2 if m & ~bit else 1)
            return out

    # ---------------------------------------------------------------- ingest

    def ingest(self, pod: str, frames: Sequence[bytes], *, hold: bool = False) -> Verdict:
        """Apply one raw ZMQ multipart message ``[topic, seq (8B BE), msgpack batch]``; return what it
        was (:class:`Verdict`). With ``hold``, a batch after a gap or from a restarted engine is not
        applied (nothing changes): the caller can fetch the missing batches first. Never raises."""
        try:
            return self._ingest(pod, frames, hold)
        except Exception:  # a bug of ours must not kill the subscriber; count it
            _bug_log.log(logging.ERROR, "kv index: failed to apply a batch from %s", pod, exc_info=True)
            with self._lock:
                self._c["decode_errors"] += 1
            return Verdict.BAD

    def _ingest(self, pod: str, frames: Sequence[bytes], hold: bool) -> Verdict:
        frame = parse_frames(frames)
        batch = None if frame is None else decode_payload(frame.payload)
        if frame is None or batch is None or batch.bad_batch:
            # only a well-formed batch may move the stream (a garbage one is no restart)
            with self._lock:
                self._c["decode_errors"] += 1
            return Verdict.BAD
        digest = frame.digest
        with self._write:
            verdict: list[Verdict] = []
            self._drive(self._ingest_steps(pod, frame.seq, digest, frame.model, batch, hold, verdict))
            return verdict[0]

    def _ingest_steps(
        self, pod: str, seq: int, digest: int, model: str, batch: DecodedBatch, hold: bool, out: list[Verdict]
    ) -> Iterator[None]:
        c = self._c
        p = self._pods.get(pod) or self._add_pod_locked(pod)
        verdict = p.stream.classify(seq, digest)
        out.append(verdict)
        if verdict is Verdict.DUPLICATE:
            c["duplicates"] += 1
            return
        if hold and verdict in (Verdict.GAP, Verdict.RESTART):
            return
        if verdict is Verdict.RESTART:
            logger.info(
                "kv index: %s seq went back (%d after %s): engine restart, dropping its blocks", pod, seq, p.stream.last
            )
            c["resets"] += 1
            yield from self._apply.reset(p)
        elif verdict is Verdict.GAP:
            assert p.stream.last is not None
            c["seq_gaps"] += 1
            c["missing_batches"] += seq - p.stream.last - 1
        p.stream.accept(seq, digest)
        c["batches"] += 1
        yield from self._apply.batch(p, model, batch)

    # ------------------------------------------------------------------ pods

    def _add_pod_locked(self, name: str) -> PodState:
        if self._free:
            i = self._free.pop()
        else:
            i = len(self._by_index)
            self._by_index.append(None)
        p = PodState(name, i, SeqState())
        self._by_index[i] = p
        self._pods[name] = p
        return p

    def reset_pod(self, pod: str) -> None:
        """Drop everything the index holds for ``pod`` and its seq state (engine restart, resync);
        the pod stays known. Counted in ``resets``."""
        with self._write:
            p = self._pods.get(pod)
            if p is not None:
                self._drive(self._apply.reset(p))
                with self._lock:
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
        with self._write:
            p = self._pods.get(pod)
            if p is None:
                return
            self._drive(self._apply.reset(p))
            with self._lock:  # its bit is free again only once nothing of it is left
                del self._pods[pod]
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
