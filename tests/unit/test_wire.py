"""Our wire types encode exactly what vLLM 0.32 publishes, and the adapter reads both forms."""

from __future__ import annotations

import msgspec
from vllm.distributed import kv_events as vllm_events

from vllm_llmd.index.adapter import CLEARED, REMOVED, STORED, decode_payload
from vllm_llmd.wire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    encode_batch,
    encode_positional_batch,
    seq_from_bytes,
    seq_to_bytes,
)

#: one stored-block event's fields, given to vLLM's ``BlockStored`` and to ours
_STORED = dict(
    block_hashes=[1, b"\x00" * 24 + (2).to_bytes(8, "big")],
    parent_block_hash=None,
    token_ids=list(range(8)),
    block_size=4,
    lora_id=None,
    medium="GPU",
    lora_name=None,
    extra_keys=[None, ("salt",)],
    group_idx=0,
    kv_cache_spec_kind="full_attention",
)


def _ours() -> list:
    return [
        BlockStored(**_STORED),
        BlockRemoved(block_hashes=[1], medium="GPU"),
        AllBlocksCleared(),
    ]


def test_encoding_matches_vllm_byte_for_byte() -> None:
    theirs = vllm_events.KVEventBatch(
        ts=1.5,
        events=[
            vllm_events.BlockStored(**_STORED),
            vllm_events.BlockRemoved(block_hashes=[1], medium="GPU"),
            vllm_events.AllBlocksCleared(),
        ],
    )
    assert encode_batch(_ours(), ts=1.5) == msgspec.msgpack.encode(theirs)
    # and vLLM's own decoder reads ours
    back = msgspec.msgpack.decode(encode_batch(_ours(), ts=1.5), type=vllm_events.KVEventBatch)
    assert [type(e).__name__ for e in back.events] == ["BlockStored", "BlockRemoved", "AllBlocksCleared"]
    assert msgspec.msgpack.decode(encode_batch(_ours()), type=KVEventBatch).events == _ours()


def test_both_forms_decode_to_the_same_normalized_events() -> None:
    a = decode_payload(encode_batch(_ours()))
    b = decode_payload(encode_positional_batch(_ours()))
    assert a.events == b.events
    assert [e[0] for e in a.events] == [STORED, REMOVED, CLEARED]
    stored = a.events[0]
    assert stored[1] == [1, 2]  # the 32-byte digest folds to its last 8 bytes, vLLM's int form
    assert stored[5] == "GPU" and stored[9] is True
    assert a.bad_events == b.bad_events == 0 and a.unknown_fields == b.unknown_fields == 0


def test_seq_framing() -> None:
    assert seq_to_bytes(5) == (5).to_bytes(8, "big")
    assert seq_from_bytes(seq_to_bytes(5)) == 5
    assert seq_from_bytes(b"\xff" * 8) == -1  # the replay's end marker
    assert seq_to_bytes(-1) == b"\xff" * 8


def test_vllm_033_lookahead_tokens_are_a_known_field() -> None:
    """vLLM 0.33 appends ``BlockStored.lookahead_token_ids`` (vllm/distributed/kv_events.py, set only
    with EAGLE block-drop speculative decoding); it is read as a known field and changes no key."""
    plain = msgspec.msgpack.decode(encode_batch(_ours()[:1]))
    ahead = msgspec.msgpack.decode(encode_batch(_ours()[:1]))
    ahead[1][0]["lookahead_token_ids"] = [[9], [10]]
    a, b = decode_payload(msgspec.msgpack.encode(plain)), decode_payload(msgspec.msgpack.encode(ahead))
    assert a.events == b.events and b.unknown_fields == 0 and b.bad_events == 0
    ahead[1][0]["something_new"] = 1  # while a field we do not know is still counted
    assert decode_payload(msgspec.msgpack.encode(ahead)).unknown_fields == 1
