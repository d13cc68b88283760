"""Decode side of a cross-layout pull: read a peer's blocks into a receive slot, re-lay them out.

One :class:`CrossLayoutPuller` per worker owns the receive pool (``relayout_buffer_mb`` of
page-aligned host memory, registered with the transport once) and turns a :class:`~.layout.TokenPlan`
into one NIXL READ of the fewest runs (:func:`~.layout.read_descriptors`); when the READ is done,
:meth:`finish` copies the slot into the engine's own blocks (:func:`~.relayout.relayout_into`) and
frees the slot. A pull that does not fit in the pool right now is retried by the worker until its
deadline; one that could never fit is refused (the request is prefilled locally).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from vllm_llmd.connectors.layout import KVLayout, TokenPlan, read_descriptors, slot_bytes
from vllm_llmd.connectors.relayout import KV, RecvPool, relayout_into
from vllm_llmd.connectors.transports.base import KVTransport, Peer
from vllm_llmd.connectors.transports.staging import aligned_host_empty

logger = logging.getLogger("vllm.vllm_llmd.connectors")


class PoolTooSmall(ValueError):
    """The pull needs more receive memory than the whole pool holds."""


@dataclass
class CrossPull:
    handle: object
    offset: int
    nbytes: int  # bytes read over the wire (= the slot's size)
    remote: KVLayout
    plan: TokenPlan
    started: float


class CrossLayoutPuller:
    def __init__(self, transport: KVTransport, local_views: Sequence[KV], pool_bytes: int) -> None:
        buf, self.allocator = aligned_host_empty(pool_bytes)
        transport.register_scratch(buf.data_ptr(), buf.numel())
        self.transport = transport
        self.pool = RecvPool(buf)
        self.local_views = list(local_views)
        self.relayout_seconds = 0.0

    def start(self, peer: Peer, remote: KVLayout, plan: TokenPlan, notif: bytes) -> CrossPull | None:
        """Post the READ; ``None`` when the pool has no room now (try again later)."""
        need = slot_bytes(remote, len(plan.remote_blocks))
        if need > self.pool.nbytes:
            raise PoolTooSmall(
                f"a pull of {need / 2**20:.1f} MiB does not fit the {self.pool.nbytes / 2**20:.1f} MiB receive pool "
                "(raise relayout_buffer_mb)"
            )
        off = self.pool.alloc(need)
        if off is None:
            return None
        try:
            local, remote_runs = read_descriptors(remote, plan.remote_blocks, self.pool.base + off)
            handle = self.transport.read_runs(peer, local, remote_runs, notif)
        except Exception:
            self.pool.free(off, need)
            raise
        return CrossPull(handle, off, need, remote, plan, time.monotonic())

    def finish(self, pull: CrossPull) -> int:
        """The READ is done: re-lay the slot out into the engine's blocks; returns bytes written."""
        t0 = time.perf_counter()
        try:
            return relayout_into(self.pool.view(pull.offset, pull.nbytes), pull.remote, pull.plan, self.local_views)
        finally:
            self.relayout_seconds += time.perf_counter() - t0
            self.pool.free(pull.offset, pull.nbytes)

    def abandon(self, pull: CrossPull) -> None:
        """The READ failed or was given up: free the slot (its handle is released by the caller)."""
        self.pool.free(pull.offset, pull.nbytes)
