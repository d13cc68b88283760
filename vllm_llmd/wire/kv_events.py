"""msgspec mirrors of vLLM's KV-cache event types and the ZMQ framing around them.

They follow ``vllm/distributed/kv_events.py`` of vLLM 0.32 (``EventBatch`` / ``KVCacheEvent`` /
``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``): the batch is a positional array
``[ts, events, data_parallel_rank]`` and each event is a msgpack *map* tagged by ``"type"``.
Older vLLM (and llm-d tooling) sent each event as a positional array ``[tag, field1, ...]``;
:func:`encode_positional_batch` produces that form (for tests and old-engine simulations).

A publisher sends one ZMQ multipart message per batch: ``[topic, seq (8-byte big-endian), payload]``
(``ZmqEventPublisher._publisher_thread``). The replay socket (ROUTER) answers a DEALER's
``[b"", start_seq]`` with ``[b"", topic, seq, payload]`` frames and ends with seq ``-1`` and an
empty payload (``ZmqEventPublisher._service_replay``).

This module imports nothing of ``vllm_llmd`` (and not vLLM): it is safe for the router and for
the engine side alike.
"""

from __future__ import annotations

from typing import Any

import msgspec

#: vLLM publishes int hashes (low 64 bits of the digest) or the raw 32-byte digest.
ExternalBlockHash = bytes | int

MEDIUM_GPU = "GPU"
MEDIUM_CPU = "CPU"
MEDIUM_STORAGE = "STORAGE"

#: The seq of the replay's end marker, as signed 8-byte big-endian.
END_OF_REPLAY_SEQ = -1


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """Base of the tagged event structs (tag field ``"type"`` = class name), as in vLLM."""


class BlockStored(KVCacheEvent):
    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[ExternalBlockHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


#: the positional (older vLLM, llm-d tooling) form of each event: ``[tag, *fields]``, with the
#: fields in struct order up to the last one that form carried
POSITIONAL_FIELDS: dict[str, tuple[str, ...]] = {
    "BlockStored": BlockStored.__struct_fields__[
        : BlockStored.__struct_fields__.index("kv_cache_spec_sliding_window") + 1
    ],
    "BlockRemoved": BlockRemoved.__struct_fields__[: BlockRemoved.__struct_fields__.index("group_idx") + 1],
    "AllBlocksCleared": (),
}
#: the map form's tag field (``"type"``)
TAG_FIELD: str = BlockStored.__struct_config__.tag_field  # type: ignore[assignment]

_encoder = msgspec.msgpack.Encoder()


def encode_batch(events: list[BlockStored | BlockRemoved | AllBlocksCleared], ts: float = 0.0) -> bytes:
    """The msgpack payload current vLLM publishes (map-encoded events)."""
    return _encoder.encode(KVEventBatch(ts=ts, events=events))


def _positional(event: BlockStored | BlockRemoved | AllBlocksCleared) -> list[Any]:
    tag = type(event).__name__
    return [tag, *(getattr(event, f) for f in POSITIONAL_FIELDS[tag])]


def encode_positional_batch(events: list[BlockStored | BlockRemoved | AllBlocksCleared], ts: float = 0.0) -> bytes:
    """The payload older vLLM published: each event a positional array ``[tag, fields...]``."""
    return _encoder.encode([ts, [_positional(e) for e in events], None])


def seq_to_bytes(seq: int) -> bytes:
    return seq.to_bytes(8, "big", signed=seq < 0)


def seq_from_bytes(raw: bytes) -> int:
    """Decode a seq frame; the replay end marker (``b"\\xff" * 8``) decodes to ``-1``."""
    return int.from_bytes(raw, "big", signed=True)
