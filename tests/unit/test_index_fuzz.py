"""Fuzz the wire decoder through ``KVBlockIndex.ingest``: whatever arrives, it never raises."""

from __future__ import annotations

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_llmd.index import KVBlockIndex
from vllm_llmd.wire import seq_to_bytes

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.binary(max_size=40),
    st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "GPU", "CPU", "full_attention"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=12),
        st.dictionaries(st.sampled_from(["type", "block_hashes", "token_ids", "block_size", "medium", "x"]), inner),
    ),
    max_leaves=40,
)
# events shaped like the real ones, with fields drawn at random, so the fuzzer gets past the tag checks
stored_map = st.fixed_dictionaries(
    {
        "type": st.just("BlockStored"),
        "block_hashes": st.lists(st.one_of(st.integers(0, 2**64 - 1), st.binary(min_size=1, max_size=32)), max_size=4),
        "parent_block_hash": st.one_of(st.none(), st.integers(0, 50)),
        "token_ids": st.lists(st.integers(-5, 2**33), max_size=16),
        "block_size": st.integers(-1, 8),
    },
    optional={
        "medium": values,
        "lora_name": values,
        "extra_keys": values,
        "group_idx": values,
        "kv_cache_spec_kind": values,
    },
)
positional = st.lists(values, max_size=12).map(lambda xs: ["BlockStored", *xs])
events = st.lists(st.one_of(stored_map, positional, values), max_size=6)


@FUZZ
@given(st.binary(max_size=200), st.binary(max_size=10), st.binary(max_size=20))
def test_random_bytes_never_raise(payload: bytes, seq: bytes, topic: bytes) -> None:
    idx = KVBlockIndex(block_size=4)
    idx.ingest("p:1", [topic, seq, payload])
    idx.ingest("p:1", [b"kv@p:1@m", seq_to_bytes(1), payload])
    assert idx.stats().batches <= 1


@FUZZ
@given(st.lists(events, min_size=1, max_size=4), st.lists(st.integers(0, 2**64 - 1), min_size=4, max_size=4))
def test_random_batches_never_raise(batches: list, seqs: list[int]) -> None:
    idx = KVBlockIndex(block_size=4, capacity_blocks=16)
    for ev, seq in zip(batches, seqs, strict=False):
        payload = msgspec.msgpack.encode([1.0, ev, None])
        idx.ingest("p:1", [b"kv@p:1@m", seq.to_bytes(8, "big"), payload])
    idx.match("m", list(range(64)))
    s = idx.stats()
    assert s.blocks <= 16
    idx.remove_pod("p:1")
    assert idx.stats().blocks == 0
