"""Worker side of peer loads: what a holder offers, and the reader's pin → read → release.

**Holder.** At start-up the worker registers its DRAM tier (the shared-memory region vLLM's
offloading manager places chunks in, connectors/tiers/) with its NIXL agent and publishes it in its
``EngineInfo`` (handshake.py): the region (one row per chunk) and, for each of its KV regions, where
that region's page of a block sits in a row (:func:`tier_offer`, from ``HostCopyWorker``'s views).

**Reader.** A request whose ``kv_transfer_params`` name a holder (:class:`~vllm_llmd.wire.PeerLoad`,
router-built) arrives as a :class:`~.metadata.RecvJob` with ``peer`` set: the request's own block
hashes for the blocks to load and the engine blocks to load them into. :class:`PeerLoader`

1. links to the holder through the side channel as a P/D pull does (handshake, identity and
   compatibility checks: same block size and layout, a "direct" plan; the holder must offer a tier);
2. asks it, off the worker thread, to pin those blocks (:func:`~.handshake.pin_blocks`): the holder
   answers from its side-channel thread with chunk ids under a lease, without its engine stepping;
3. reads every (block, region) page with one NIXL READ (``read_runs``) straight into the engine's
   blocks, and
4. releases the lease (off the worker thread; an unreleased lease expires on the holder).

Anything short of every block read (holder unreachable, blocks evicted or only partly held, pin
refused, read failed or past its deadline) fails the request's load: vLLM prefills it locally
(``load_failure_policy: recompute``), output identical. Results are counted per holder
(``llmd:kv_peer_loads{peer,result}``, bytes, seconds: connectors/stats.py).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from vllm_llmd.connectors.handshake import HandshakeError, pin_blocks, release_blocks
from vllm_llmd.connectors.transports.base import Peer, Region, TransportError, XferState

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from vllm_llmd.connectors.metadata import RecvJob
    from vllm_llmd.connectors.stats import LLMDConnectorStats
    from vllm_llmd.connectors.transports.base import KVTransport

logger = logging.getLogger("vllm.vllm_llmd.connectors")

#: a read must be done this long before the holder's lease ends (clock skew is not involved: the
#: reader times its own lease from when it asked)
LEASE_MARGIN_SECONDS = 0.5


def tier_offer(tier_worker: Any, regions: Sequence[Region]) -> tuple[Region, list[int], int, int] | None:
    """What this worker can offer peers from its DRAM tier: ``(row region, page offset per KV region,
    base address, bytes to register)``; ``None`` when the tier's pages do not map one-to-one onto the
    KV regions (then no tier is offered: peers prefill)."""
    region = getattr(tier_worker, "_region", None)
    sides = getattr(tier_worker, "_sides", None)
    if region is None or not sides:
        return None
    base = int(region.base_tensor.data_ptr())
    row = int(region._row_stride)
    by_engine = {int(s.engine.data_ptr()): s for s in sides}
    pages = []
    for r in regions:
        side = by_engine.get(int(r.base_addr))
        if side is None or int(side.cpu.shape[1]) < r.block_len:
            return None
        pages.append(int(side.cpu.data_ptr()) - base)
    return (
        Region(base_addr=base, num_blocks=int(region.num_chunks), block_len=row),
        pages,
        base,
        row * int(region.num_chunks),
    )


@dataclass
class _Pinning:
    job: RecvJob
    peer: Peer
    engine: str
    tier: Region
    pages: list[int]
    future: Future[list[tuple[int, list[int]]]]
    asked: float


@dataclass
class _Reading:
    job: RecvJob
    engine: str
    host: str
    port: int
    handle: object
    leases: list[int]
    started: float
    deadline: float
    nbytes: int


class PeerLoader:
    """The reader's peer loads in flight (one per worker; called on the worker thread)."""

    def __init__(
        self,
        transport: KVTransport,
        link: Callable[[str, str, int], Any],
        stats: LLMDConnectorStats,
        timeout_s: float,
        control_timeout_s: float,
        curve: Any = None,
        tp_rank: int = 0,
        reader: str = "",
    ) -> None:
        self.transport = transport
        self.reader = reader  # this engine's id: named in pin requests (the holder's metrics)
        self._link = link
        self._stats = stats
        self.timeout_s = timeout_s
        self.control_timeout_s = control_timeout_s
        self._curve = curve
        self.tp_rank = tp_rank
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llmd-peer")
        self._pinning: dict[str, _Pinning] = {}
        self._reading: dict[str, _Reading] = {}
        self._done: set[str] = set()
        self._failed: set[str] = set()

    @property
    def busy(self) -> bool:
        return bool(self._pinning or self._reading)

    def start(self, job: RecvJob) -> None:
        p = job.peer
        assert p is not None
        engine = p.load.peer_engine_id
        try:
            if job.refused is not None:
                raise TransportError(job.refused)
            link = self._link(engine, p.load.peer_host, p.load.peer_port)
            info = link.info
            if link.plan.mode != "direct":
                raise TransportError(f"peer loads copy blocks as they are; the holder needs a {link.plan.mode} plan")
            if info.tier_region is None or len(info.tier_pages) != len(self.transport.regions):
                raise TransportError("the holder offers no DRAM tier to peers")
            if len(job.local_block_ids) != 1 or len(job.local_block_ids[0]) != len(p.hashes):
                raise TransportError("a peer load needs one KV cache group and one local block per hash")
        except (HandshakeError, TransportError, ValueError) as exc:
            self._fail(job, engine, "refused" if isinstance(exc, TransportError) else "unreachable", exc)
            return
        future = self._pool.submit(
            pin_blocks,
            p.load.peer_host,
            p.load.peer_port,
            self.tp_rank,
            engine,
            list(p.hashes),
            self.timeout_s,
            self.control_timeout_s,
            self._curve,
            self.reader,
        )
        peer = dataclasses.replace(link.peer, extra=(info.tier_region,))
        self._pinning[job.request_id] = _Pinning(
            job, peer, engine, info.tier_region, list(info.tier_pages), future, time.monotonic()
        )

    def poll(self) -> tuple[set[str], set[str]]:
        """Advance every load; ``(loaded, failed)`` request ids since the last call."""
        for rid, pin in list(self._pinning.items()):
            if not pin.future.done():
                continue
            del self._pinning[rid]
            try:
                leases = pin.future.result()
            except HandshakeError as exc:
                self._fail(pin.job, pin.engine, "refused" if "refused" in str(exc) else "unreachable", exc)
                continue
            except Exception as exc:  # a bug of ours: never leave vLLM waiting
                self._fail(pin.job, pin.engine, "failed", exc)
                continue
            self._read(pin, leases)
        now = time.monotonic()
        for rid, rd in list(self._reading.items()):
            state = self.transport.poll(rd.handle)
            if state == XferState.PENDING and now < rd.deadline:
                continue
            del self._reading[rid]
            self.transport.release(rd.handle)
            self._release(rd.host, rd.port, rd.leases)
            if state == XferState.DONE:
                self._done.add(rid)
                self._count(rd.engine, "ok")
                self._count(rd.engine, "bytes", rd.nbytes)
                self._count(rd.engine, "blocks", len(rd.job.local_block_ids[0]))
                self._count(rd.engine, "seconds", now - rd.started)
            else:
                self._fail(rd.job, rd.engine, "timeout" if state == XferState.PENDING else "failed", "the read")
        done, failed = self._done, self._failed
        self._done, self._failed = set(), set()
        return done, failed

    def _read(self, pin: _Pinning, leases: list[tuple[int, list[int]]]) -> None:
        job, p = pin.job, pin.job.peer
        assert p is not None
        host, port = p.load.peer_host, p.load.peer_port
        chunks = [c for _, cs in leases for c in cs]
        ids = [lid for lid, _ in leases]
        local_ids = job.local_block_ids[0]
        if len(chunks) < len(local_ids):
            self._release(host, port, ids)
            self._fail(job, pin.engine, "evicted", f"the holder has {len(chunks)} of {len(local_ids)} blocks")
            return
        regions = self.transport.regions
        lb = np.array([r.block_len for r in regions], dtype=np.uint64)
        lbase = np.array([r.base_addr for r in regions], dtype=np.uint64)
        pages = np.array(pin.pages, dtype=np.uint64)
        b = np.array(local_ids, dtype=np.uint64)[:, None]
        c = np.array(chunks[: len(local_ids)], dtype=np.uint64)[:, None]
        local = np.stack([(lbase + b * lb).ravel(), np.broadcast_to(lb, (len(local_ids), len(regions))).ravel()], 1)
        raddr = np.uint64(pin.tier.base_addr) + c * np.uint64(pin.tier.block_len) + pages
        remote = np.stack([raddr.ravel(), local[:, 1]], 1)
        started = time.monotonic()
        try:
            handle = self.transport.read_runs(pin.peer, local, remote)
        except (TransportError, ValueError) as exc:
            self._release(host, port, ids)
            self._fail(job, pin.engine, "failed", exc)
            return
        deadline = min(started + self.timeout_s, pin.asked + self.timeout_s - LEASE_MARGIN_SECONDS)
        nbytes = int(local[:, 1].sum())
        self._reading[job.request_id] = _Reading(job, pin.engine, host, port, handle, ids, started, deadline, nbytes)

    def _release(self, host: str, port: int, lease_ids: list[int]) -> None:
        if lease_ids:
            self._pool.submit(release_blocks, host, port, self.tp_rank, lease_ids, self.control_timeout_s, self._curve)

    def _fail(self, job: RecvJob, engine: str, result: str, why: object) -> None:
        logger.warning(
            "LLMDConnector: peer load of %s from %s %s (%s); prefilling locally", job.request_id, engine, result, why
        )
        self._failed.add(job.request_id)
        self._count(engine, result)

    def _count(self, engine: str, what: str, n: float = 1) -> None:
        self._stats.add(f"peer|{engine}|{what}", n)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
