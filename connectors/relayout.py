"""The torch half of a cross-layout hand-off: canonical views of a KV cache, the receive pool, and
the re-layout on receive (the arithmetic is in :mod:`.layout`).

:func:`kv_views` turns the per-layer tensors vLLM hands ``register_kv_caches`` into ``(K, V)`` views
``[B, H, S, D]`` each (no copy); :func:`describe` writes those views' addresses and strides into the
:class:`~.layout.KVLayout` a peer reads. :class:`RecvPool` is the bounded, registered host buffer a
decode engine reads foreign blocks into, and :func:`relayout_into` copies a filled slot into the
engine's own blocks, converting byte order and block size in one pass (``torch._foreach_copy_``
over per-block views, as vllm-rbln's ``copy_host_device_kv_blocks`` in
``vllm_rbln/v1/worker/utils.py`` moves blocks between host and an ``rbln`` device).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import torch
from vllm_llmd.connectors.cpu_probe import CpuPacking
from vllm_llmd.connectors.layout import HalfKV, KVLayout, LayerKV, TokenPlan, block_runs

#: a layer's K and V, each a view ``[B, H, S // token_tile, token_tile, D // dim_tile, dim_tile]``
#: (tiles of 1 for every layout but vLLM's AMX CPU kernel)
KV = tuple[torch.Tensor, torch.Tensor]


def _untiled(t4: torch.Tensor) -> torch.Tensor:
    """A ``[B, H, S, D]`` view as the 6-D half view with tiles of 1."""
    return t4.unsqueeze(3).unsqueeze(5)


def canonical(half: torch.Tensor) -> torch.Tensor:
    """``[B, H, S, D]``: a view when untiled, a copy when tiled."""
    b, h, s1, tt, d1, td = half.shape
    if tt == 1 and td == 1:
        return half.squeeze(5).squeeze(3)
    return half.reshape(b, h, s1 * tt, d1 * td)


def _cpu_views(t: torch.Tensor, p: CpuPacking, b: int, h: int, s: int, d: int) -> KV:
    tb, th, ts, tc = t.stride()
    if tc != 1 or ts != 2 * d or th != 2 * s * d:
        raise ValueError(f"CPU KV tensor with strides {t.stride()} is not one chunk per (block, head)")
    out = []
    for hp in (p.k, p.v):
        if s % hp.token_tile or d % hp.dim_tile:
            raise ValueError(f"CPU packing tiles {hp.token_tile}x{hp.dim_tile} do not divide {s} tokens x {d} dims")
        size = (b, h, s // hp.token_tile, hp.token_tile, d // hp.dim_tile, hp.dim_tile)
        strides = (tb, th, hp.stride_token, hp.stride_token_in_tile, hp.stride_dim, hp.stride_dim_in_tile)
        out.append(t.as_strided(size, strides, t.storage_offset() + hp.offset))
    return out[0], out[1]


def kv_views(
    kv_caches: Mapping[str, torch.Tensor],
    *,
    num_blocks: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    device_kind: str,
    cpu_packing: CpuPacking | None = None,
) -> tuple[str, list[KV]]:
    """``(kind, views)``: per layer, K and V as 6-D half views (see :data:`KV`) sharing the
    tensors' memory.

    ``device_kind`` is the platform the tensors belong to (``cpu``, ``cuda``, ``rbln``, ...); on the
    CPU, ``cpu_packing`` is how the attention kernel packs a block (connectors/cpu_probe.py measures
    it). ``ValueError`` names a shape or kernel we cannot read.
    """
    b, h, s, d = num_blocks, num_kv_heads, block_size, head_size
    views: list[KV] = []
    kind = ""
    for name, t in kv_caches.items():
        shape = tuple(t.shape)
        if shape == (b, 2, h, 1, s, d):
            k, pair = ("rbln-blocks-first" if device_kind == "rbln" else "blocks-first"), (t[:, 0, :, 0], t[:, 1, :, 0])
        elif shape == (2, b, h, 1, s, d):
            k, pair = ("rbln-kv-first" if device_kind == "rbln" else "kv-first"), (t[0, :, :, 0], t[1, :, :, 0])
        elif shape == (2, b, s, h, d):
            k, pair = device_kind, (t[0].transpose(1, 2), t[1].transpose(1, 2))
        elif shape == (b, 2, s, h, d):
            k, pair = device_kind, (t[:, 0].transpose(1, 2), t[:, 1].transpose(1, 2))
        elif shape == (b, h, s, 2 * d) and device_kind == "cpu":
            if cpu_packing is None:
                raise ValueError("the CPU attention kernel's block packing is not known (see cpu_probe.py)")
            k = f"cpu-{cpu_packing.isa}"
            views.append(_cpu_views(t, cpu_packing, b, h, s, d))
            if kind and k != kind:
                raise ValueError(f"layers mix KV layouts ({kind} and {k})")
            kind = k
            continue
        elif shape == (b, h, s, 2 * d):
            k, pair = device_kind, (t[..., :d], t[..., d:])
        else:
            raise ValueError(
                f"layer {name}: KV tensor {shape} matches no known layout for "
                f"{b} blocks x {h} KV heads x {s} tokens x head size {d} on {device_kind}"
            )
        if kind and k != kind:
            raise ValueError(f"layers mix KV layouts ({kind} and {k})")
        kind = k
        views.append((_untiled(pair[0]), _untiled(pair[1])))
    if not views:
        raise ValueError("no KV cache tensors")
    return kind, views


def _half(v: torch.Tensor) -> HalfKV:
    e = v.element_size()
    sb, sh, st, sti, sd, sdi = (x * e for x in v.stride())
    _, _, _, tt, _, td = v.shape
    return HalfKV(
        base_addr=v.data_ptr(),
        stride_block=sb,
        stride_head=sh,
        stride_token=st,
        stride_dim=sd,
        token_tile=tt,
        stride_token_in_tile=sti if tt > 1 else 0,
        dim_tile=td,
        stride_dim_in_tile=sdi if td > 1 else 0,
    )


def describe(views: Sequence[KV], kind: str) -> KVLayout:
    """The :class:`KVLayout` of ``views`` (as :func:`kv_views` returns them)."""
    k0, _ = views[0]
    b, h, s1, tt, d1, td = k0.shape
    return KVLayout(
        kind=kind,
        dtype=str(k0.dtype).removeprefix("torch."),
        elem_bytes=k0.element_size(),
        num_kv_heads=h,
        head_size=d1 * td,
        block_size=s1 * tt,
        num_blocks=b,
        layers=[LayerKV(k=_half(k), v=_half(v)) for k, v in views],
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


def _slot_half(flat: torch.Tensor, remote: KVLayout, h: HalfKV, n: int, at: int) -> torch.Tensor:
    """The slot's blocks of one half as a 6-D view, read through the prefill engine's strides."""
    e = remote.elem_bytes
    size = (
        n,
        remote.num_kv_heads,
        remote.block_size // h.token_tile,
        h.token_tile,
        remote.head_size // h.dim_tile,
        h.dim_tile,
    )
    strides = (
        remote.page_bytes,
        h.stride_head,
        h.stride_token,
        h.stride_token_in_tile,
        h.stride_dim,
        h.stride_dim_in_tile,
    )
    return flat.as_strided(size, tuple(x // e for x in strides), flat.storage_offset() + at // e)


def relayout_into(slot: torch.Tensor, remote: KVLayout, plan: TokenPlan, local_views: Sequence[KV]) -> int:
    """Copy the tokens of ``plan`` from ``slot`` (filled by :func:`~.layout.read_descriptors` with
    ``plan.remote_blocks`` of ``remote``) into ``local_views`` (per layer, K and V half views, any
    device), reading the slot through ``remote``'s own strides. Untiled on both sides: one strided
    copy per piece (:func:`pieces`) and half, all in one ``torch._foreach_copy_``, no intermediate
    buffer. Tiled (vLLM's AMX CPU kernel): through a token-major copy of each side's blocks, whole
    local blocks written (the request owns its last, partial block: its tail is zeroed). Returns the
    bytes of the tokens written into the cache."""
    runs = block_runs(remote)
    n = len(plan.remote_blocks)
    dtype = torch_dtype(remote.dtype)
    page = remote.page_bytes
    need = remote.num_layers * n * page
    if slot.numel() < need or len(local_views) != remote.num_layers:
        raise ValueError("receive slot or local layers do not match the plan")
    first, _ = local_views[0]
    if first.dtype != dtype:
        raise ValueError(f"local KV dtype {first.dtype} is not the wire's {dtype}")
    flat = slot[:need].view(dtype)
    lk = remote.layers[0]
    s_local = first.shape[2] * first.shape[3]
    tiled = lk.k.tiled or lk.v.tiled or any(t.shape[3] > 1 or t.shape[5] > 1 for t in local_views[0])
    dsts: list[torch.Tensor] = []
    srcs: list[torch.Tensor] = []
    cut = pieces(plan, remote.block_size, s_local)
    for layer, pair in enumerate(local_views):
        at = layer * n * page
        for dst, h, off in zip(pair, (lk.k, lk.v), (runs.k_at, runs.v_at), strict=True):
            src = _slot_half(flat, remote, h, n, at + off)
            if not tiled:
                d4, s4 = canonical(dst), canonical(src)
                for block, doff, pg, soff, cnt in cut:
                    dsts.append(d4[block, :, doff : doff + cnt])
                    srcs.append(s4[pg, :, soff : soff + cnt])
                continue
            tokens = canonical(src).transpose(0, 1).reshape(remote.num_kv_heads, -1, remote.head_size)
            m = len(plan.local_blocks)
            out = torch.zeros(m, remote.num_kv_heads, s_local, remote.head_size, dtype=dtype)
            for k in range(m):
                lo = k * s_local
                cnt = min(s_local, plan.num_tokens - lo)
                out[k, :, :cnt] = tokens[:, plan.skip + lo : plan.skip + lo + cnt]
            for k, block in enumerate(plan.local_blocks):
                dsts.append(dst[block])
                srcs.append(out[k].view(dst.shape[1:]))
    torch._foreach_copy_(dsts, srcs)
    return plan.num_tokens * len(local_views) * 2 * remote.num_kv_heads * remote.head_size * first.element_size()
