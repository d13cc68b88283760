"""KV-cache geometry on the wire, and the arithmetic of a cross-layout hand-off (pure, numpy only).

Engines of different kinds keep the same KV in different byte orders and block sizes:

- vLLM CPU (``cpu_attn.py``: ``view(B, H, 2S, D).chunk(2, dim=2)``): ``[B, H, S, 2D]`` per layer;
  a block is head, K/V, token, dim (``HKSD``);
- CUDA FlashAttention (``flash_attn.py``: ``transpose(1, 2).split(D, -1)``): ``[B, H, S, 2D]``;
  head, token, K/V, dim (``HSKD``);
- vllm-rbln 0.12, default kernels (``RBLNFlashAttentionBackend.get_kv_cache_shape``):
  ``[B, 2, H, 1, S, D]``; K/V, head, token, dim (``KHSD``);
- vllm-rbln 0.12 with ``rbln_triton_ops`` (same function, block axis 1): ``[2, B, H, 1, S, D]``;
  a block is two runs, K then V, each head, token, dim.

Every one of them is a strided view of the **canonical logical layout** ``[B, 2, H, S, D]`` (block,
K/V, KV head, token in block, head dim): a :class:`KVLayout` says, per layer, where that view starts
and its byte strides. That description is what crosses the handshake; it is the on-wire layout
contract. A decode engine whose block size or byte order differs reads the prefill engine's blocks
as they are (the fewest, largest runs: one per layer and block for all the layouts above, two for
K/V-first) into a receive slot, and re-lays them out into its own cache on receive
(``connectors/relayout.py``). Re-laying out on the receiving side costs one copy there and nothing on
the prefill side; a block-size change needs that receive-side copy anyway (a 1024-token RBLN block
is 64 blocks of a 16-token GPU cache), so converting on the prefill side too would only add a copy.

What must agree for a mapping (else the handshake refuses, naming the fields): number of layers,
KV heads, head size, element dtype, and a head dim that is contiguous on both sides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import msgspec
import numpy as np

#: the canonical logical axes inside one block (the block axis is outside)
CANONICAL = "KHSD"
MAX_LAYERS = 4096
MAX_HEADS = 1024
MAX_HEAD_SIZE = 8192
MAX_BLOCK_SIZE = 1 << 16
#: a block read in more runs than this is refused (a hostile or broken layout could otherwise make a
#: reader enumerate 2 x heads x tokens offsets per block)
MAX_RUNS_PER_BLOCK = 4096

_Pos = Annotated[int, msgspec.Meta(ge=0)]
_Stride = Annotated[int, msgspec.Meta(ge=0, le=1 << 48)]


class LayerKV(msgspec.Struct, frozen=True, array_like=True):
    """Where one layer's ``[B, 2, H, S, D]`` view starts, and its byte strides (D's is the element size)."""

    base_addr: _Pos
    stride_block: _Stride
    stride_kv: _Stride
    stride_head: _Stride
    stride_token: _Stride


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
    def page_bytes(self) -> int:
        """Bytes of one layer's block: ``2 * H * S * D`` elements."""
        return 2 * self.num_kv_heads * self.block_size * self.head_size * self.elem_bytes

    def extents(self) -> dict[str, int]:
        return {"K": 2, "H": self.num_kv_heads, "S": self.block_size, "D": self.head_size}

    def strides(self, layer: int = 0) -> dict[str, int]:
        lk = self.layers[layer]
        return {"K": lk.stride_kv, "H": lk.stride_head, "S": lk.stride_token, "D": self.elem_bytes}

    def order(self) -> str:
        """Physical order of the in-block axes, outer → inner (e.g. ``HKSD`` on the CPU backend)."""
        return block_runs(self).order


@dataclass(frozen=True)
class BlockRuns:
    """How one layer's block is read: ``outer`` offsets (bytes from the block's start) of runs of
    ``run_len`` bytes; laid side by side they hold the block in ``order`` (outer → inner axes)."""

    order: str
    shape: tuple[int, ...]  # extents in ``order``
    outer: np.ndarray  # int64 offsets
    run_len: int


def _split(layout: KVLayout) -> tuple[list[str], int, int]:
    """``(axes outer -> inner, index of the first dense axis, run length in bytes)``."""
    ext, st = layout.extents(), layout.strides()
    # outer → inner by stride; a size-1 axis goes innermost (its stride is meaningless)
    axes = sorted("KHS", key=lambda a: (ext[a] > 1, st[a]), reverse=True)
    dense = layout.head_size * layout.elem_bytes
    inner = len(axes)
    for i in range(len(axes) - 1, -1, -1):
        a = axes[i]
        if ext[a] == 1:
            inner = i
            continue
        if st[a] != dense:
            break
        dense *= ext[a]
        inner = i
    return axes, inner, dense


def runs_per_block(layout: KVLayout) -> int:
    axes, inner, _ = _split(layout)
    return int(np.prod([layout.extents()[a] for a in axes[:inner]], dtype=np.int64))


def block_runs(layout: KVLayout) -> BlockRuns:
    """Split a block into the fewest contiguous runs (the axes' strides are the same in every layer)."""
    axes, inner, dense = _split(layout)
    ext, st = layout.extents(), layout.strides()
    order = "".join(axes) + "D"
    n = runs_per_block(layout)
    if n > MAX_RUNS_PER_BLOCK:
        raise ValueError(f"a block of this layout is {n} runs (at most {MAX_RUNS_PER_BLOCK})")
    outer_axes = axes[:inner]
    offs = np.zeros(1, dtype=np.int64)
    for a in outer_axes:
        offs = (offs[:, None] + np.arange(ext[a], dtype=np.int64)[None, :] * st[a]).ravel()
    return BlockRuns(order=order, shape=tuple(ext[a] for a in order), outer=offs, run_len=dense)


def mapping_problems(local: KVLayout, remote: KVLayout) -> dict[str, tuple[object, object]]:
    """Fields that keep ``remote``'s blocks from being re-laid out into ``local`` (empty: mappable)."""
    out: dict[str, tuple[object, object]] = {}
    for f in ("num_layers", "num_kv_heads", "head_size", "dtype", "elem_bytes"):
        a, b = getattr(local, f), getattr(remote, f)
        if a != b:
            out[f"kv_layout.{f}"] = (a, b)
    if runs_per_block(remote) > MAX_RUNS_PER_BLOCK:
        out["kv_layout.runs_per_block"] = (runs_per_block(local), runs_per_block(remote))
    for name, lay in (("local", local), ("remote", remote)):
        if any(lk.stride_block == 0 for lk in lay.layers):
            out[f"kv_layout.stride_block ({name})"] = ("> 0", 0)
        if len({(lk.stride_block, lk.stride_kv, lk.stride_head, lk.stride_token) for lk in lay.layers}) > 1:
            out[f"kv_layout.layers ({name})"] = ("one stride set for every layer", "layers differ")
    return out


def same_layout(a: KVLayout, b: KVLayout) -> bool:
    """Blocks can move byte for byte (same block size, byte order and block footprint)."""
    return (
        a.block_size == b.block_size
        and a.page_bytes == b.page_bytes
        and a.dtype == b.dtype
        and a.num_layers == b.num_layers
        and a.strides() == b.strides()
        and a.layers[0].stride_block == b.layers[0].stride_block
    )


def footprint(layout: KVLayout, layer: int) -> tuple[int, int]:
    """``[start, end)`` of the bytes layer ``layer``'s view may touch."""
    lk = layout.layers[layer]
    last = (
        (layout.num_blocks - 1) * lk.stride_block
        + lk.stride_kv
        + (layout.num_kv_heads - 1) * lk.stride_head
        + (layout.block_size - 1) * lk.stride_token
        + (layout.head_size - 1) * layout.elem_bytes
    )
    return lk.base_addr, lk.base_addr + last + layout.elem_bytes


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
    """``(local, remote)`` ``(addr, len)`` rows reading ``block_ids`` of every layer of ``layout`` into a
    slot at ``slot_addr``, which then holds ``[layer, block, *block_runs(layout).shape]`` (C order).

    Runs that are adjacent on the remote side are merged (consecutive blocks of a CPU cache become
    one descriptor); the slot is written in order, so local rows merge with them.
    """
    runs = block_runs(layout)
    ids = np.asarray(block_ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= layout.num_blocks):
        raise ValueError(f"block id outside the peer's {layout.num_blocks} blocks")
    base = np.array([lk.base_addr for lk in layout.layers], dtype=np.int64)
    sb = np.int64(layout.layers[0].stride_block)
    addrs = (base[:, None, None] + ids[None, :, None] * sb + runs.outer[None, None, :]).ravel()
    if addrs.size == 0:
        empty = np.empty((0, 2), dtype=np.int64)
        return empty, empty
    starts = np.concatenate(([0], np.nonzero(addrs[1:] != addrs[:-1] + runs.run_len)[0] + 1))
    lens = np.diff(np.append(starts, addrs.size)) * runs.run_len
    local_addr = slot_addr + starts * runs.run_len
    remote = np.stack([addrs[starts], lens], axis=1)
    local = np.stack([local_addr, lens], axis=1)
    return local, remote
