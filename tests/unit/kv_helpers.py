"""KV caches in every layout we know, filled with values derived from (layer, K/V, head, token, dim).

Shared by the re-layout and RBLN transport tests: a token landing in the wrong block, head, half or
position reads back a different value.
"""

from __future__ import annotations

import numpy as np
import torch
from vllm_llmd.connectors.cpu_probe import amx_packing, vec_packing
from vllm_llmd.connectors.relayout import canonical, kv_views

from vllm_llmd.testing.fakes.rbln import fake_rbln_kv_caches

LAYERS, HEADS, HEAD_SIZE = 2, 2, 32  # head size: vLLM's AMX kernel tiles V in 16 dims
DTYPE = torch.bfloat16


def make_cache(kind: str, num_blocks: int, block_size: int) -> dict[str, torch.Tensor]:
    """Zeroed per-layer tensors in the shape the engine of ``kind`` hands ``register_kv_caches``."""
    b, h, s, d = num_blocks, HEADS, block_size, HEAD_SIZE
    if kind in ("cpu", "cpu-amx", "cuda"):  # CPU_ATTN and FLASH_ATTN: [B, H, S, 2D] (packed differently)
        return {f"l{i}": torch.zeros(b, h, s, 2 * d, dtype=DTYPE) for i in range(LAYERS)}
    if kind == "cuda-5d":  # vLLM's older K/V-first [2, B, S, H, D], stored HND (stride order)
        return {f"l{i}": torch.zeros(2, b, h, s, d, dtype=DTYPE).transpose(2, 3) for i in range(LAYERS)}
    if kind in ("rbln-blocks-first", "rbln-kv-first"):
        return fake_rbln_kv_caches(LAYERS, b, h, s, d, dtype=DTYPE, kv_first=kind == "rbln-kv-first")
    raise AssertionError(kind)


def device_of(kind: str) -> str:
    return "rbln" if kind.startswith("rbln") else kind.removesuffix("-5d").removesuffix("-amx")


class Pair(tuple):
    """A layer's ``(K, V)`` half views (what the connector works with), indexed in tests as one
    ``[B, 2, H, S, D]`` tensor: ``pair[b, :, :, tokens]`` is ``[2, H, T, D]``, ``pair[blocks]`` is
    ``[n, 2, H, S, D]``; assigning to ``pair[b]`` or ``pair[b, :, :, tokens]`` writes K and V (tiled
    halves, as vLLM's AMX CPU kernel keeps them, are read and written through a token-major copy)."""

    @property
    def shape(self) -> tuple[int, ...]:
        b, h, s, d = canonical(super().__getitem__(0)).shape
        return (b, 2, h, s, d)

    def _halves(self, idx):  # type: ignore[no-untyped-def]
        out = []
        for half in tuple.__iter__(self):
            c = canonical(half)
            out.append(c[idx[0], idx[2], idx[3]] if isinstance(idx, tuple) else c[idx])
        return out

    def __getitem__(self, idx):  # type: ignore[no-untyped-def]
        k, v = self._halves(idx)
        return torch.stack([k, v], dim=0 if isinstance(idx, (tuple, int)) else 1)

    def __setitem__(self, idx, value) -> None:  # type: ignore[no-untyped-def]
        for n, half in enumerate(tuple.__iter__(self)):
            c = canonical(half)
            part = value[n] if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == 2 else value
            if isinstance(idx, tuple):
                c[idx[0], idx[2], idx[3]] = part
            else:
                c[idx] = part
            if half.shape[3] > 1 or half.shape[5] > 1:  # tiled: write the token-major copy back
                half.copy_(c.view(half.shape))

    def any(self) -> bool:
        return any(bool(t.any()) for t in tuple.__iter__(self))

    def zero_(self) -> None:
        for t in tuple.__iter__(self):
            t.zero_()


def views_of(kind: str, caches: dict[str, torch.Tensor], block_size: int) -> list[Pair]:
    num_blocks = next(iter(caches.values())).shape[1 if kind in ("rbln-kv-first", "cuda-5d") else 0]
    got, views = kv_views(
        caches,
        num_blocks=num_blocks,
        num_kv_heads=HEADS,
        head_size=HEAD_SIZE,
        block_size=block_size,
        device_kind=device_of(kind),
        cpu_packing={"cpu": vec_packing, "cpu-amx": amx_packing}.get(kind, vec_packing)(block_size, HEAD_SIZE),
    )
    assert got == {"cuda-5d": "cuda", "cpu": "cpu-vec"}.get(kind, kind)
    return [Pair(v) for v in views]


def token_values(layer: int, tokens: np.ndarray) -> torch.Tensor:
    """[2, H, T, D] values for absolute token indices ``tokens`` of ``layer`` (exact in bfloat16)."""
    k = torch.arange(2).view(2, 1, 1, 1)
    h = torch.arange(HEADS).view(1, HEADS, 1, 1)
    t = torch.as_tensor(tokens).view(1, 1, -1, 1)
    d = torch.arange(HEAD_SIZE).view(1, 1, 1, HEAD_SIZE)
    return ((layer * 7 + k * 3 + h * 5 + t * 11 + d) % 251).to(DTYPE) + 1  # never 0


def fill(views: list[torch.Tensor], blocks: list[int], num_tokens: int) -> None:
    s = views[0].shape[3]
    for layer, v in enumerate(views):
        for i, b in enumerate(blocks):
            lo = i * s
            cnt = min(s, num_tokens - lo)
            if cnt <= 0:
                break
            v[b, :, :, :cnt] = token_values(layer, np.arange(lo, lo + cnt))
