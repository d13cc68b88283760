"""KV-cache geometry on the wire, and the arithmetic of a cross-layout hand-off (pure, numpy only).

Engines of different kinds keep the same KV in different byte orders and block sizes. Per layer,
K and V are each a strided view ``[B, H, S, D]`` (block, KV head, token in block, head dim) of the
memory, with strides of their own:

- vLLM CPU (``cpu_attn.py`` chunks ``[B, H, 2S, D]``; the ``vec``/``vec16`` kernels'
  ``reshape_and_cache`` in ``csrc/cpu/cpu_attn_vec.hpp`` write K "column-major" and V "row-major"):
  ``[B, H, S, 2D]`` per layer; per (block, head) K as ``[D, S]``, then V as ``[S, D]``;
- CUDA FlashAttention (``flash_attn.py``: ``transpose(1, 2).split(D, -1)``): ``[B, H, S, 2D]``,
  K and V interleaved per token;
- vllm-rbln 0.12, default kernels (``RBLNFlashAttentionBackend.get_kv_cache_shape``):
  ``[B, 2, H, 1, S, D]``; K then V, each head, token, dim;
- vllm-rbln 0.12 with ``rbln_triton_ops`` (same function, block axis 1): ``[2, B, H, 1, S, D]``.

A :class:`KVLayout` says, per layer, where the K and V views start and their byte strides: that is
the canonical on-wire description every engine publishes in its handshake. In all of the above one
layer's block is one dense run of bytes (``2 * H * S * D`` elements), or two (K's, then V's, when
they live in separate halves of the tensor). A decode engine whose block size or byte order differs
reads the prefill engine's blocks as they are, verbatim, into a receive slot (:func:`read_descriptors`:
one or two runs per layer and block, consecutive blocks merged) and re-lays them out into its own
cache on receive (``connectors/relayout.py``): the slot is read through the prefill engine's strides.
Re-laying out on the receiving side costs one copy there and nothing on the prefill side; a
block-size change needs that receive-side copy anyway (a 1024-token RBLN block is 64 blocks of a
16-token GPU cache), so converting on the prefill side too would only add a copy.

What must agree for a mapping (else the handshake refuses, naming the fields): number of layers,
KV heads, head size, element dtype; each side's blocks must be one or two dense runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import msgspec
import numpy as np

MAX_LAYERS = 4096
MAX_HEADS = 1024
MAX_HEAD_SIZE = 8192
MAX_BLOCK_SIZE = 1 << 16

_Pos = Annotated[int, msgspec.Meta(ge=0)]
_Stride = Annotated[int, msgspec.Meta(ge=0, le=1 << 48)]


class HalfKV(msgspec.Struct, frozen=True, array_like=True):
    """One layer's K (or V) for every block: start address and byte strides of the view
    ``[B, H, S // token_tile, token_tile, D // dim_tile, dim_tile]``: token ``t`` is tile
    ``t // token_tile`` (``stride_token``), element ``t % token_tile`` in it (``stride_token_in_tile``),
    and the same for the head dim. Plain strided layouts have tiles of 1; vLLM's AMX CPU kernel
    stores K in 16-token x 2-dim tiles and V in 2-token x 16-dim ones."""

    base_addr: _Pos
    stride_block: _Stride
    stride_head: _Stride
    stride_token: _Stride
    stride_dim: _Stride
    token_tile: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 1
    stride_token_in_tile: _Stride = 0
    dim_tile: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 1
    stride_dim_in_tile: _Stride = 0

    @property
    def tiled(self) -> bool:
        return self.token_tile > 1 or self.dim_tile > 1


class LayerKV(msgspec.Struct, frozen=True, array_like=True):
    k: HalfKV
    v: HalfKV


class KVLayout(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One engine's KV cache as peers may read it (the memory its transport registered)."""

    #: what built it ("cpu", "cuda", "rbln-blocks-first", "rbln-kv-first"): for logs and errors only
    kind: Annotated[str, msgspec.Meta(max_length=64)]
    dtype: Annotated[str, msgspec.Meta(max_length=32)]
    elem_bytes: Annotated[int, msgspec.Meta(ge=1, le=8)]
    num_kv_heads: Annotated[int, msgspec.Meta(ge=1, le=MAX_HEADS)]
    head_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_HEAD_SIZE)]
    block_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_BLOCK_SIZE)]
    num_blocks: Annotated[int, msgspec.Meta(ge=1, le=1 << 31)]
    layers: Annotated[list[LayerKV], msgspec.Meta(min_length=1, max_length=MAX_LAYERS)]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def half_bytes(self) -> int:
        """Bytes of one layer's K (or V) for one block: ``H * S * D`` elements."""
        return self.num_kv_heads * self.block_size * self.head_size * self.elem_bytes

    @property
    def page_bytes(self) -> int:
        """Bytes of one layer's block, K and V."""
        return 2 * self.half_bytes

    def order(self) -> str:
        """How a block is laid out, for logs: K's and V's axes (head, token, dim) outer -> inner, e.g.
        ``K:HDS/V:HSD`` on the CPU backend; "(K, V apart)" when they are two runs."""
        return "/".join(f"{n}:{_order(h)}" for n, h in (("K", self.layers[0].k), ("V", self.layers[0].v))) + (
            "" if block_runs(self).count == 1 else " (K, V apart)"
        )


def _strides(h: HalfKV) -> tuple[int, ...]:
    return (
        h.stride_block,
        h.stride_head,
        h.stride_token,
        h.stride_dim,
        h.token_tile,
        h.stride_token_in_tile,
        h.dim_tile,
        h.stride_dim_in_tile,
    )


def _order(h: HalfKV) -> str:
    strides = {"H": h.stride_head, "S": h.stride_token, "D": h.stride_dim}
    out = "".join(sorted("HSD", key=lambda a: strides[a], reverse=True))
    return out + (f"[{h.token_tile}x{h.dim_tile} tiles]" if h.tiled else "")


def _extent(layout: KVLayout, h: HalfKV) -> int:
    """Bytes from a block's first element of this half to past its last."""
    return (
        (layout.num_kv_heads - 1) * h.stride_head
        + (layout.block_size // h.token_tile - 1) * h.stride_token
        + (h.token_tile - 1) * h.stride_token_in_tile
        + (layout.head_size // h.dim_tile - 1) * h.stride_dim
        + (h.dim_tile - 1) * h.stride_dim_in_tile
        + layout.elem_bytes
    )


@dataclass(frozen=True)
class BlockRuns:
    """How one layer's block is read: ``count`` runs (1: K and V together, 2: K's then V's) starting
    ``offsets`` bytes from K's block start, ``lengths`` long; laid side by side in a slot, K's view
    starts at ``k_at`` and V's at ``v_at`` bytes into the block's ``sum(lengths)`` bytes."""

    count: int
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    k_at: int
    v_at: int


def block_runs(layout: KVLayout) -> BlockRuns:
    """The runs of a block (``ValueError`` when a block is neither one dense run nor two)."""
    lk = layout.layers[0]
    k, v = lk.k, lk.v
    half = layout.half_bytes
    ek, ev = _extent(layout, k), _extent(layout, v)
    lo = min(0, v.base_addr - k.base_addr)
    hi = max(ek, v.base_addr - k.base_addr + ev)
    if k.stride_block == v.stride_block and hi - lo == 2 * half:
        return BlockRuns(1, (lo,), (2 * half,), -lo, v.base_addr - k.base_addr - lo)
    if ek == half and ev == half:
        return BlockRuns(2, (0, v.base_addr - k.base_addr), (half, half), 0, half)
    raise ValueError(f"a block of this layout is not one or two dense runs (K spans {ek}, V {ev}, dense {half})")


def _uniform(layout: KVLayout) -> bool:
    """Every layer has the same strides, and V at the same distance from K."""
    first = layout.layers[0]
    d0 = first.v.base_addr - first.k.base_addr
    return all(
        _strides(lk.k) == _strides(first.k)
        and _strides(lk.v) == _strides(first.v)
        and lk.v.base_addr - lk.k.base_addr == d0
        for lk in layout.layers
    )


def mapping_problems(local: KVLayout, remote: KVLayout) -> dict[str, tuple[object, object]]:
    """Fields that keep ``remote``'s blocks from being re-laid out into ``local`` (empty: mappable)."""
    out: dict[str, tuple[object, object]] = {}
    for f in ("num_layers", "num_kv_heads", "head_size", "dtype", "elem_bytes"):
        a, b = getattr(local, f), getattr(remote, f)
        if a != b:
            out[f"kv_layout.{f}"] = (a, b)
    for name, lay in (("local", local), ("remote", remote)):
        if not _uniform(lay):
            out[f"kv_layout.layers ({name})"] = ("one stride set for every layer", "layers differ")
            continue
        lk = lay.layers[0]
        if any(lay.block_size % h.token_tile or lay.head_size % h.dim_tile for h in (lk.k, lk.v)):
            out[f"kv_layout.tiles ({name})"] = ("dividing the block and head size", (lk.k.token_tile, lk.k.dim_tile))
            continue
        strides = [x for h in (lk.k, lk.v) for x in (*_strides(h)[:4], h.stride_token_in_tile, h.stride_dim_in_tile)]
        offsets = [*strides, lk.v.base_addr - lk.k.base_addr]
        if any(x % lay.elem_bytes for x in offsets):
            out[f"kv_layout.strides ({name})"] = ("multiples of the element size", offsets)
            continue
        try:
            block_runs(lay)
        except ValueError as exc:
            out[f"kv_layout.block ({name})"] = ("one or two dense runs", str(exc))
    return out


def same_layout(a: KVLayout, b: KVLayout) -> bool:
    """Blocks can move byte for byte (same block size, dtype and strides of K and V)."""
    la, lb = a.layers[0], b.layers[0]
    return (
        a.block_size == b.block_size
        and a.dtype == b.dtype
        and a.num_layers == b.num_layers
        and a.num_kv_heads == b.num_kv_heads
        and a.head_size == b.head_size
        and _strides(la.k) == _strides(lb.k)
        and _strides(la.v) == _strides(lb.v)
        and la.v.base_addr - la.k.base_addr == lb.v.base_addr - lb.k.base_addr
    )


def footprint(layout: KVLayout, layer: int) -> tuple[int, int]:
    """``[start, end)`` of the bytes layer ``layer`` may touch (every block, K and V)."""
    lk = layout.layers[layer]
    ends = [h.base_addr + (layout.num_blocks - 1) * h.stride_block + _extent(layout, h) for h in (lk.k, lk.v)]
    return min(lk.k.base_addr, lk.v.base_addr), max(ends)


def outside(layout: KVLayout, regions: Sequence[tuple[int, int]]) -> list[int]:
    """Layers whose footprint is not inside one of ``regions`` (``(base, nbytes)``: registered memory)."""
    bad = []
    for i in range(layout.num_layers):
        lo, hi = footprint(layout, i)
        if not any(base <= lo and hi <= base + n for base, n in regions):
            bad.append(i)
    return bad


# ---- which tokens come from which blocks ----------------------------------------------------
@dataclass(frozen=True)
class TokenPlan:
    """Tokens ``[first_token, first_token + num_tokens)`` of a request: read ``remote_blocks`` (the
    prefill engine's, in token order), drop ``skip`` tokens of the first, write into ``local_blocks``."""

    remote_blocks: tuple[int, ...]
    skip: int
    local_blocks: tuple[int, ...]
    first_token: int
    num_tokens: int


def plan_tokens(
    remote_ids: Sequence[int],
    remote_block_size: int,
    local_ids: Sequence[int],
    local_block_size: int,
    first_token: int,
    end_token: int,
) -> TokenPlan:
    """Tokens ``[first_token, end_token)`` live in ``remote_ids`` (the request's whole block list on the
    prefill engine) and go to ``local_ids`` (the decode engine's blocks from ``first_token`` on).

    ``first_token`` is the decode engine's own prefix hit, a whole number of its blocks. ``ValueError``
    when the lists do not cover the tokens (the prefill engine's params or our allocation are wrong).
    """
    if first_token < 0 or end_token <= first_token:
        raise ValueError(f"empty token range [{first_token}, {end_token})")
    if first_token % local_block_size:
        raise ValueError(f"first token {first_token} is not on a local block boundary ({local_block_size})")
    lo = first_token // remote_block_size
    hi = -(-end_token // remote_block_size)
    if hi > len(remote_ids):
        raise ValueError(f"{end_token} tokens need {hi} prefill blocks of {remote_block_size}, got {len(remote_ids)}")
    n_local = -(-(end_token - first_token) // local_block_size)
    if n_local > len(local_ids):
        raise ValueError(f"{end_token - first_token} tokens need {n_local} local blocks, got {len(local_ids)}")
    return TokenPlan(
        remote_blocks=tuple(int(b) for b in remote_ids[lo:hi]),
        skip=first_token - lo * remote_block_size,
        local_blocks=tuple(int(b) for b in local_ids[:n_local]),
        first_token=first_token,
        num_tokens=end_token - first_token,
    )


# ---- descriptors ------------------------------------------------------------------------------
def slot_bytes(layout: KVLayout, num_blocks: int) -> int:
    """Receive-slot size for ``num_blocks`` of ``layout``'s blocks in every layer."""
    return layout.num_layers * num_blocks * layout.page_bytes


def read_descriptors(layout: KVLayout, block_ids: Sequence[int], slot_addr: int) -> tuple[np.ndarray, np.ndarray]:
    """``(local, remote)`` ``(addr, len)`` rows reading ``block_ids`` of every layer of ``layout``
    verbatim into a slot at ``slot_addr``: layer-major, then block, each block's runs
    (:func:`block_runs`) side by side, ``page_bytes`` per layer and block.

    Runs that are adjacent on the remote side are merged (consecutive blocks of a blocks-first cache
    become one descriptor); the slot is written in order, so local rows merge with them.
    """
    runs = block_runs(layout)
    ids = np.asarray(block_ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= layout.num_blocks):
        raise ValueError(f"block id outside the peer's {layout.num_blocks} blocks")
    base = np.array([lk.k.base_addr for lk in layout.layers], dtype=np.int64)
    sb = np.int64(layout.layers[0].k.stride_block)
    offs = np.array(runs.offsets, dtype=np.int64)
    lens = np.array(runs.lengths, dtype=np.int64)
    addrs = (base[:, None, None] + ids[None, :, None] * sb + offs[None, None, :]).ravel()
    sizes = np.broadcast_to(lens, (len(base), ids.size, runs.count)).ravel()
    if addrs.size == 0:
        empty = np.empty((0, 2), dtype=np.int64)
        return empty, empty
    local_addr = slot_addr + np.concatenate(([0], np.cumsum(sizes)[:-1]))
    starts = np.concatenate(([0], np.nonzero(addrs[1:] != addrs[:-1] + sizes[:-1])[0] + 1))
    merged = np.add.reduceat(sizes, starts)
    return np.stack([local_addr[starts], merged], axis=1), np.stack([addrs[starts], merged], axis=1)
