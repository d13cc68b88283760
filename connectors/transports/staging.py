"""Host staging for KV caches NIXL cannot register where they live (RBLN device memory).

:func:`aligned_host_empty` allocates page-aligned host memory the way Rebellions' stack does:
``rebel.kv_cache.aligned_tensor`` first (what vllm-rbln 0.12's ``RblnNixlConnector`` stages into:
``rbln_nixl/registration.py``, ``initialize_host_xfer_buffer``), then torch-rbln's
``torch.rbln.huge_host_empty`` (2 MiB-aligned and prefaulted: ``torch_rbln/memory.py``), then an
anonymous ``mmap`` (page-aligned; what a host without Rebellions' packages gets).

:class:`HostStaging` keeps one host mirror per layer, same shape as the device tensor, and copies
blocks between them. The copy is the platform's own when the model runner hands one over
(vLLM's ``set_host_xfer_buffer_ops``; vllm-rbln's runner passes ``copy_host_device_kv_blocks`` from
``vllm_rbln/v1/worker/utils.py``), otherwise :func:`copy_blocks`: runs of consecutive block ids
narrowed out of both sides and copied with one ``torch._foreach_copy_`` (plain tensor ops, so any
torch device works).
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from vllm_llmd.connectors.transports.base import Region

logger = logging.getLogger("vllm.vllm_llmd.connectors")

#: ``(src caches, dst caches, src block ids, dst block ids, direction)``: vLLM's ``CopyBlocksOp``
#: (vllm/distributed/kv_transfer/kv_connector/v1/base.py)
CopyBlocksOp = Callable[
    [dict[str, torch.Tensor], dict[str, torch.Tensor], list[int], list[int], Literal["h2d", "d2h"]], None
]


def aligned_host_empty(nbytes: int) -> tuple[torch.Tensor, str]:
    """A page-aligned 1-D uint8 host tensor of ``nbytes`` bytes, and which allocator made it."""
    if nbytes <= 0:
        raise ValueError(f"cannot allocate {nbytes} bytes of staging")
    try:
        from rebel.kv_cache import aligned_tensor  # type: ignore[import-not-found]
    except Exception:  # not installed, or installed without its runtime (librbln.so)
        aligned_tensor = None
    if aligned_tensor is not None:
        return aligned_tensor(-(-nbytes // 2)).view(torch.uint8)[:nbytes], "rebel.kv_cache.aligned_tensor"
    rbln = getattr(torch, "rbln", None)
    if rbln is not None and hasattr(rbln, "huge_host_empty"):
        return rbln.huge_host_empty(nbytes), "torch.rbln.huge_host_empty"
    buf = mmap.mmap(-1, nbytes)
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes), "mmap"


def block_runs(block_ids: Sequence[int]) -> list[tuple[int, int]]:
    """``(first, count)`` runs of consecutive ids, in order."""
    out: list[tuple[int, int]] = []
    for b in block_ids:
        if out and out[-1][0] + out[-1][1] == b:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((int(b), 1))
    return out


def copy_blocks(
    src: Mapping[str, torch.Tensor], dst: Mapping[str, torch.Tensor], block_ids: Sequence[int], axes: Mapping[str, int]
) -> int:
    """Copy blocks ``block_ids`` of every layer from ``src`` to ``dst`` (same shapes; the block axis of
    layer ``name`` is ``axes[name]``). Returns the bytes copied."""
    runs = block_runs(block_ids)
    dsts, srcs = [], []
    for name, d in dst.items():
        s, axis = src[name], axes[name]
        for first, n in runs:
            dsts.append(d.narrow(axis, first, n))
            srcs.append(s.narrow(axis, first, n))
    if dsts:
        torch._foreach_copy_(dsts, srcs)
    return sum(t.numel() * t.element_size() for t in dsts)


class HostStaging:
    """Page-aligned host mirrors of a device KV cache, and the block copies between them.

    ``block_axes[name]`` is the axis of layer ``name`` that indexes blocks (0 for blocks-first
    caches, 1 for K/V-first ones; vllm-rbln's runner keeps the same map as ``kv_cache_block_axes``).
    """

    def __init__(self, device_caches: Mapping[str, torch.Tensor], block_axes: Mapping[str, int]) -> None:
        self.device = dict(device_caches)
        self.block_axes = dict(block_axes)
        self.host: dict[str, torch.Tensor] = {}
        self.allocator = ""
        for name, t in self.device.items():
            nbytes = t.numel() * t.element_size()
            raw, self.allocator = aligned_host_empty(nbytes)
            self.host[name] = raw.view(t.dtype).view(tuple(t.shape))
        self.copy_op: CopyBlocksOp | None = None
        self.bytes_out = 0
        self.bytes_in = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.host.values())

    def regions(self) -> tuple[list[Region], list[str]]:
        """Block-major regions over the mirrors (one per layer, or K and V halves for K/V-first
        caches), and the layer each belongs to."""
        regions: list[Region] = []
        layers: list[str] = []
        for name, h in self.host.items():
            axis = self.block_axes[name]
            parts = [h] if axis == 0 else [h.select(0, i) for i in range(h.shape[0])]
            for p in parts:
                block_len = p[0].numel() * p.element_size()
                regions.append(Region(base_addr=p.data_ptr(), num_blocks=p.shape[0], block_len=block_len))
                layers.append(name)
        return regions, layers

    def _copy(self, block_ids: Sequence[int], direction: Literal["h2d", "d2h"]) -> int:
        if not block_ids:
            return 0
        src, dst = (self.device, self.host) if direction == "d2h" else (self.host, self.device)
        if self.copy_op is not None:
            ids = list(block_ids)
            self.copy_op(src, dst, ids, ids, direction)
            return len(ids) * sum(h.numel() * h.element_size() // h.shape[self.block_axes[n]] for n, h in dst.items())
        return copy_blocks(src, dst, block_ids, self.block_axes)

    def to_host(self, block_ids: Sequence[int]) -> int:
        n = self._copy(block_ids, "d2h")
        self.bytes_out += n
        return n

    def to_device(self, block_ids: Sequence[int]) -> int:
        n = self._copy(block_ids, "h2d")
        self.bytes_in += n
        return n
