"""Cross-layout hand-off math: canonical views of every KV layout we know, the read descriptors a
decode engine builds from a peer's KVLayout, and the re-layout on receive.

The "read" here is a memmove per descriptor inside one process (the NIXL READ moves the same bytes
between processes; tests/unit/test_rbln_transport.py does that for real). Every token of a request
carries a value derived from (layer, K/V, head, token, dim), so a token landing in the wrong block,
head, half or position is caught, and so is a write outside the request's blocks.
"""

from __future__ import annotations

import ctypes
import itertools

import msgspec
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kv_helpers import HEAD_SIZE, HEADS, LAYERS, fill, make_cache, token_values, views_of
from vllm_llmd.connectors.layout import (
    KVLayout,
    block_runs,
    mapping_problems,
    outside,
    plan_tokens,
    read_descriptors,
    same_layout,
    slot_bytes,
)
from vllm_llmd.connectors.relayout import RecvPool, describe, kv_views, relayout_into


def emulate_read(local: np.ndarray, remote: np.ndarray) -> None:
    for (la, n), (ra, m) in zip(local.tolist(), remote.tolist(), strict=True):
        assert n == m
        ctypes.memmove(la, ra, n)


def hand_off(src_kind, src_bs, dst_kind, dst_bs, num_tokens, first_token, rng) -> None:
    src_blocks_n = -(-num_tokens // src_bs) + 3
    src = make_cache(src_kind, src_blocks_n, src_bs)
    src_views = views_of(src_kind, src, src_bs)
    remote_ids = rng.permutation(src_blocks_n)[: -(-num_tokens // src_bs)].tolist()
    fill(src_views, remote_ids, num_tokens)
    remote = msgspec.msgpack.decode(msgspec.msgpack.encode(describe(src_views, src_kind)), type=KVLayout)

    dst_blocks_n = -(-num_tokens // dst_bs) + 4
    dst = make_cache(dst_kind, dst_blocks_n, dst_bs)
    dst_views = views_of(dst_kind, dst, dst_bs)
    local_layout = describe(dst_views, dst_kind)
    assert mapping_problems(local_layout, remote) == {}
    local_ids = rng.permutation(dst_blocks_n)[: -(-(num_tokens - first_token) // dst_bs) + 1].tolist()

    plan = plan_tokens(remote_ids, src_bs, local_ids, dst_bs, first_token, num_tokens)
    pool = RecvPool(torch.zeros(1 << 20, dtype=torch.uint8))
    need = slot_bytes(remote, len(plan.remote_blocks))
    off = pool.alloc(need)
    assert off is not None
    local_descs, remote_descs = read_descriptors(remote, plan.remote_blocks, pool.base + off)
    assert local_descs[:, 1].sum() == need
    emulate_read(local_descs, remote_descs)
    written = relayout_into(pool.view(off, need), remote, plan, dst_views)
    assert written == LAYERS * 2 * HEADS * (num_tokens - first_token) * HEAD_SIZE * 2

    # every token of the range is where the decode engine's attention will look for it ...
    for layer, v in enumerate(dst_views):
        for i, b in enumerate(plan.local_blocks):
            lo = first_token + i * dst_bs
            cnt = min(dst_bs, num_tokens - lo)
            assert torch.equal(v[b, :, :, :cnt], token_values(layer, np.arange(lo, lo + cnt))), (layer, i)
            assert not v[b, :, :, cnt:].any()  # ... and nothing past the request's last token
        others = sorted(set(range(dst_blocks_n)) - set(plan.local_blocks))
        assert not v[others].any()  # no other block was touched


KINDS = ("cpu", "cpu-amx", "cuda", "cuda-5d", "rbln-blocks-first", "rbln-kv-first")


@pytest.mark.parametrize(("src_kind", "dst_kind"), list(itertools.product(KINDS, KINDS)))
def test_every_layout_pair_hands_off_across_block_sizes(src_kind: str, dst_kind: str) -> None:
    rng = np.random.default_rng(0)
    # GPU-like 16 -> NPU-like 64 (and back), a decode-side prefix hit of one local block
    hand_off(src_kind, 16, dst_kind, 64, num_tokens=150, first_token=0, rng=rng)
    hand_off(src_kind, 64, dst_kind, 16, num_tokens=150, first_token=32, rng=rng)
    hand_off(src_kind, 32, dst_kind, 32, num_tokens=100, first_token=64, rng=rng)


@settings(max_examples=40, deadline=None)
@given(
    src_bs=st.sampled_from([32, 64, 96, 128]),
    dst_bs=st.sampled_from([32, 64, 96, 128]),
    num_tokens=st.integers(1, 400),
    hit_blocks=st.integers(0, 3),
    kinds=st.sampled_from(
        [
            ("cpu", "rbln-blocks-first"),
            ("cuda", "cpu"),
            ("rbln-kv-first", "cuda"),
            ("cpu-amx", "cpu"),
            ("cpu", "cpu-amx"),
        ]
    ),
    seed=st.integers(0, 2**16),
)
def test_any_block_sizes_and_prefix_hit(src_bs, dst_bs, num_tokens, hit_blocks, kinds, seed) -> None:
    first = min(hit_blocks * dst_bs, ((num_tokens - 1) // dst_bs) * dst_bs)
    hand_off(kinds[0], src_bs, kinds[1], dst_bs, num_tokens, first, np.random.default_rng(seed))


def test_descriptor_counts_are_one_run_per_layer_and_block_or_fewer() -> None:
    for kind, runs_per_block in (("cpu", 1), ("cuda", 1), ("rbln-blocks-first", 1), ("rbln-kv-first", 2)):
        views = views_of(kind, make_cache(kind, 8, 32), 32)
        layout = describe(views, kind)
        assert block_runs(layout).count == runs_per_block, kind
        _, scattered = read_descriptors(layout, [6, 1, 3], 0)
        assert len(scattered) == LAYERS * 3 * runs_per_block
        _, consecutive = read_descriptors(layout, [2, 3, 4], 0)
        # a blocks-first cache merges consecutive blocks into one run per layer
        assert len(consecutive) == (LAYERS if runs_per_block == 1 else LAYERS * 3 * 2), kind

    def order(kind: str) -> str:
        return describe(views_of(kind, make_cache(kind, 4, 32), 32), kind).order()

    assert order("cpu") == "K:HDS/V:HSD"  # the CPU kernels keep K dim-major
    assert order("cuda") == order("rbln-blocks-first") == "K:HSD/V:HSD"
    assert order("rbln-kv-first") == "K:HSD/V:HSD (K, V apart)"


def test_unmappable_peers_are_named_field_by_field() -> None:
    base = describe(views_of("cpu", make_cache("cpu", 4, 32), 32), "cpu")
    other = msgspec.structs.replace(base, num_kv_heads=4, head_size=16, dtype="float16", layers=base.layers[:1])
    problems = mapping_problems(base, other)
    assert set(problems) == {
        "kv_layout.num_layers",
        "kv_layout.num_kv_heads",
        "kv_layout.head_size",
        "kv_layout.dtype",
        "kv_layout.block (remote)",  # its strides no longer describe a dense block of 4 x 16 heads
    }
    assert problems["kv_layout.num_kv_heads"] == (2, 4)
    assert same_layout(base, base)
    assert not same_layout(base, describe(views_of("cpu", make_cache("cpu", 4, 64), 64), "cpu"))


def test_a_layout_reaching_outside_the_registered_memory_is_caught() -> None:
    caches = make_cache("cpu", 4, 32)
    layout = describe(views_of("cpu", caches, 32), "cpu")
    regions = [(t.data_ptr(), t.numel() * t.element_size()) for t in caches.values()]
    assert outside(layout, regions) == []

    def shift(h):  # type: ignore[no-untyped-def]
        return msgspec.structs.replace(h, base_addr=h.base_addr + 64)

    shifted = msgspec.structs.replace(
        layout, layers=[msgspec.structs.replace(lk, k=shift(lk.k), v=shift(lk.v)) for lk in layout.layers]
    )
    assert outside(shifted, regions) == [0, 1]
    assert outside(msgspec.structs.replace(layout, num_blocks=5), regions) == [0, 1]


def test_token_plans_refuse_lists_that_do_not_cover_the_tokens() -> None:
    plan = plan_tokens([9, 8, 7, 6], 32, [1, 2], 64, 64, 120)
    assert plan.remote_blocks == (7, 6) and plan.skip == 0 and plan.local_blocks == (1,)
    plan = plan_tokens([9, 8, 7, 6], 48, [5, 6, 7], 32, 64, 150)
    assert plan.remote_blocks == (8, 7, 6) and plan.skip == 16 and plan.local_blocks == (5, 6, 7)
    with pytest.raises(ValueError, match="prefill blocks"):
        plan_tokens([1, 2], 32, [1, 2, 3, 4], 16, 0, 65)
    with pytest.raises(ValueError, match="local blocks"):
        plan_tokens([1, 2, 3], 32, [1], 16, 0, 65)
    with pytest.raises(ValueError, match="boundary"):
        plan_tokens([1, 2, 3], 32, [1, 2], 64, 10, 65)
    with pytest.raises(ValueError, match="outside"):
        read_descriptors(describe(views_of("cpu", make_cache("cpu", 4, 32), 32), "cpu"), [4], 0)


def test_recv_pool_is_bounded_and_coalesces() -> None:
    pool = RecvPool(torch.zeros(5 * 4096, dtype=torch.uint8))
    a, b, c = pool.alloc(4096), pool.alloc(5000), pool.alloc(4096)
    assert (a, b, c) == (0, 4096, 3 * 4096)
    assert pool.alloc(4097) is None  # one page left
    pool.free(b, 5000)
    assert pool.alloc(3 * 4096) is None  # 2 + 1 pages free, not adjacent
    pool.free(a, 4096)
    assert pool.alloc(3 * 4096) == 0  # a and b coalesced
    assert pool.free_bytes == 4096


def test_unknown_shapes_and_mixed_layers_are_refused() -> None:
    with pytest.raises(ValueError, match="matches no known layout"):
        kv_views(
            {"l0": torch.zeros(3, 5, 7)}, num_blocks=3, num_kv_heads=2, head_size=8, block_size=32, device_kind="cpu"
        )
    first, second = make_cache("rbln-blocks-first", 4, 32), make_cache("rbln-kv-first", 4, 32)
    mixed = {"l0": next(iter(first.values())), "l1": next(iter(second.values()))}
    with pytest.raises(ValueError, match="mix"):
        kv_views(mixed, num_blocks=4, num_kv_heads=HEADS, head_size=HEAD_SIZE, block_size=32, device_kind="rbln")
