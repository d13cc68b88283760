"""KVBlockIndex: which pod holds which KV blocks, in which tier, fed by vLLM's KV-event stream.

Data layout (see docs/kv-events.md):

* ``_any``: canonical block key -> pod bitmask (bit ``i`` is the pod with index ``i``) of pods
  holding it in any tier; an ``OrderedDict`` in least-recently-stored order gives the LRU bound
  (``capacity_blocks``). ``_tier_masks[t]``: key -> pod bitmask for tier ``t``.
* per pod, ``records``: engine block hash -> record tuple ``(canonical keys it covers, chain key at
  its end, pending tokens, pending owners, pending extra)`` so children can continue the chain, and
  ``tiers``: engine block hash -> bitset of the tiers it is held in.

Everything in these maps is ints, bytes and tuples of them: the garbage collector never has to
traverse millions of index entries.

``match`` walks the prompt's canonical keys once, AND-ing pod masks: O(blocks) big-int operations,
independent of the number of pods holding the prefix.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import msgspec
import xxhash

from vllm_llmd.index.adapter import CLEARED, REMOVED, STORED, DecodedBatch, decode_payload
from vllm_llmd.index.keys import TOKEN_BYTES, chain_keys, mixed_key, prompt_keys, root_key, token_bytes
from vllm_llmd.wire.topic import parse_topic

logger = logging.getLogger(__name__)

#: Tiers in order of preference; a block held in several tiers is reported by the first of them.
DEFAULT_TIERS = ("GPU", "CPU", "STORAGE")
#: How many recent (seq, payload digest) pairs each pod remembers to tell duplicates from restarts.
RECENT_SEQS = 512

_extra_encoder = msgspec.msgpack.Encoder()


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


#: One engine block of one pod: (complete canonical keys overlapping it, canonical key at the last
#: canonical boundary at or before its end, token bytes between that boundary and its end, engine
#: hashes overlapping those pending bytes, extra-key bytes of the pending canonical block).
_Record = tuple[tuple[int, ...], int, bytes, tuple[int, ...], bytes]
CKEYS, BASE, PENDING, OWNERS, PEXTRA = range(5)


class _Pod:
    __slots__ = ("bit", "epoch", "index", "last_seq", "name", "nonfull_groups", "recent", "records", "tiers")

    def __init__(self, name: str, index: int) -> None:
        self.name = name
        self.index = index
        self.bit = 1 << index
        #: bumped whenever everything the pod held is dropped (cache cleared, engine restarted)
        self.epoch = 0
        self.records: dict[int, _Record] = {}
        self.tiers: dict[int, int] = {}
        self.last_seq: int | None = None
        self.recent: OrderedDict[int, int] = OrderedDict()
        self.nonfull_groups: set[int] = set()


def _split_extra(items: Any, lora_name: str | None, first: bool) -> tuple[str | None, bytes]:
    """One block's untagged extra keys -> (cache salt if this is a first block, bytes to mix in).

    vLLM publishes per block: the LoRA name (str), ``(mm_id, offset)`` pairs, the cache salt (str,
    first block only) and prompt-embeds digests (bytes), in that order (``to_event_extra_keys``).
    """
    if items is None:
        return None, b""
    if not isinstance(items, list | tuple):
        items = [items]
    strings = [x for x in items if isinstance(x, str)]
    others = [x for x in items if not isinstance(x, str)]
    if lora_name is not None and strings and strings[0] == lora_name:
        strings = strings[1:]
    salt = strings[0] if first and strings else None
    if not first and strings:
        others = others + strings  # an unexpected string on a later block: keep it from aliasing
    return salt, (_extra_encoder.encode(others) if others else b"")


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
        self._tiers: list[str] = [t.upper() for t in tiers]
        self._any: OrderedDict[int, int] = OrderedDict()
        self._tier_masks: list[dict[int, int]] = [{} for _ in self._tiers]
        self._tier_ids: dict[str, int] = {t: i for i, t in enumerate(self._tiers)}
        self._pods: dict[str, _Pod] = {}
        self._by_index: list[_Pod | None] = []
        self._free: list[int] = []
        self._roots: dict[tuple[str, str | None], int] = {}
        self._c: dict[str, int] = dict.fromkeys(
            (
                "batches",
                "block_events",
                "evictions",
                "decode_errors",
                "unknown_events",
                "unknown_fields",
                "seq_gaps",
                "missing_batches",
                "duplicates",
                "resets",
                "clears",
                "orphans",
                "unknown_removals",
                "skipped_blocks",
            ),
            0,
        )

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
            anyget = self._any.get
            topget = self._tier_masks[0].get
            k = keys[0]
            active = anyget(k)
            if not active:
                return {}
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
            out: dict[str, PrefixMatch] = {}
            top = self._tiers[0]
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
                    tiers = [self._best_tier(keys[j], low) for j in range(length)] if mixed else [top] * length
                    out[pod.name] = PrefixMatch(length * bs, tiers)
            return out

    def _best_tier(self, key: int, bit: int) -> str:
        for t, masks in enumerate(self._tier_masks):
            if masks.get(key, 0) & bit:
                return self._tiers[t]
        return self._tiers[0]  # pragma: no cover - any-mask set implies a tier bit

    # ---------------------------------------------------------------- ingest

    def ingest(self, pod: str, frames: Sequence[bytes]) -> None:
        """Apply one raw ZMQ multipart message ``[topic, seq (8B BE), msgpack batch]``. Never raises."""
        try:
            self._ingest(pod, frames)
        except Exception:  # a bug of ours must not kill the subscriber; count it
            logger.exception("kv index: failed to apply a batch from %s", pod)
            with self._lock:
                self._c["decode_errors"] += 1

    def _ingest(self, pod: str, frames: Sequence[bytes]) -> None:
        try:
            topic_b, seq_b, payload = frames[0], frames[1], frames[2]
            parsed = parse_topic(bytes(topic_b).decode("utf-8"))
            seq = int.from_bytes(seq_b, "big")
            ok = len(frames) == 3 and len(seq_b) == 8 and parsed is not None and isinstance(payload, bytes)
        except Exception:
            ok = False
        if not ok:
            with self._lock:
                self._c["decode_errors"] += 1
            return
        assert parsed is not None
        model = parsed[1]
        digest = xxhash.xxh3_64_intdigest(payload)
        batch = decode_payload(payload)
        with self._lock:
            c = self._c
            p = self._pods.get(pod) or self._add_pod_locked(pod)
            last = p.last_seq
            if last is not None:
                if seq <= last:
                    if p.recent.get(seq) == digest:
                        c["duplicates"] += 1
                        return
                    logger.info(
                        "kv index: %s seq went back (%d after %d): engine restart, dropping its blocks", pod, seq, last
                    )
                    self._reset_pod_locked(p)
                    c["resets"] += 1
                elif seq > last + 1:
                    c["seq_gaps"] += 1
                    c["missing_batches"] += seq - last - 1
            p.last_seq = seq
            p.recent[seq] = digest
            if len(p.recent) > RECENT_SEQS:
                p.recent.popitem(last=False)
            c["batches"] += 1
            self._apply_locked(p, model, batch)

    def _apply_locked(self, p: _Pod, model: str, batch: DecodedBatch) -> None:
        c = self._c
        if batch.bad_batch:
            c["decode_errors"] += 1
            return
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

    def _tier(self, medium: str) -> int:
        t = self._tier_ids.get(medium)
        if t is None:
            t = self._tier_ids[medium] = len(self._tiers)
            self._tiers.append(medium)
            self._tier_masks.append({})
        return t

    def _add_keys_locked(self, keys: Iterable[int], bit: int, t: int) -> None:
        """Mark ``keys`` held by the pod ``bit`` in tier ``t`` (the hot loop of ingest)."""
        anyd = self._any
        aget = anyd.get
        move = anyd.move_to_end
        td = self._tier_masks[t]
        tget = td.get
        for k in keys:
            v = aget(k)
            if v is None:
                anyd[k] = bit
            else:
                anyd[k] = v | bit
                move(k)
            td[k] = tget(k, 0) | bit
        over = len(anyd) - self.capacity_blocks
        if over > 0:
            masks = self._tier_masks
            for _ in range(over):
                k, _v = anyd.popitem(last=False)
                for d in masks:
                    d.pop(k, None)
            self._c["evictions"] += over

    def _clear_locked(self, key: int, bit: int, t: int) -> None:
        """The pod ``bit`` no longer holds ``key`` in tier ``t``."""
        masks = self._tier_masks
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
        v = self._any.get(key)
        if v is not None:
            v &= ~bit
            if v:
                self._any[key] = v
            else:
                del self._any[key]

    def _stored_locked(self, p: _Pod, model: str, ev: tuple[Any, ...]) -> None:
        _, hashes, parent, tokens, bs, medium, lora, extra_keys, group, full = ev
        c = self._c
        nblocks = len(hashes)
        if not full:
            if group is not None:
                p.nonfull_groups.add(group)
            c["skipped_blocks"] += nblocks
            return
        t = self._tier(medium)
        tbit = 1 << t
        bit = p.bit
        records = p.records
        ptiers = p.tiers
        if not tokens:  # a location update: known blocks now also in this tier
            for h in hashes:
                rec = records.get(h)
                if rec is None:
                    c["orphans"] += 1
                    continue
                ptiers[h] = ptiers.get(h, 0) | tbit
                self._add_keys_locked(rec[CKEYS], bit, t)
            c["block_events"] += nblocks
            return
        try:
            tb = token_bytes(tokens)
        except (OverflowError, TypeError, ValueError):
            c["decode_errors"] += 1
            return
        if parent is None:
            salt = None
            if extra_keys is not None:
                salt, _ = _split_extra(extra_keys[0], lora, True)
            base, pending, owners, pextra = self._root(lora or model, salt), b"", (), b""
        else:
            prec = records.get(parent)
            if prec is None:
                c["orphans"] += nblocks
                return
            _, base, pending, owners, pextra = prec
        cbs = self.block_size
        cb = cbs * TOKEN_BYTES
        eb = bs * TOKEN_BYTES
        off0 = len(pending)
        buf = pending + tb if off0 else tb
        nfull = len(buf) // cb
        xb: list[bytes] | None = None
        if extra_keys is not None and extra_keys.count(None) != len(extra_keys):
            xb = [_split_extra(x, lora, parent is None and j == 0)[1] for j, x in enumerate(extra_keys)]
            if not any(xb) and not pextra:
                xb = None
        if xb is None and not pextra:
            keys = chain_keys(base, buf, cbs)
        else:
            xs = xb or [b""] * nblocks
            keys = []
            k = base
            for m in range(nfull):
                lo, hi = m * cb, (m + 1) * cb
                parts = [pextra] if lo < off0 else []
                j_lo = max(0, (lo - off0) // eb)
                j_hi = min(nblocks, -(-(hi - off0) // eb))
                parts.extend(xs[j_lo:j_hi])
                extra = b"".join(parts)
                k = mixed_key(k, buf[lo:hi], extra) if extra else xxhash.xxh3_64_intdigest(buf[lo:hi], k)
                keys.append(k)
        # the earlier blocks whose pending tokens the first canonical block of this event completes
        if off0 and nfull:
            for h in owners:
                r = records.get(h)
                if r is not None:
                    records[h] = (r[CKEYS] + (keys[0],), *r[1:])
        if off0 == 0 and bs % cbs == 0 and xb is None:
            # the common case: engine blocks are whole canonical blocks, nothing pending
            ratio = bs // cbs
            tget = ptiers.get
            if ratio == 1:
                for h, k in zip(hashes, keys, strict=True):
                    records[h] = ((k,), k, b"", (), b"")
                    ptiers[h] = tget(h, 0) | tbit
            else:
                for j, h in enumerate(hashes):
                    ck = tuple(keys[j * ratio : (j + 1) * ratio])
                    records[h] = (ck, ck[-1], b"", (), b"")
                    ptiers[h] = tget(h, 0) | tbit
        else:
            for j, h in enumerate(hashes):
                start = off0 + j * eb
                end = start + eb
                ck = tuple(keys[start // cb : min(nfull, -(-end // cb))])
                b = end // cb
                rec_base = keys[b - 1] if b > 0 else base
                rec_pending = buf[b * cb : end]
                if not rec_pending:
                    rec_owners, rec_pextra = (), b""
                else:
                    j0 = max(0, (b * cb - off0) // eb)
                    own = tuple(hashes[j0 : j + 1])
                    xs2 = b"".join(xb[j0 : j + 1]) if xb is not None else b""
                    if b * cb < off0:
                        rec_owners, rec_pextra = owners + own, pextra + xs2
                    else:
                        rec_owners, rec_pextra = own, xs2
                records[h] = (ck, rec_base, rec_pending, rec_owners, rec_pextra)
                ptiers[h] = ptiers.get(h, 0) | tbit
        self._add_keys_locked(keys, bit, t)
        c["block_events"] += nblocks

    def _removed_locked(self, p: _Pod, ev: tuple[Any, ...]) -> None:
        _, hashes, medium, group = ev
        c = self._c
        if group is not None and group in p.nonfull_groups:
            c["skipped_blocks"] += len(hashes)
            return
        t = self._tier(medium)
        tbit = 1 << t
        bit = p.bit
        records = p.records
        ptiers = p.tiers
        td = self._tier_masks[t]
        tget = td.get
        anyd = self._any
        aget = anyd.get
        nbit = ~bit
        multi_tier = any(d for d in self._tier_masks if d is not td)  # any pod holds any other tier
        for h in hashes:
            held = ptiers.get(h)
            if held is None:
                c["unknown_removals"] += 1
                continue
            if held == tbit and not multi_tier:
                # the only tier this pod ever used: clear the tier mask and the any mask inline
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
                    self._clear_locked(k, bit, t)
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
        anyd = self._any
        masks = self._tier_masks
        keep = ~p.bit
        for rec in p.records.values():
            for k in rec[CKEYS]:
                v = anyd.get(k)
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
                p.last_seq = None
                p.recent.clear()
                self._c["resets"] += 1

    def seen(self, pod: str, seq: int, payload: bytes) -> bool:
        """Whether this exact batch (seq and payload) was among the pod's recently applied ones."""
        with self._lock:
            p = self._pods.get(pod)
            return p is not None and p.recent.get(seq) == xxhash.xxh3_64_intdigest(payload)

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
            return None if p is None else p.last_seq

    def stats(self) -> IndexStats:
        with self._lock:
            return IndexStats(
                block_size=self.block_size,
                capacity_blocks=self.capacity_blocks,
                blocks=len(self._any),
                pods=len(self._pods),
                engine_blocks=sum(len(p.records) for p in self._pods.values()),
                **self._c,
            )


__all__ = ["DEFAULT_TIERS", "IndexStats", "KVBlockIndex", "PrefixMatch", "parse_topic", "prompt_keys"]
