"""KVBlockIndex: keys from token ids, mixed engine block sizes, tiers, and every hazard llm-d users hit."""

from __future__ import annotations

import random
import threading

import pytest

from vllm_llmd.index import KVBlockIndex, PrefixMatch
from vllm_llmd.wire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    encode_batch,
    encode_positional_batch,
    seq_to_bytes,
)

MODEL = "m"


def pod_topic(pod: str, model: str = MODEL) -> bytes:
    return f"kv@{pod}@{model}".encode()


class Engine:
    """Produces the event stream of one engine (hashes are arbitrary ints, as an engine's would be)."""

    def __init__(self, idx: KVBlockIndex, pod: str, block_size: int, *, model: str = MODEL, positional: bool = False):
        self.idx, self.pod, self.bs, self.model, self.positional = idx, pod, block_size, model, positional
        self.seq = 0
        self.next_hash = random.randrange(1 << 60)

    def frames(self, events: list, seq: int | None = None) -> list[bytes]:
        enc = encode_positional_batch if self.positional else encode_batch
        s = self.seq if seq is None else seq
        self.seq = s + 1
        return [pod_topic(self.pod, self.model), seq_to_bytes(s), enc(events, ts=1.0)]

    def send(self, events: list, seq: int | None = None) -> None:
        self.idx.ingest(self.pod, self.frames(events, seq))

    def stored(
        self, tokens: list[int], parent: int | None = None, medium: str = "GPU", **kw
    ) -> tuple[BlockStored, list[int]]:
        n = len(tokens) // self.bs
        hashes = [self.next_hash + i for i in range(n)]
        self.next_hash += n
        ev = BlockStored(
            block_hashes=hashes,
            parent_block_hash=parent,
            token_ids=tokens[: n * self.bs],
            block_size=self.bs,
            lora_id=None,
            medium=medium,
            lora_name=kw.pop("lora_name", None),
            **kw,
        )
        return ev, hashes

    def store(self, tokens: list[int], parent: int | None = None, medium: str = "GPU", **kw) -> list[int]:
        ev, hashes = self.stored(tokens, parent, medium, **kw)
        self.send([ev])
        return hashes


def prompt(n: int, seed: int | None = None) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 50_000) for _ in range(n)]


def test_pods_with_different_block_sizes_share_one_index() -> None:
    idx = KVBlockIndex(block_size=64)
    toks = prompt(1000)
    for pod, bs in (("a:1", 32), ("b:1", 64), ("c:1", 128), ("d:1", 16)):
        Engine(idx, pod, bs).store(toks[:512])
    m = idx.match(MODEL, toks)
    assert set(m) == {"a:1", "b:1", "c:1", "d:1"}
    assert all(v.tokens == 512 and v.tiers == ["GPU"] * 8 for v in m.values())
    # a prompt that diverges in block 3 matches 3 blocks only
    other = toks[:200] + prompt(300, seed=1)
    assert {p: v.tokens for p, v in idx.match(MODEL, other).items()} == dict.fromkeys(m, 192)
    assert idx.match(MODEL, prompt(512, seed=2)) == {}


def test_small_engine_blocks_across_events_complete_canonical_blocks_via_the_parent_chain() -> None:
    idx = KVBlockIndex(block_size=64)
    e = Engine(idx, "a:1", 16)
    toks = prompt(256)
    h1 = e.store(toks[:48])  # 3 engine blocks: no full canonical block yet
    assert idx.match(MODEL, toks) == {}
    h2 = e.store(toks[48:80], parent=h1[-1])  # completes canonical block 0, starts block 1
    assert idx.match(MODEL, toks)["a:1"].tokens == 64
    h3 = e.store(toks[80:256], parent=h2[-1])
    assert idx.match(MODEL, toks)["a:1"].tokens == 256
    # removing an engine block inside canonical block 1 (tokens 64..127) cuts the match there
    e.send([BlockRemoved(block_hashes=[h3[0]], medium="GPU")])  # tokens 80..95
    assert idx.match(MODEL, toks)["a:1"].tokens == 64
    # removing the pending-owner block from the first event (tokens 32..47) kills canonical block 0
    e.send([BlockRemoved(block_hashes=[h1[2]], medium="GPU")])
    assert "a:1" not in idx.match(MODEL, toks)


def test_large_engine_blocks_removal_drops_all_their_canonical_blocks() -> None:
    idx = KVBlockIndex(block_size=64)
    e = Engine(idx, "a:1", 256)
    toks = prompt(512)
    hashes = e.store(toks)
    assert idx.match(MODEL, toks)["a:1"].tokens == 512
    e.send([BlockRemoved(block_hashes=[hashes[1]], medium="GPU")])
    assert idx.match(MODEL, toks)["a:1"].tokens == 256
    assert idx.stats().blocks == 4


def test_map_and_positional_forms_and_bytes_hashes_agree() -> None:
    toks = prompt(256)
    results = []
    for positional in (False, True):
        idx = KVBlockIndex(block_size=64)
        e = Engine(idx, "a:1", 64, positional=positional)
        hashes = e.store(toks[:128])
        # the same block hash as a 32-byte digest: its last 8 bytes equal the int form
        digest = bytes(24) + hashes[-1].to_bytes(8, "big")
        e.store(toks[128:256], parent=digest)
        results.append(idx.match(MODEL, toks))
        e.send([BlockRemoved(block_hashes=[digest], medium="GPU")])
        results.append(idx.match(MODEL, toks))
    assert results[0] == results[2] == {"a:1": PrefixMatch(256, ["GPU"] * 4)}
    assert results[1] == results[3] == {"a:1": PrefixMatch(64, ["GPU"])}


def test_all_blocks_cleared_drops_only_that_pod() -> None:
    idx = KVBlockIndex(block_size=32)
    toks = prompt(128)
    a, b = Engine(idx, "a:1", 32), Engine(idx, "b:1", 32)
    a.store(toks)
    b.store(toks)
    a.send([AllBlocksCleared()])
    assert set(idx.match(MODEL, toks)) == {"b:1"}
    assert idx.stats().clears == 1


def test_remove_pod_forgets_it_and_reuses_its_slot() -> None:
    idx = KVBlockIndex(block_size=32)
    toks = prompt(128)
    Engine(idx, "a:1", 32).store(toks)
    Engine(idx, "b:1", 32).store(toks)
    idx.remove_pod("a:1")
    assert set(idx.match(MODEL, toks)) == {"b:1"}
    assert idx.pods() == ["b:1"]
    Engine(idx, "c:1", 32).store(toks[:64])
    m = idx.match(MODEL, toks)
    assert m["c:1"].tokens == 64 and m["b:1"].tokens == 128 and "a:1" not in m
    idx.remove_pod("b:1")
    idx.remove_pod("c:1")
    assert idx.stats().blocks == 0 and idx.stats().pods == 0


def test_engine_restart_seq_backwards_drops_stale_entries_but_duplicates_are_skipped() -> None:
    idx = KVBlockIndex(block_size=32)
    old, new = prompt(64, seed=1), prompt(64, seed=2)
    e = Engine(idx, "a:1", 32)
    e.store(old)
    frames = e.frames([e.stored(old[:32])[0]])
    idx.ingest("a:1", frames)
    idx.ingest("a:1", frames)  # the same batch again (replay overlap): a duplicate, not a restart
    assert idx.stats().duplicates == 1 and idx.stats().resets == 0
    assert "a:1" in idx.match(MODEL, old)
    e.seq = 0  # the engine restarts: seq starts over with new content
    e.store(new)
    assert "a:1" not in idx.match(MODEL, old)
    assert idx.match(MODEL, new)["a:1"].tokens == 64
    assert idx.stats().resets == 1
    assert idx.last_seq("a:1") == 0


def test_seq_gaps_are_counted() -> None:
    idx = KVBlockIndex(block_size=32)
    e = Engine(idx, "a:1", 32)
    e.store(prompt(32))
    e.send([], seq=5)
    s = idx.stats()
    assert s.seq_gaps == 1 and s.missing_batches == 4
    assert idx.last_seq("a:1") == 5


def test_children_with_unknown_parent_are_dropped_and_counted() -> None:
    idx = KVBlockIndex(block_size=32)
    e = Engine(idx, "a:1", 32)
    toks = prompt(128)
    e.store(toks[64:], parent=12345)
    assert idx.match(MODEL, toks) == {}
    assert idx.stats().orphans == 2 and idx.stats().blocks == 0
    e.send([BlockRemoved(block_hashes=[999], medium="GPU")])
    assert idx.stats().unknown_removals == 1


def test_same_block_in_several_tiers() -> None:
    idx = KVBlockIndex(block_size=32)
    e = Engine(idx, "a:1", 32)
    toks = prompt(128)
    hashes = e.store(toks)
    # the connector offloads blocks 2 and 3 to CPU (location update: hashes, no tokens)
    ev = BlockStored(hashes[2:], None, [], 32, None, "CPU", None)
    e.send([ev])
    assert idx.match(MODEL, toks)["a:1"].tiers == ["GPU"] * 4  # GPU is preferred while held there
    e.send([BlockRemoved(block_hashes=hashes[2:], medium="GPU")])
    assert idx.match(MODEL, toks)["a:1"] == PrefixMatch(128, ["GPU", "GPU", "CPU", "CPU"])
    # a storage tier with full token ids also works (unknown tiers get added in order)
    e2 = Engine(idx, "b:1", 64)
    e2.store(toks, medium="storage")
    assert idx.match(MODEL, toks)["b:1"].tiers == ["STORAGE"] * 4
    e.send([BlockRemoved(block_hashes=hashes[2:], medium="CPU")])
    assert idx.match(MODEL, toks)["a:1"].tokens == 64


def test_lora_and_cache_salt_and_multimodal_keys_do_not_alias() -> None:
    idx = KVBlockIndex(block_size=32)
    toks = prompt(64)
    Engine(idx, "lora:1", 32).store(toks, lora_name="adapter", extra_keys=[("adapter",), ("adapter",)])
    Engine(idx, "salt:1", 32).store(toks, extra_keys=[("s3cret",), None])
    Engine(idx, "mm:1", 32).store(toks, extra_keys=[None, (("img-hash", 0),)])
    Engine(idx, "plain:1", 32).store(toks)
    assert set(idx.match(MODEL, toks)) == {"plain:1", "mm:1"}
    assert idx.match(MODEL, toks)["mm:1"].tokens == 32  # the image block never matches plain text
    assert set(idx.match(MODEL, toks, lora="adapter")) == {"lora:1"}
    assert idx.match(MODEL, toks, lora="adapter")["lora:1"].tokens == 64
    assert set(idx.match(MODEL, toks, extra="s3cret")) == {"salt:1"}
    assert idx.match(MODEL, toks, extra="other") == {}
    # another served model never aliases either
    assert idx.match("other-model", toks) == {}


def test_only_full_attention_groups_count() -> None:
    idx = KVBlockIndex(block_size=32)
    e = Engine(idx, "a:1", 32)
    toks = prompt(64)
    full = e.store(toks, group_idx=0, kv_cache_spec_kind="full_attention")
    ev, _ = e.stored(toks, group_idx=1, kv_cache_spec_kind="sliding_window")
    ev.block_hashes = list(full)  # same hashes in the sliding group (HMA hashes per token content)
    e.send([ev])
    e.send([BlockRemoved(block_hashes=full, medium="GPU", group_idx=1)])  # the sliding group's eviction
    assert idx.match(MODEL, toks)["a:1"].tokens == 64
    assert idx.stats().skipped_blocks == 4


def test_memory_is_bounded_with_lru_eviction() -> None:
    idx = KVBlockIndex(block_size=16, capacity_blocks=10)
    e = Engine(idx, "a:1", 16)
    old, new = prompt(80, seed=1), prompt(160, seed=2)
    e.store(old)
    e.store(new)
    s = idx.stats()
    assert s.blocks == 10 and s.evictions == 5
    assert idx.match(MODEL, old) == {}
    assert idx.match(MODEL, new)["a:1"].tokens == 160
    e.send([BlockRemoved(block_hashes=[e.next_hash - 15], medium="GPU")])  # an evicted key: no error
    assert idx.stats().blocks == 10


def test_garbage_is_counted_and_never_raises() -> None:
    idx = KVBlockIndex(block_size=32)
    idx.ingest("a:1", [b"kv@a:1@m", seq_to_bytes(0), b"\xc1not msgpack"])
    idx.ingest("a:1", [b"kv@a:1@m"])
    idx.ingest("a:1", [b"nope", seq_to_bytes(1), encode_batch([])])
    idx.ingest("a:1", None)  # type: ignore[arg-type]
    import msgspec

    raw = msgspec.msgpack.encode(
        [
            1.0,
            [
                {"type": "Mystery", "x": 1},
                {"type": "AllBlocksCleared", "new_field": 1, "other": 2},
                ["BlockRemoved", [1], "GPU", None, "extra-position"],
                {"type": "BlockStored", "block_hashes": "nope"},
                ["BlockStored", [1, 2], None, [1, 2, 3], 2, None, "GPU"],  # wrong token count
                ["BlockStored", [1], None, [-5, 2], 2],  # negative token id
                7,
            ],
        ]
    )
    idx.ingest("a:1", [b"kv@a:1@m", seq_to_bytes(2), raw])
    s = idx.stats()
    assert s.unknown_events == 1
    assert s.unknown_fields == 3
    assert s.clears == 1
    assert s.decode_errors == 4 + 4  # 4 bad messages, then 4 bad events
    assert idx.stats().blocks == 0


def test_block_keys_and_match_keys_reuse_the_prompt_hash() -> None:
    idx = KVBlockIndex(block_size=32)
    toks = prompt(100)
    Engine(idx, "a:1", 32).store(toks[:96])
    keys = idx.block_keys(MODEL, toks)
    assert len(keys) == 3  # the partial tail block has no key
    assert idx.match_keys(keys) == idx.match(MODEL, toks) == {"a:1": PrefixMatch(96, ["GPU"] * 3)}
    assert idx.block_keys(MODEL, toks[:31]) == [] and idx.match(MODEL, []) == {}
    import numpy as np

    assert idx.block_keys(MODEL, np.array(toks, dtype=np.int64)) == keys


def test_match_is_safe_while_another_thread_ingests() -> None:
    idx = KVBlockIndex(block_size=32, capacity_blocks=500)
    toks = prompt(512)
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer() -> None:
        try:
            e = Engine(idx, "a:1", 32)
            while not stop.is_set():
                hashes = e.store(toks)
                e.send([BlockRemoved(block_hashes=hashes[8:], medium="GPU")])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    seen = set()
    try:
        for _ in range(2000):
            m = idx.match(MODEL, toks).get("a:1")
            if m is not None:
                assert m.tokens in (256, 512) and len(m.tiers) * 32 == m.tokens
                seen.add(m.tokens)
    finally:
        stop.set()
        t.join()
    assert not errors and seen


def test_invalid_construction() -> None:
    with pytest.raises(ValueError):
        KVBlockIndex(block_size=0)
    with pytest.raises(ValueError):
        KVBlockIndex(block_size=16, capacity_blocks=0)
