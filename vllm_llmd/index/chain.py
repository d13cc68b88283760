"""Key chaining of ``BlockStored`` events: an engine's blocks -> the index's canonical block keys.

Engines hash blocks with their own seed and block size; the index keys blocks by the token ids the
event carries (:mod:`vllm_llmd.index.keys`). Each pod keeps one record per engine block hash, so a
later event can continue the chain from its ``parent_block_hash`` and a ``BlockRemoved`` knows which
canonical keys to clear:

``(canonical keys overlapping the block, canonical key at the last canonical boundary at or before
its end, token bytes between that boundary and its end, engine hashes overlapping those pending
bytes, extra-key bytes of the pending canonical block)``.

Engine block sizes that are multiples of the canonical size map one engine block to several keys;
divisors leave pending tokens that a later child event completes (it then appends the completed
key to the records of the blocks that held the pending tokens). Everything is ints, bytes and
tuples: the garbage collector never traverses the index.
"""

from __future__ import annotations

from typing import Any

import msgspec
import xxhash

from vllm_llmd.index.keys import TOKEN_BYTES, chain_keys, mixed_key

#: One engine block of one pod (see the module docstring).
Record = tuple[tuple[int, ...], int, bytes, tuple[int, ...], bytes]
CKEYS, BASE, PENDING, OWNERS, PEXTRA = range(5)

_extra_encoder = msgspec.msgpack.Encoder()


def split_extra(items: Any, lora_name: str | None, first: bool) -> tuple[str | None, bytes]:
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


def extra_bytes(extra_keys: list[Any] | None, lora: str | None, first: bool) -> list[bytes] | None:
    """Per engine block, the extra-key bytes to mix into its canonical blocks (``None``: none)."""
    if extra_keys is None or extra_keys.count(None) == len(extra_keys):
        return None
    xb = [split_extra(x, lora, first and j == 0)[1] for j, x in enumerate(extra_keys)]
    return xb if any(xb) else None


def link(
    records: dict[int, Record],
    ptiers: dict[int, int],
    tbit: int,
    hashes: list[int],
    tb: bytes,
    engine_bs: int,
    canon_bs: int,
    parent: Record | None,
    root: int,
    xb: list[bytes] | None,
) -> list[int]:
    """Chain the token bytes ``tb`` of the engine blocks ``hashes`` from the ``parent`` block's record
    (``None``: from the ``root`` key), write one record per engine block (tier bit ``tbit`` added) and
    return the canonical keys completed."""
    if parent is None:
        base, pending, owners, pextra = root, b"", (), b""
    else:
        _, base, pending, owners, pextra = parent
    nblocks = len(hashes)
    cb = canon_bs * TOKEN_BYTES
    eb = engine_bs * TOKEN_BYTES
    off0 = len(pending)
    buf = pending + tb if off0 else tb
    nfull = len(buf) // cb
    if xb is None and not pextra:
        keys = chain_keys(base, buf, canon_bs)
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
    tget = ptiers.get
    if off0 == 0 and engine_bs % canon_bs == 0 and xb is None:
        # the common case: engine blocks are whole canonical blocks, nothing pending
        ratio = engine_bs // canon_bs
        if ratio == 1:
            for h, k in zip(hashes, keys, strict=True):
                records[h] = ((k,), k, b"", (), b"")
                ptiers[h] = tget(h, 0) | tbit
        else:
            for j, h in enumerate(hashes):
                ck = tuple(keys[j * ratio : (j + 1) * ratio])
                records[h] = (ck, ck[-1], b"", (), b"")
                ptiers[h] = tget(h, 0) | tbit
        return keys
    for j, h in enumerate(hashes):
        first = off0 + j * eb
        end = first + eb
        ck = tuple(keys[first // cb : min(nfull, -(-end // cb))])
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
        ptiers[h] = tget(h, 0) | tbit
    return keys
