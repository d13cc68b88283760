"""Handshake negotiation (connectors/negotiate.py): direct, re-layout, or a refusal naming the fields."""

from __future__ import annotations

from types import SimpleNamespace

import msgspec
from kv_helpers import make_cache, views_of
from vllm_llmd.connectors.negotiate import describe_problems, negotiate
from vllm_llmd.connectors.relayout import describe
from vllm_llmd.connectors.transports import Region


def facts(kind: str = "cpu", block_size: int = 32, **changes: object) -> SimpleNamespace:
    caches = make_cache(kind, 8, block_size)
    layout = describe(views_of(kind, caches, block_size), kind)
    base = {
        "protocol": 2,
        "model": "m",
        "kv_dtype": "auto/torch.bfloat16",
        "transport": "nixl",
        "backends": ["UCX"],
        "block_size": block_size,
        "num_layers": 2,
        "block_len": layout.page_bytes,
        "memory": "DRAM",
        "layout": kind,
        "regions": [Region(base_addr=t.data_ptr(), num_blocks=8, block_len=layout.page_bytes) for t in caches.values()],
        "_caches": caches,  # keep the memory the layout points at alive
        "kv_layout": layout,
        "num_kv_groups": 1,
    }
    base.update(changes)
    return SimpleNamespace(**base)


def test_same_kind_and_block_size_moves_blocks_directly() -> None:
    plan, problems = negotiate(facts(), facts(), can_relayout=True)
    assert problems == {} and plan is not None and plan.mode == "direct" and plan.backends == ("UCX",)


def test_different_block_size_or_byte_order_is_re_laid_out() -> None:
    plan, problems = negotiate(facts(block_size=128), facts(block_size=32), can_relayout=True)
    assert problems == {} and plan is not None and plan.mode == "relayout"
    assert "block_size 32->128" in plan.why
    # GPU prefill (FlashAttention, 16-token blocks, VRAM) -> NPU decode (blocks-first, 1024-token blocks)
    gpu = facts("cuda", 16, memory="VRAM", layout="cuda", backends=["UCX"])
    npu = facts("rbln-blocks-first", 64, layout="rbln-blocks-first", backends=["RBLN", "UCX"])
    plan, problems = negotiate(npu, gpu, can_relayout=True)
    assert problems == {} and plan is not None and (plan.mode, plan.backends) == ("relayout", ("UCX",))
    # same block size, different byte order in a block
    plan, _ = negotiate(facts("cpu", 32), facts("cuda", 32, layout="cpu"), can_relayout=True)
    assert plan is not None and plan.mode == "relayout" and "kv_layout" in plan.why


def test_two_npus_prefer_the_rbln_backend() -> None:
    a = facts("rbln-kv-first", 64, backends=["RBLN", "UCX"])
    plan, _ = negotiate(a, a, can_relayout=True)
    assert plan is not None and plan.backends == ("RBLN", "UCX")


def test_refusals_name_every_field() -> None:
    other = facts(block_size=64)
    other.kv_layout = msgspec.structs.replace(other.kv_layout, num_kv_heads=4, head_size=16)
    plan, problems = negotiate(facts(), other, can_relayout=True)
    assert plan is None
    assert {"block_size", "kv_layout.num_kv_heads", "kv_layout.head_size"} <= set(problems)
    assert problems["kv_layout.num_kv_heads"] == (2, 4)
    text = describe_problems(problems)
    assert "block_size: local=32 remote=64" in text and "kv_layout.num_kv_heads: local=2 remote=4" in text

    plan, problems = negotiate(facts(), facts(model="other", backends=["RBLN"]), can_relayout=True)
    assert plan is None and set(problems) == {"model", "backends"}

    plan, problems = negotiate(facts(block_size=64), facts(kv_layout=None), can_relayout=False)
    assert plan is None and {"block_size", "kv_layout (remote)", "relayout_buffer_mb"} <= set(problems)

    plan, problems = negotiate(facts(block_size=64), facts(num_kv_groups=2), can_relayout=True)
    assert plan is None and problems["num_kv_groups"] == (1, 2)


def test_a_layout_outside_the_peers_registered_memory_or_of_too_many_runs_is_refused() -> None:
    other = facts(block_size=64)
    other.regions = [msgspec.structs.replace(r, base_addr=r.base_addr + 4096) for r in other.regions]
    plan, problems = negotiate(facts(), other, can_relayout=True)
    assert plan is None and "kv_layout.layers (remote)" in problems
    # K and V scattered over the block: neither one dense run nor two
    odd = facts(block_size=64)
    lk = odd.kv_layout.layers[0]
    weird = msgspec.structs.replace(lk, k=msgspec.structs.replace(lk.k, stride_head=lk.k.stride_head * 3))
    odd.kv_layout = msgspec.structs.replace(odd.kv_layout, layers=[weird] * 2)
    plan, problems = negotiate(facts(), odd, can_relayout=True)
    assert plan is None and "kv_layout.block (remote)" in problems
