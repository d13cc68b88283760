"""Decode one vLLM KV-event payload (either wire form) into normalized events.

Accepts the map-encoded events of current vLLM (``{"type": "BlockStored", ...}``) and the
positional arrays of older vLLM / llm-d tooling (``["BlockStored", hashes, parent, tokens,
block_size, lora_id, medium, lora_name, extra_keys, group_idx, kind, sliding_window]``). vLLM
0.30-0.32 publish the same fields; 0.33 may add ``lookahead_token_ids`` (known, ignored: our keys
come from ``token_ids``).
Nothing here raises on bad input: a payload that is not a batch counts one ``bad_batches``; an
event that is malformed counts one ``bad_events`` and is dropped; unknown event types and unknown
map fields are counted and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from vllm_llmd.index.keys import token_bytes
from vllm_llmd.wire.kv_events import POSITIONAL_FIELDS, TAG_FIELD, AllBlocksCleared, BlockRemoved, BlockStored

MASK64 = (1 << 64) - 1

#: Normalized event kinds (first item of each normalized tuple).
STORED = 0
REMOVED = 1
CLEARED = 2

#: every field a map-form event may carry (the tag and the wire type's fields), per event type
_KNOWN = {
    name: frozenset((TAG_FIELD, *cls.__struct_fields__))
    for name, cls in (
        ("BlockStored", BlockStored),
        ("BlockRemoved", BlockRemoved),
        ("AllBlocksCleared", AllBlocksCleared),
    )
}
#: vLLM 0.33 appends BlockStored.lookahead_token_ids (set only with EAGLE block-drop speculative
#: decoding); our wire types mirror 0.32's byte for byte (16 fields would change msgspec's map header),
#: so it is listed here: known, ignored (our keys come from token_ids alone)
_KNOWN["BlockStored"] |= {"lookahead_token_ids"}
#: position of each field in the positional form (the tag is at 0)
_AT = {name: {f: i + 1 for i, f in enumerate(fields)} for name, fields in POSITIONAL_FIELDS.items()}
_STORED_AT, _REMOVED_AT = _AT["BlockStored"], _AT["BlockRemoved"]
#: the fields _stored() takes, in its order
_STORED_ARGS = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
)
_STORED_POS = tuple(_STORED_AT[f] for f in _STORED_ARGS)

_decoder = msgspec.msgpack.Decoder()


class BadEvent(ValueError):
    pass


@dataclass(slots=True)
class DecodedBatch:
    #: ``(STORED, hashes, parent, token bytes (uint32 LE), block_size, medium, lora_name, extra_keys, group_idx,
    #: full_attn)``,
    #: ``(REMOVED, hashes, medium, group_idx)`` or ``(CLEARED,)``
    events: list[tuple[Any, ...]] = field(default_factory=list)
    ts: float | None = None
    bad_batch: bool = False
    bad_events: int = 0
    unknown_events: int = 0
    unknown_fields: int = 0


def block_hash(value: object) -> int:
    """Normalize an engine hash: ints to their low 64 bits, digests (bytes) to their last 8 bytes
    big-endian, which is exactly what vLLM publishes as an int for the same digest."""
    if type(value) is int:
        return value & MASK64
    if isinstance(value, bytes) and value:
        return int.from_bytes(value[-8:], "big")
    raise BadEvent(f"bad block hash {type(value).__name__}")


def _hashes(value: object) -> list[int]:
    if not isinstance(value, list):
        raise BadEvent("block_hashes is not a list")
    try:
        return [h & MASK64 for h in value]  # the common case: all ints
    except TypeError:
        return [block_hash(h) for h in value]


def _medium(value: object) -> str:
    if value is None:
        return "GPU"
    if not isinstance(value, str) or not value or len(value) > 64:
        raise BadEvent("bad medium")
    return value.upper()


def _opt_int(value: object) -> int | None:
    if value is None or type(value) is int:
        return value  # type: ignore[return-value]
    raise BadEvent("bad integer field")


def _opt_str(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise BadEvent("bad string field")


def _stored(
    hashes: object,
    parent: object,
    tokens: object,
    block_size: object,
    medium: object,
    lora_name: object,
    extra_keys: object,
    group_idx: object,
    kind: object,
) -> tuple[Any, ...]:
    hs = _hashes(hashes)
    if not isinstance(tokens, list):
        raise BadEvent("token_ids is not a list")
    if type(block_size) is not int or block_size <= 0:
        raise BadEvent("bad block_size")
    if tokens and len(tokens) != len(hs) * block_size:
        raise BadEvent("token_ids length is not len(block_hashes) * block_size")
    if extra_keys is not None and (not isinstance(extra_keys, list) or len(extra_keys) != len(hs)):
        raise BadEvent("extra_keys is not one entry per block")
    kind_s = _opt_str(kind)
    try:
        tb = token_bytes(tokens)  # here, outside the index lock; bad ids make a bad event
    except (OverflowError, TypeError, ValueError) as exc:
        raise BadEvent("bad token id") from exc
    return (
        STORED,
        hs,
        None if parent is None else block_hash(parent),
        tb,
        block_size,
        _medium(medium),
        _opt_str(lora_name),
        extra_keys,
        _opt_int(group_idx),
        kind_s is None or kind_s == "full_attention",
    )


def _from_map(ev: dict[Any, Any], out: DecodedBatch) -> None:
    tag = ev.get(TAG_FIELD)
    if tag == "BlockStored":
        g = ev.get
        # written out (not a loop over _STORED_ARGS): this runs once per event on the ingest path
        out.events.append(
            _stored(
                ev["block_hashes"],
                g("parent_block_hash"),
                ev["token_ids"],
                ev["block_size"],
                g("medium"),
                g("lora_name"),
                g("extra_keys"),
                g("group_idx"),
                g("kv_cache_spec_kind"),
            )
        )
    elif tag == "BlockRemoved":
        out.events.append(
            (REMOVED, _hashes(ev["block_hashes"]), _medium(ev.get("medium")), _opt_int(ev.get("group_idx")))
        )
    elif tag == "AllBlocksCleared":
        out.events.append((CLEARED,))
    else:
        out.unknown_events += 1
        return
    known = _KNOWN[tag]
    if len(ev) > len(known) or not known.issuperset(ev):
        out.unknown_fields += sum(1 for k in ev if k not in known)


def _from_array(ev: list[Any], out: DecodedBatch) -> None:
    tag = ev[0] if ev else None
    n = len(ev)
    if tag == "BlockStored":
        if n <= _STORED_AT["block_size"]:
            raise BadEvent("short BlockStored")
        out.events.append(_stored(*[ev[i] if i < n else None for i in _STORED_POS]))
    elif tag == "BlockRemoved":
        if n <= _REMOVED_AT["block_hashes"]:
            raise BadEvent("short BlockRemoved")
        at = _REMOVED_AT
        out.events.append(
            (
                REMOVED,
                _hashes(ev[at["block_hashes"]]),
                _medium(ev[at["medium"]] if at["medium"] < n else None),
                _opt_int(ev[at["group_idx"]] if at["group_idx"] < n else None),
            )
        )
    else:
        if tag != "AllBlocksCleared":
            out.unknown_events += 1
            return
        out.events.append((CLEARED,))
    extra = n - 1 - len(POSITIONAL_FIELDS[tag])
    if extra > 0:
        out.unknown_fields += extra


def decode_payload(payload: bytes) -> DecodedBatch:
    """Decode one msgpack ``EventBatch``. Never raises."""
    out = DecodedBatch()
    try:
        batch = _decoder.decode(payload)
    except Exception:
        out.bad_batch = True
        return out
    if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
        out.bad_batch = True
        return out
    ts = batch[0]
    if not isinstance(ts, int | float) or isinstance(ts, bool):  # [ts, events, ...] or it is no batch
        out.bad_batch = True
        return out
    out.ts = float(ts)
    for ev in batch[1]:
        try:
            if isinstance(ev, dict):
                _from_map(ev, out)
            elif isinstance(ev, list):
                _from_array(ev, out)
            else:
                out.bad_events += 1
        except (BadEvent, KeyError, TypeError, ValueError, OverflowError):
            out.bad_events += 1
    return out
