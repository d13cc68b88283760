"""Worker start-up: from the KV tensors vLLM hands ``register_kv_caches`` to a registered transport.

1. detect the platform (``connectors/platform.py``) and pick the transport (``transport: auto``);
2. NIXL: split the tensors into block-major regions and register them as they are (host DRAM on
   CPU engines, VRAM on CUDA); RBLN: let :class:`~.transports.rbln.RblnTransport` register its host
   staging (or, on the d2d path, register device memory through ``nixl_rbln`` after warm-up);
3. describe the registered memory as a canonical :class:`~.layout.KVLayout` (what a peer with
   another block size or byte order reads), and keep canonical views of the engine's own cache
   (where a cross-layout pull re-lays blocks out).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from vllm_llmd.connectors.cpu_probe import probe_cpu_packing
from vllm_llmd.connectors.layout import KVLayout
from vllm_llmd.connectors.platform import Platform, TransportChoice, choose, current_vllm_platform, detect
from vllm_llmd.connectors.relayout import KV, describe, kv_views
from vllm_llmd.connectors.transports import KVTransport, MemoryKind, Region, make_transport
from vllm_llmd.connectors.transports.rbln import RblnTransport, import_nixl_rbln

logger = logging.getLogger("vllm.vllm_llmd.connectors")


class TransportFactory(Protocol):
    def __call__(self, name: str, memory: MemoryKind, **options: Any) -> KVTransport: ...


@dataclass
class KVSetup:
    transport: KVTransport
    platform: Platform
    choice: TransportChoice
    #: layer name -> KV cache group
    layer_groups: dict[str, int]
    #: "blocks_first" / "kv_first" (the region split), for the handshake's direct check
    layout: str
    memory: MemoryKind
    #: what peers read (None: not describable, e.g. RBLN d2d over chiplet areas: direct pulls only)
    wire_layout: KVLayout | None
    #: (K, V) [B, H, S, D] views of the engine's own cache, where a re-layout writes (None: as above)
    local_views: list[KV] | None
    num_kv_groups: int
    #: KV cache group of each region registered by the NIXL transport (RBLN: from the transport)
    nixl_region_groups: list[int] | None = None

    @property
    def region_groups(self) -> list[int]:
        """The KV cache group of each registered region (pulls pair regions of the same group); on
        the RBLN d2d path known only once :meth:`RblnTransport.finalize` registered the memory."""
        if isinstance(self.transport, RblnTransport):
            return [self.layer_groups.get(name, 0) for name in self.transport.region_layers]
        return list(self.nixl_region_groups or [])


def kv_regions(
    kv_caches: Mapping[str, torch.Tensor], num_blocks: int, layer_groups: Mapping[str, int]
) -> tuple[list[Region], list[int], str, MemoryKind]:
    """Split vLLM's per-layer KV tensors into block-major regions (and the KV group of each).

    Blocks-first tensors (``[num_blocks, ...]``, the CPU backend's LBHNC) give one region per
    layer; K/V-first tensors (``[2, num_blocks, ...]``) give two. A block must be contiguous.
    """
    regions: list[Region] = []
    groups: list[int] = []
    layout = ""
    memory = MemoryKind.DRAM
    for name, t in kv_caches.items():
        if t.shape[0] == num_blocks:
            parts, layout = [t], "blocks_first"
        elif t.dim() > 1 and t.shape[0] == 2 and t.shape[1] == num_blocks:
            parts, layout = [t[0], t[1]], "kv_first"
        else:
            raise ValueError(f"LLMDConnector: layer {name}: KV tensor shape {tuple(t.shape)} has no block dimension")
        if t.device.type == "cuda":
            memory = MemoryKind.VRAM
        elif t.device.type != "cpu":
            raise ValueError(f"LLMDConnector: KV cache on {t.device.type!r} needs the RBLN (host-staging) transport")
        for p in parts:
            block_len = p[0].numel() * p.element_size()
            if p.stride(0) * p.element_size() != block_len or not p[0].is_contiguous():
                raise ValueError(f"LLMDConnector: layer {name}: KV blocks are not contiguous (stride {p.stride()})")
            device = t.device.index or 0
            regions.append(Region(base_addr=p.data_ptr(), num_blocks=num_blocks, block_len=block_len, device_id=device))
            groups.append(layer_groups.get(name, 0))
    return regions, groups, layout, memory


def _describe(
    caches: Mapping[str, torch.Tensor], spec: Any, num_blocks: int, kind: str, cpu_isa: str | None = None
) -> tuple[KVLayout | None, list[KV] | None]:
    """Canonical layout and views, or ``(None, None)`` with the reason logged (cross-layout pulls
    are then refused by the handshake, naming ``kv_layout``)."""
    heads, head_size, block_size = (getattr(spec, k, None) for k in ("num_kv_heads", "head_size", "block_size"))
    if heads is None or head_size is None or "MLA" in type(spec).__name__:
        why = type(spec).__name__
        logger.info("LLMDConnector: KV cache spec %s has no K/V head layout; cross-layout pulls off", why)
        return None, None
    try:
        shape = {"num_blocks": num_blocks, "num_kv_heads": heads, "head_size": head_size, "block_size": block_size}
        packing = None
        if kind == "cpu" and cpu_isa is not None:
            sample = next(iter(caches.values()))
            packing = probe_cpu_packing(cpu_isa, sample.dtype, block_size, heads, head_size)
        got, views = kv_views(caches, **shape, device_kind=kind, cpu_packing=packing)
    except ValueError as exc:
        logger.info("LLMDConnector: cross-layout pulls off: %s", exc)
        return None, None
    return describe(views, got), views


def setup_kv(
    kv_caches: Mapping[str, torch.Tensor],
    kv_cache_config: Any,
    *,
    transport: str = "auto",
    rbln_path: str = "host",
    backends: Sequence[str] = (),
    progress_thread: bool = False,
    platform: Any | None = None,
    cpu_isa: str | None = None,
    make: TransportFactory = make_transport,
) -> KVSetup:
    """Pick, build and register the transport for these KV caches (see the module docstring).
        ``cpu_isa``: on CPU engines, the attention kernel vLLM picked; how it packs a block is measured
        by running it (connectors/cpu_probe.py). ``make`` builds a transport by name
    (``transports.make_transport``; the connector's unit tests pass an in-process fake)."""
    groups = list(kv_cache_config.kv_cache_groups)
    layer_groups = {name: g for g, group in enumerate(groups) for name in group.layer_names}
    num_blocks = kv_cache_config.num_blocks
    sample = next(iter(kv_caches.values()))
    plat = detect(sample.device.type, platform if platform is not None else current_vllm_platform())
    nixl_rbln = import_nixl_rbln() is not None if plat.kind == "rbln" else False
    choice = choose(transport, plat, rbln_path=rbln_path, backends=tuple(backends), nixl_rbln_available=nixl_rbln)
    spec = groups[0].kv_cache_spec if groups else None
    if choice.transport == "rbln":
        options = {"kv_caches": kv_caches, "num_blocks": num_blocks, "path": choice.rbln_path}
        options.update(backends=choice.backends, progress_thread=progress_thread)
        t = make("rbln", MemoryKind.DRAM, **options)
        assert isinstance(t, RblnTransport)
        _, local_views = _describe(kv_caches, spec, num_blocks, "rbln")
        if t.staging is not None:  # peers read the host mirrors, laid out as the device cache
            wire, _ = _describe(t.staging.host, spec, num_blocks, "rbln")
        else:
            wire = None
        layout = "kv_first" if 1 in t.block_axes.values() else "blocks_first"
        return KVSetup(t, plat, choice, layer_groups, layout, t.memory, wire, local_views, len(groups))
    regions, region_groups, layout, memory = kv_regions(kv_caches, num_blocks, layer_groups)
    t = make("nixl", memory, backends=choice.backends, progress_thread=progress_thread)
    t.register(regions)
    wire, views = _describe(kv_caches, spec, num_blocks, plat.kind, cpu_isa)
    return KVSetup(t, plat, choice, layer_groups, layout, memory, wire, views, len(groups), region_groups)


def cpu_attention_isa(vllm_config: Any, spec: Any) -> str | None:
    """The CPU attention kernel vLLM runs for this cache (``cpu_attn._get_attn_isa``, vLLM 0.30-0.32),
    or None when it cannot say or the cache is quantized (packed differently)."""
    cache_dtype = str(getattr(vllm_config.cache_config, "cache_dtype", "auto"))
    if cache_dtype != "auto" or spec is None:
        return None
    try:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        return str(_get_attn_isa(vllm_config.model_config.dtype, spec.block_size, spec.head_size, cache_dtype))
    except Exception:
        return None
