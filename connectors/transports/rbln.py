"""RBLN transport: KV caches on ``rbln:N`` (vllm-rbln's vLLM model path) moved by NIXL.

Two paths, as vllm-rbln 0.12's own ``RblnNixlConnector`` has them (``vllm_rbln/distributed/
kv_transfer/kv_connector/v1/rbln_nixl/``), and this transport delegates every step that connector
takes to the same Rebellions calls:

- ``host`` (default): device → page-aligned host staging → NIXL DRAM. The staging mirrors come from
  ``rebel.kv_cache.aligned_tensor`` (``registration.py``, ``initialize_host_xfer_buffer``), the
  block copies from the model runner's own op when it hands one over (``set_host_xfer_buffer_ops``,
  vllm-rbln passes ``copy_host_device_kv_blocks``), else :func:`.staging.copy_blocks`. The prefill
  side copies a request's blocks out (:meth:`stage_out`) before its ``kv_transfer_params`` leave the
  engine; a decode side copies pulled blocks in (:meth:`stage_in`). Any NIXL peer can read staging:
  a GPU engine over UCX, another NPU over the ``RBLN`` backend when ``nixl_rbln`` imports
  (``nixl_rbln.ensure_rbln_backend``, as ``registration.py``'s ``register_kv_caches`` calls it) —
  the backend both sides have is chosen in the handshake.
- ``d2d``: NPU memory registered with the ``RBLN`` backend by ``nixl_rbln.register_kv_regions``
  (address translation, per-chiplet areas across the NPUs of the RSD group, memory registration:
  ``_register_kv_caches_impl``), deferred until after warm-up as vllm-rbln defers it (the runner
  calls ``finalize_kv_cache_registration``). Only peers with the RBLN backend and the same geometry
  can read it; a decode-side d2d engine can still pull from anyone into its receive pool.

"RSD" (Rebellions Scalable Design) groups NPUs into one logical device (torch-rbln
``_internal/rsd_utils.py``); it has no KV-transfer API of its own, so the group shows up here only
as the devices ``nixl_rbln`` spreads the areas over and as :func:`rsd_group` in logs.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from vllm_llmd.connectors.transports.base import KVTransport, MemoryKind, Peer, Region, TransportError, XferState
from vllm_llmd.connectors.transports.nixl import NixlTransport
from vllm_llmd.connectors.transports.staging import CopyBlocksOp, HostStaging

logger = logging.getLogger("vllm.vllm_llmd.connectors")

PATHS = ("host", "d2d")


def import_nixl_rbln() -> Any | None:
    """The ``nixl_rbln`` adapter (Rebellions' index, extra ``kv-connectors`` of vllm-rbln), or None."""
    try:
        import nixl_rbln  # type: ignore[import-not-found]
    except ImportError:
        return None
    return nixl_rbln


def rsd_group(device_id: int) -> tuple[int, ...]:
    """Physical NPUs behind logical device ``device_id`` (torch-rbln's own mapping when it imports;
    else ``RBLN_DEVICE_MAP="[0,1],[2,3]"`` or ``RBLN_NPUS_PER_DEVICE``, the variables it reads)."""
    try:
        from torch_rbln._internal.rsd_utils import get_physical_device_ids  # type: ignore[import-not-found]

        ids = get_physical_device_ids(device_id)
        if ids:
            return tuple(int(i) for i in ids)
    except Exception:
        pass
    groups = re.findall(r"\[([0-9,\s]*)\]", os.environ.get("RBLN_DEVICE_MAP", ""))
    if 0 <= device_id < len(groups):
        ids = [int(x) for x in groups[device_id].split(",") if x.strip()]
        if ids:
            return tuple(ids)
    per = os.environ.get("RBLN_NPUS_PER_DEVICE", "")
    if per.isdigit() and int(per) > 1:
        n = int(per)
        return tuple(range(device_id * n, device_id * n + n))
    return (device_id,)


def block_axes(kv_caches: Mapping[str, torch.Tensor], num_blocks: int) -> dict[str, int]:
    """Which axis indexes blocks in each layer: 0 (``[B, 2, H, 1, S, D]``) or 1 (``[2, B, ...]``)."""
    out: dict[str, int] = {}
    for name, t in kv_caches.items():
        if t.shape[0] == num_blocks and not (t.shape[0] == 2 and t.dim() > 1 and t.shape[1] == num_blocks):
            out[name] = 0
        elif t.dim() > 1 and t.shape[0] == 2 and t.shape[1] == num_blocks:
            out[name] = 1
        else:
            raise TransportError(f"layer {name}: KV tensor {tuple(t.shape)} has no block axis of {num_blocks}")
    return out


def _device_id(t: torch.Tensor) -> int:
    dev = t.get_device() if hasattr(t, "get_device") else -1
    return int(dev) if dev is not None and dev >= 0 else 0


class RblnTransport(KVTransport):
    """NIXL over RBLN host staging or RBLN device memory (see the module docstring)."""

    #: the wire family a peer checks: the bytes move by NIXL on either path
    name = "nixl"

    def __init__(
        self,
        kv_caches: Mapping[str, torch.Tensor],
        *,
        num_blocks: int,
        path: str = "host",
        backends: Sequence[str] = ("UCX",),
        progress_thread: bool = False,
        stripe_width: int | None = None,
    ) -> None:
        if path not in PATHS:
            raise TransportError(f"unknown RBLN path {path!r} (known: {PATHS})")
        self.path = path
        self.caches = dict(kv_caches)
        self.block_axes = block_axes(self.caches, num_blocks)
        self.num_blocks = num_blocks
        self.device_id = _device_id(next(iter(self.caches.values())))
        self.rsd_group = rsd_group(self.device_id)
        self._extra = {} if stripe_width is None else {"stripe_width": stripe_width}
        self.nixl_rbln = import_nixl_rbln()
        if path == "d2d" and self.nixl_rbln is None:
            raise TransportError(
                "rbln_path 'd2d' needs the nixl-rbln adapter (vllm-rbln[kv-connectors], Rebellions' index); "
                "use rbln_path 'host' to stage through host memory over UCX"
            )
        self.memory = MemoryKind.VRAM if path == "d2d" else MemoryKind.DRAM
        plain = [b for b in backends if b != "RBLN"] or ["UCX"]
        self._nixl = NixlTransport(memory=self.memory, backends=plain, progress_thread=progress_thread)
        self.rbln_backend = False
        if self.nixl_rbln is not None:
            # vllm-rbln creates the RBLN backend on the agent the same way before registering memory
            self.nixl_rbln.ensure_rbln_backend(self._nixl.agent, device_id=0, **self._extra)
            self.rbln_backend = self._nixl.use_backend("RBLN")
            if not self.rbln_backend:
                logger.warning(
                    "LLMDConnector: nixl_rbln imported but NIXL has no RBLN backend; using %s", self._nixl.backends
                )
        if path == "d2d" and not self.rbln_backend:
            raise TransportError("rbln_path 'd2d' needs NIXL's RBLN backend, which nixl_rbln did not create")
        self.staging: HostStaging | None = None
        self.region_layers: list[str] = []
        if path == "host":
            self.staging = HostStaging(self.caches, self.block_axes)
            regions, self.region_layers = self.staging.regions()
            self._nixl.register(regions)

    # ---- registration ------------------------------------------------------------------------
    @property
    def pending(self) -> bool:
        """D2D registration waits for :meth:`finalize` (after the model's warm-up)."""
        return not self._nixl.regions

    def finalize(self) -> None:
        """Register the device memory with ``nixl_rbln`` (d2d path; a no-op once done or on host)."""
        if not self.pending:
            return
        import rebel  # type: ignore[import-not-found]

        spec: list[tuple[torch.Tensor, int, int]] = []
        layers: list[str] = []
        for name, t in self.caches.items():
            nbytes = t.numel() * t.element_size()
            if self.block_axes[name] == 0:  # K and V share a block: one region
                spec.append((t, 0, nbytes // self.num_blocks))
                layers.append(name)
            else:  # K/V-first: a region per half
                half = nbytes // 2
                spec += [(t, 0, half // self.num_blocks), (t, half, half // self.num_blocks)]
                layers += [name, name]
        sample = next(iter(self.caches.values()))
        tables = self.nixl_rbln.register_kv_regions(
            self._nixl.agent,
            spec,
            self.device_id,
            mem=self.memory.value,
            rbln_ctx_ptr=rebel.context_of(sample).rbln_ctx_ptr,
            **self._extra,
        )
        if len(tables.base_addrs) != len(tables.block_lens) or len(tables.base_addrs) != len(spec) * tables.n_shards:
            raise TransportError(
                f"nixl_rbln returned {len(tables.base_addrs)} regions for {len(spec)} x {tables.n_shards} areas"
            )
        regions = [
            Region(base_addr=int(a), num_blocks=self.num_blocks, block_len=int(n), device_id=self.device_id)
            for a, n in zip(tables.base_addrs, tables.block_lens, strict=True)
        ]
        self.region_layers = [name for name in layers for _ in range(tables.n_shards)]
        self.areas = tables.n_shards
        self._nixl.register(regions, registered=True)
        logger.info(
            "LLMDConnector RBLN d2d: %d regions over %d chiplet area(s) on device %d (RSD group %s)",
            len(regions),
            tables.n_shards,
            self.device_id,
            list(self.rsd_group),
        )

    def register(self, regions: Sequence[Region]) -> None:
        raise TransportError("the RBLN transport registers its own staging or device regions")

    def set_copy_op(self, op: CopyBlocksOp | None) -> None:
        """The model runner's host <-> device block copy (vLLM's ``set_host_xfer_buffer_ops``)."""
        if self.staging is not None:
            self.staging.copy_op = op

    # ---- staging hooks -------------------------------------------------------------------------
    @property
    def stages(self) -> bool:
        return self.staging is not None

    def stage_out(self, block_ids: Sequence[int]) -> int:
        return 0 if self.staging is None else self.staging.to_host(block_ids)

    def stage_in(self, block_ids: Sequence[int]) -> int:
        return 0 if self.staging is None else self.staging.to_device(block_ids)

    # ---- everything else is NIXL's -------------------------------------------------------------
    @property
    def regions(self) -> tuple[Region, ...]:
        return self._nixl.regions

    @property
    def backends_available(self) -> tuple[str, ...]:
        return self._nixl.backends_available

    def local_metadata(self) -> bytes:
        return self._nixl.local_metadata()

    def add_peer(
        self, metadata: bytes, regions: Sequence[Region], memory: MemoryKind | None = None, backends: Sequence[str] = ()
    ) -> Peer:
        return self._nixl.add_peer(metadata, regions, memory, backends)

    def remove_peer(self, peer: Peer) -> None:
        self._nixl.remove_peer(peer)

    def read_blocks(self, peer, local, remote, notif: bytes = b"") -> object:  # type: ignore[override]
        return self._nixl.read_blocks(peer, local, remote, notif)

    def write_blocks(self, peer, local, remote, notif: bytes = b"") -> object:  # type: ignore[override]
        return self._nixl.write_blocks(peer, local, remote, notif)

    def read_runs(self, peer: Peer, local: np.ndarray, remote: np.ndarray, notif: bytes = b"") -> object:
        return self._nixl.read_runs(peer, local, remote, notif)

    def register_scratch(self, base_addr: int, nbytes: int, memory: MemoryKind = MemoryKind.DRAM) -> None:
        self._nixl.register_scratch(base_addr, nbytes, memory)

    def poll(self, handle: object) -> XferState:
        return self._nixl.poll(handle)

    def release(self, handle: object) -> None:
        self._nixl.release(handle)

    def notify(self, peer: Peer, message: bytes) -> None:
        self._nixl.notify(peer, message)

    def get_notifs(self) -> list[tuple[str, bytes]]:
        return self._nixl.get_notifs()

    def set_active(self, active: bool) -> None:
        self._nixl.set_active(active)

    def hold_until(self, deadline: float) -> None:
        self._nixl.hold_until(deadline)

    def close(self) -> None:
        self._nixl.close()
