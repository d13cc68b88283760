"""The torch half of a cross-layout hand-off: canonical views of a KV cache, the receive pool, and
the re-layout on receive (the arithmetic is in :mod:`.layout`).

:func:`kv_views` turns the per-layer tensors vLLM hands ``register_kv_caches`` into views of the
canonical ``[B, 2, H, S, D]`` layout (no copy); :func:`describe` writes those views' addresses and
strides into the :class:`~.layout.KVLayout` a peer reads. :class:`RecvPool` is the bounded,
registered host buffer a decode engine reads foreign blocks into, and :func:`relayout_into` copies a
filled slot into the engine's own blocks, converting byte order and block size in one pass
(``torch._foreach_copy_`` over per-block views, as vllm-rbln's ``copy_host_device_kv_blocks`` in
``vllm_rbln/v1/worker/utils.py`` moves blocks between host and an ``rbln`` device).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import torch
from vllm_llmd.connectors.layout import KVLayout, LayerKV, TokenPlan, block_runs

#: kinds whose ``[B, H, S, 2D]`` tensor keeps, per (block, head), all K rows then all V rows
#: (vllm/v1/attention/backends/cpu_attn.py); other 4-D caches interleave K and V per token
#: (flash_attn.py: ``kv_cache.transpose(1, 2).split(head_size, dim=-1)``)
_KV_ROWS_KINDS = ("cpu",)


def _rows_view(t: torch.Tensor, b: int, h: int, s: int, d: int) -> torch.Tensor:
    """``[B, H, S, 2D]`` read as ``[B, H, 2S, D]`` then split at S: the CPU backend's K then V rows."""
    tb, th, ts, tc = t.stride()
    if tc != 1 or ts != 2 * d:
        raise ValueError(f"CPU KV tensor with strides {t.stride()} is not [S, 2D]-contiguous per head")
    return t.as_strided((b, 2, h, s, d), (tb, s * d, th, d, 1), t.storage_offset())


def kv_views(
    kv_caches: Mapping[str, torch.Tensor],
    *,
    num_blocks: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    device_kind: str,
) -> tuple[str, list[torch.Tensor]]:
    """``(kind, views)``: one ``[B, 2, H, S, D]`` view per layer, sharing the tensors' memory.

    ``device_kind`` is the platform the tensors belong to (``cpu``, ``cuda``, ``rbln``, ...): it tells
    apart the two ``[B, H, S, 2D]`` conventions. ``ValueError`` names a shape we cannot read.
    """
    b, h, s, d = num_blocks, num_kv_heads, block_size, head_size
    views: list[torch.Tensor] = []
    kind = ""
    for name, t in kv_caches.items():
        shape = tuple(t.shape)
        if shape == (b, 2, h, 1, s, d):
            k, v = "rbln-blocks-first" if device_kind == "rbln" else "blocks-first", t.select(3, 0)
        elif shape == (2, b, h, 1, s, d):
            k, v = "rbln-kv-first" if device_kind == "rbln" else "kv-first", t.select(3, 0).transpose(0, 1)
        elif shape == (2, b, s, h, d):
            k, v = device_kind, t.permute(1, 0, 3, 2, 4)
        elif shape == (b, 2, s, h, d):
            k, v = device_kind, t.permute(0, 1, 3, 2, 4)
        elif shape == (b, h, s, 2 * d) and device_kind in _KV_ROWS_KINDS:
            k, v = device_kind, _rows_view(t, b, h, s, d)
        elif shape == (b, h, s, 2 * d):
            k, v = device_kind, t.view(b, h, s, 2, d).permute(0, 3, 1, 2, 4)
        else:
            raise ValueError(
                f"layer {name}: KV tensor {shape} matches no known layout for "
                f"{b} blocks x {h} KV heads x {s} tokens x head size {d} on {device_kind}"
            )
        if v.stride(-1) != 1:
            raise ValueError(f"layer {name}: the head dimension is not contiguous (strides {tuple(v.stride())})")
        if kind and k != kind:
            raise ValueError(f"layers mix KV layouts ({kind} and {k})")
        kind = k
        views.append(v)
    if not views:
        raise ValueError("no KV cache tensors")
    return kind, views


def describe(views: Sequence[torch.Tensor], kind: str) -> KVLayout:
    """The :class:`KVLayout` of ``views`` (as :func:`kv_views` returns them)."""
    first = views[0]
    e = first.element_size()
    layers = []
    for v in views:
        sb, sk, sh, ss, _ = (x * e for x in v.stride())
        layers.append(LayerKV(base_addr=v.data_ptr(), stride_block=sb, stride_kv=sk, stride_head=sh, stride_token=ss))
    b, _, h, s, d = first.shape
    return KVLayout(
        kind=kind,
        dtype=str(first.dtype).removeprefix("torch."),
        elem_bytes=e,
        num_kv_heads=h,
        head_size=d,
        block_size=s,
        num_blocks=b,
        layers=layers,
    )


def torch_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown KV dtype {name!r}")
    return dt


# ---- receive pool -------------------------------------------------------------------------------
class RecvPool:
    """A fixed host buffer handed out in page-aligned slots (first fit; freed slots coalesce).

    Bounded by construction: a pull that does not fit now waits (the worker retries it every step
    until its deadline); one larger than the whole pool is refused and prefilled locally.
    """

    ALIGN = 4096

    def __init__(self, buffer: torch.Tensor) -> None:
        if buffer.dtype != torch.uint8 or buffer.dim() != 1:
            raise ValueError("the receive pool is a 1-D uint8 tensor")
        self.buffer = buffer
        self.base = buffer.data_ptr()
        self.nbytes = buffer.numel()
        self._free: list[tuple[int, int]] = [(0, self.nbytes)]  # (offset, size), sorted
        self._lock = threading.Lock()

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a slot of ``nbytes`` (aligned), or ``None`` when no free run is large enough."""
        size = -(-nbytes // self.ALIGN) * self.ALIGN
        with self._lock:
            for i, (off, n) in enumerate(self._free):
                if n >= size:
                    self._free[i : i + 1] = [(off + size, n - size)] if n > size else []
                    return off
        return None

    def free(self, offset: int, nbytes: int) -> None:
        size = -(-nbytes // self.ALIGN) * self.ALIGN
        with self._lock:
            self._free.append((offset, size))
            self._free.sort()
            merged: list[tuple[int, int]] = []
            for off, n in self._free:
                if merged and merged[-1][0] + merged[-1][1] == off:
                    merged[-1] = (merged[-1][0], merged[-1][1] + n)
                else:
                    merged.append((off, n))
            self._free = merged

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return sum(n for _, n in self._free)

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.buffer[offset : offset + nbytes]


# ---- re-layout on receive -----------------------------------------------------------------------
def pieces(plan: TokenPlan, remote_block_size: int, local_block_size: int) -> list[tuple[int, int, int, int, int]]:
    """``(local block, offset in it, slot page, offset in it, tokens)``: the runs of tokens that stay
    together between the slot's pages and the local blocks (about one per page plus one per block)."""
    out = []
    total = plan.num_tokens
    for k, block in enumerate(plan.local_blocks):
        lo, hi = k * local_block_size, min((k + 1) * local_block_size, total)
        t = lo
        while t < hi:
            page, off = divmod(plan.skip + t, remote_block_size)
            n = min(hi - t, remote_block_size - off)
            out.append((block, t - lo, page, off, n))
            t += n
    return out


def relayout_into(
    slot: torch.Tensor, remote: KVLayout, plan: TokenPlan, local_views: Sequence[torch.Tensor]
) -> int:
    """Copy the tokens of ``plan`` from ``slot`` (filled by :func:`~.layout.read_descriptors` with
    ``plan.remote_blocks`` of ``remote``) into ``local_views`` (``[B, 2, H, S, D]`` per layer, any
    device). One strided copy per piece (:func:`pieces`), all in one ``torch._foreach_copy_``: no
    intermediate buffer. Returns the bytes written into the cache."""
    runs = block_runs(remote)
    n = len(plan.remote_blocks)
    dtype = torch_dtype(remote.dtype)
    need = remote.num_layers * n * remote.page_bytes
    if slot.numel() < need or len(local_views) != remote.num_layers:
        raise ValueError("receive slot or local layers do not match the plan")
    first = local_views[0]
    if first.dtype != dtype:
        raise ValueError(f"local KV dtype {first.dtype} is not the wire's {dtype}")
    # the slot's axes in canonical order: [layer, page, K, H, S, D] (a view: strided unless KHSD)
    src = slot[:need].view(dtype).view(remote.num_layers, n, *runs.shape)
    src = src.permute(0, 1, *(2 + runs.order.index(a) for a in "KHSD"))
    cut = pieces(plan, remote.block_size, first.shape[3])
    dsts: list[torch.Tensor] = []
    srcs: list[torch.Tensor] = []
    for layer, dst in enumerate(local_views):
        s = src[layer]
        for block, doff, page, soff, cnt in cut:
            dsts.append(dst[block, :, :, doff : doff + cnt])
            srcs.append(s[page, :, :, soff : soff + cnt])
    torch._foreach_copy_(dsts, srcs)
    return plan.num_tokens * len(local_views) * 2 * remote.num_kv_heads * remote.head_size * first.element_size()
