"""The simulator's block allocator: LRU eviction, reference counts, events, against hand-worked
cases and, differentially, against vLLM 0.32's own ``KVCacheManager`` driven with the same
operations (admit with prefix-cache lookup, chunked prefill, decode, free, reset)."""

from __future__ import annotations

import random

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_llmd.sim.hashing import BlockHasher
from vllm_llmd.sim.kv_cache import BlockPool, KVCacheManager
from vllm_llmd.wire import AllBlocksCleared, BlockRemoved, BlockStored

BS = 4


def _manager(num_blocks: int = 8, max_model_len: int = 24) -> KVCacheManager:
    return KVCacheManager(BlockPool(num_blocks, BlockHasher(BS)), max_model_len)


def _admit(m: KVCacheManager, rid: str, tokens: list[int], salt: str | None = None) -> tuple[list[bytes], int] | None:
    hashes = m.pool.hasher.block_hashes(tokens, salt)
    hit, n = m.get_computed_blocks(hashes, len(tokens))
    ok = m.allocate_slots(rid, tokens, hashes, 0, len(tokens) - n, hit, full_sequence_must_fit=True, cache_salt=salt)
    return (hashes, n) if ok else None


def _ext(m: KVCacheManager, tokens: list[int]) -> list[int | bytes]:
    return [m.pool.hasher.external(h) for h in m.pool.hasher.block_hashes(tokens)]


def test_store_event_chains_parent_and_carries_tokens() -> None:
    m = _manager()
    a = list(range(10))
    assert _admit(m, "a", a) is not None
    (ev,) = m.pool.take_events()
    assert isinstance(ev, BlockStored)
    assert ev.block_hashes == _ext(m, a)
    assert ev.parent_block_hash is None and ev.token_ids == a[:8] and ev.block_size == BS
    assert ev.extra_keys == [None, None] and ev.medium == "GPU" and ev.kv_cache_spec_kind == "full_attention"
    # decode fills the third block: one event for it, parented on the second
    a.extend([10, 11])
    hashes = m.pool.hasher.block_hashes(a)
    assert m.allocate_slots("a", a, hashes, 11, 1)
    (ev2,) = m.pool.take_events()
    assert ev2.block_hashes == _ext(m, a)[2:3] and ev2.parent_block_hash == _ext(m, a)[1]


def test_hit_leaves_last_token_to_compute() -> None:
    m = _manager()
    p = list(range(8))  # exactly two blocks
    assert _admit(m, "a", p) is not None
    m.free("a")
    hashes = m.pool.hasher.block_hashes(p)
    hit, n = m.get_computed_blocks(hashes, len(p))
    assert n == 4 and len(hit) == 1  # 8 - 1 tokens may hit: one block


def test_lru_evicts_oldest_chain_tail_first_and_emits_removed() -> None:
    m = _manager(num_blocks=8)  # 7 usable
    a, b = [1] * 8, [2] * 8
    _admit(m, "a", a)
    _admit(m, "b", b)
    m.free("a")
    m.free("b")
    m.pool.take_events()
    # free queue, front first: 3 never-used blocks, then a's tail, a's head, b's tail, b's head
    c = [3] * 20  # 5 blocks: takes the 3 unused, then evicts a's tail and a's head
    assert _admit(m, "c", c) is not None
    removed = [e.block_hashes[0] for e in m.pool.take_events() if isinstance(e, BlockRemoved)]
    ah = _ext(m, a)
    assert removed == [ah[1], ah[0]]
    hb = m.pool.hasher.block_hashes(b)
    assert m.get_computed_blocks(hb, 9)[1] == 8  # b survived


def test_touched_blocks_are_not_evicted_and_refcounts_track_sharers() -> None:
    m = _manager(num_blocks=6)  # 5 usable
    p = list(range(9))  # 2 full blocks + 1 partial
    _admit(m, "a", p)
    r = _admit(m, "b", p)  # shares a's two cached blocks
    assert r is not None and r[1] == 8
    blocks = m.req_blocks["a"][:2]
    assert [b.ref_cnt for b in blocks] == [2, 2]
    m.free("a")
    assert [b.ref_cnt for b in blocks] == [1, 1]
    assert m.pool.num_free_blocks() == 5 - 3  # b holds 2 shared + its own partial block
    # nothing b holds can be evicted: asking for more than the free blocks fails and changes nothing
    m.pool.take_events()
    assert _admit(m, "c", [7] * 13) is None
    assert m.pool.take_events() == [] and m.pool.num_free_blocks() == 2
    m.free("b")
    assert [b.ref_cnt for b in blocks] == [0, 0] and m.pool.num_free_blocks() == 5


def test_uncached_partial_block_is_reused_first_without_eviction() -> None:
    m = _manager(num_blocks=6)
    _admit(m, "a", [1] * 6)  # one full cached block, one partial
    partial = m.req_blocks["a"][1]
    m.free("a")
    assert m.pool.free_queue.order()[0] == partial.block_id
    m.pool.take_events()
    _admit(m, "b", [2] * 3)
    assert m.req_blocks["b"][0] is partial and m.pool.take_events() == []


def test_duplicate_blocks_under_one_hash_are_removed_one_by_one() -> None:
    pool = BlockPool(6, BlockHasher(BS))
    x, y = pool.get_new_blocks(2)
    h = b"h" * 32
    for blk in (x, y):
        blk.block_hash = h
        pool._insert(h, blk)
    pool.free_blocks([x, y])
    pool.take_events()
    pool.get_new_blocks(5)  # 3 unused, then x, then y
    removed = pool.take_events()
    assert [type(e) for e in removed] == [BlockRemoved, BlockRemoved]
    assert pool.get_cached_block(h) is None


def test_reset_refused_while_in_use_then_clears() -> None:
    m = _manager()
    _admit(m, "a", list(range(8)))
    m.pool.take_events()
    assert not m.reset_prefix_cache() and m.pool.take_events() == []
    m.free("a")
    assert m.reset_prefix_cache()
    assert m.pool.take_events() == [AllBlocksCleared()]
    assert m.get_computed_blocks(m.pool.hasher.block_hashes(list(range(8))), 8)[1] == 0


def test_cache_salt_changes_hashes_and_sets_first_extra_key() -> None:
    m = _manager()
    p = list(range(8))
    _admit(m, "a", p, salt="s1")
    (ev,) = m.pool.take_events()
    assert ev.extra_keys == [("s1",), None]
    assert ev.block_hashes != _ext(m, p)


# ---------------------------------------------------------------------------------------------- vs vLLM


def _vllm_manager(num_blocks: int, max_model_len: int):  # type: ignore[no-untyped-def]
    torch = pytest.importorskip("torch")
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_manager import KVCacheManager as VKVCacheManager
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    init_none_hash(sha256)
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=1, head_size=8, dtype=torch.float32)
    cfg = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l"], spec)])
    mgr = VKVCacheManager(
        cfg, max_model_len, scheduler_block_size=BS, hash_block_size=BS, enable_caching=True,
        enable_kv_cache_events=True,
    )  # fmt: skip
    return mgr, get_request_block_hasher(BS, sha256)


def _as_tuple(e: object) -> tuple[object, ...]:
    """An event of either side as comparable plain data."""
    d = msgspec.to_builtins(e)
    d.pop("kv_cache_spec_kind", None)  # annotated by vLLM's manager on take_events, by ours at creation
    d = {k: v for k, v in d.items() if v is not None}
    return (type(e).__name__, tuple(sorted((k, repr(v)) for k, v in d.items())))


@settings(max_examples=30, deadline=None)
@given(st.randoms(use_true_random=False))
def test_same_events_hits_and_free_blocks_as_vllm(rnd: random.Random) -> None:
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    num_blocks, max_len, chunk = 14, 40, 6
    vm, vhasher = _vllm_manager(num_blocks, max_len)
    ours = _manager(num_blocks, max_len)
    base = [[random.Random(k).randrange(50) for _ in range(24)] for k in range(3)]
    live: dict[str, tuple[Request, list[int], list[bytes]]] = {}  # rid -> vLLM request, our tokens, hashes
    n_req = 0

    def check() -> None:
        theirs = [_as_tuple(e) for e in vm.take_events()]
        mine = [_as_tuple(e) for e in ours.pool.take_events()]
        assert mine == theirs
        assert ours.pool.num_free_blocks() == vm.block_pool.get_num_free_blocks()

    for _ in range(60):
        op = rnd.randrange(10)
        rng = random.Random(rnd.getrandbits(32))
        if op <= 2 or not live:  # admit a request sharing a prefix with others
            n_req += 1
            rid = f"r{n_req}"
            toks = base[rng.randrange(3)][: rng.randrange(1, 25)] + [rng.randrange(50) for _ in range(rng.randrange(8))]
            salt = "salt" if rng.random() < 0.15 else None
            vr = Request(rid, list(toks), SamplingParams(max_tokens=8), None, cache_salt=salt, block_hasher=vhasher)
            hashes = ours.pool.hasher.block_hashes(toks, salt)
            vblocks, vn, _ = vm.get_computed_blocks(vr)
            hit, n = ours.get_computed_blocks(hashes, len(toks))
            assert n == vn and [h for h in hashes] == [bytes(h) for h in vr.block_hashes]
            k = min(len(toks) - n, chunk)
            vok = vm.allocate_slots(vr, k, n, vblocks, full_sequence_must_fit=True) is not None
            ok = ours.allocate_slots(rid, toks, hashes, 0, k, hit, full_sequence_must_fit=True, cache_salt=salt)
            assert ok == vok
            if ok:
                vr.num_computed_tokens = n + k
                live[rid] = (vr, toks, hashes)
        elif op <= 6:  # one step of a live request: the next prefill chunk, or a decode token
            rid = sorted(live)[rng.randrange(len(live))]
            vr, toks, hashes = live[rid]
            if vr.num_computed_tokens >= len(toks):
                if len(toks) >= max_len - 1:
                    continue
                t = rng.randrange(50)
                vr.append_output_token_ids(t)
                toks.append(t)
                ours.pool.hasher.extend(hashes, toks, vr.cache_salt)
            k = min(len(toks) - vr.num_computed_tokens, chunk)
            vok = vm.allocate_slots(vr, k) is not None
            ok = ours.allocate_slots(rid, toks, hashes, vr.num_computed_tokens, k, cache_salt=vr.cache_salt)
            assert ok == vok
            if ok:
                vr.num_computed_tokens += k
            else:  # preempted: its blocks go back
                vm.free(vr)
                ours.free(rid)
                del live[rid]
        elif op <= 8:  # a request finishes
            rid = sorted(live)[rng.randrange(len(live))]
            vm.free(live.pop(rid)[0])
            ours.free(rid)
        else:
            assert ours.reset_prefix_cache() == vm.reset_prefix_cache()
        check()


@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"])
@pytest.mark.parametrize("seed", [None, "0"])
def test_hashes_equal_vllms_for_every_algorithm_and_seed(
    algo: str, seed: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils as ku

    if seed is None:
        if algo.startswith("xxhash"):
            return  # vLLM seeds these from os.urandom without PYTHONHASHSEED: nothing to compare
        monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    else:
        monkeypatch.setenv("PYTHONHASHSEED", seed)
    fn = get_hash_fn_by_name(algo)
    ku.init_none_hash(fn)
    tokens = list(range(100, 111))
    theirs, parent = [], None
    for i, start in enumerate(range(0, 8, BS)):
        extra = (("cache_salt", "s"),) if i == 0 else None
        parent = ku.hash_block_tokens(fn, parent, tokens[start : start + BS], extra)
        theirs.append(parent)
    ours = BlockHasher(BS, algo, seed=seed, int_hashes=False)
    assert ours.block_hashes(tokens, cache_salt="s") == theirs
    ints = BlockHasher(BS, algo, seed=seed)
    assert [ints.external(h) for h in theirs] == [int.from_bytes(h, "big") & (2**64 - 1) for h in theirs]
