"""Decode side of ``LLMDConnector``'s worker: handshake a prefill peer, pull its blocks, report them.

A mixin of :class:`~vllm_llmd.connectors.worker.LLMDConnectorWorker` (split out of worker.py by job;
the worker owns start-up and the per-step entry points, this module the pulls). It follows the
decode half of vLLM's NIXL connector (``vllm/distributed/kv_transfer/kv_connector/v1/nixl/``
``pull_worker.py`` ``NixlPullConnectorWorker._read_blocks``, ``base_worker.py``
``_pop_done_transfers``): one READ per request, polled every step, results reported through
``finished_recving``; a failure goes to ``failed_recving`` so the scheduler recomputes the prefill
locally.

A pull is one of two kinds, agreed per peer in the handshake (connectors/negotiate.py): *direct*
(same block size and layout: region ``r`` block ``b`` into region ``r`` block ``b'``) or *relayout*
(the peer's blocks are read as they are into a receive pool and re-laid out on receive,
connectors/xpull.py). Host-staging transports (RBLN) copy pulled blocks onto the device before
reporting them received. A request with nothing to pull still notifies the peer so it releases its
lease (connectors/leases.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from vllm_llmd.connectors.config import LLMDConnectorConfig
from vllm_llmd.connectors.handshake import EngineInfo, HandshakeError, check_compatible, fetch_engine_info
from vllm_llmd.connectors.kv_setup import KVSetup
from vllm_llmd.connectors.layout import plan_tokens
from vllm_llmd.connectors.leases import DONE_PREFIX
from vllm_llmd.connectors.metadata import RecvJob, RemotePrefill
from vllm_llmd.connectors.negotiate import Plan
from vllm_llmd.connectors.stats import LLMDConnectorStats
from vllm_llmd.connectors.transports import KVTransport, MemoryKind, Peer, TransportError, XferState
from vllm_llmd.connectors.xpull import CrossLayoutPuller, CrossPull, PoolTooSmall

from vllm_llmd.wire.curve import CurveClient

logger = logging.getLogger("vllm.vllm_llmd.connectors")


@dataclass
class _Pull:
    handle: object
    peer_engine: str
    started: float
    deadline: float
    nbytes: int
    nblocks: int
    #: direct pulls on a host-staging transport: blocks to copy onto the device once read
    stage_in: list[int] | None = None
    #: relayout pulls: the receive slot to re-lay out once read
    cross: CrossPull | None = None


@dataclass
class _Link:
    """A handshaken peer: the transport's endpoint, the agreed plan, what the peer published."""

    peer: Peer
    plan: Plan
    info: EngineInfo


class DecodePulls:
    """The worker's decode-side state (``_init_pulls``) and methods; the worker sets the fields below."""

    cfg: LLMDConnectorConfig
    block_size: int
    tp_rank: int
    setup: KVSetup | None
    transport: KVTransport | None
    info: EngineInfo | None
    region_groups: list[int]
    _stats: LLMDConnectorStats
    _curve_client: CurveClient | None

    def _init_pulls(self) -> None:
        self._puller: CrossLayoutPuller | None = None
        self._links: dict[str, _Link] = {}
        self._pulls: dict[str, _Pull] = {}
        #: relayout pulls waiting for room in the receive pool: (job, link, deadline)
        self._waiting: list[tuple[RecvJob, _Link, float]] = []
        self._recv_done: set[str] = set()
        self._recv_failed: set[str] = set()

    def _can_relayout(self) -> bool:
        return self.cfg.relayout_buffer_mb > 0 and self.setup is not None and self.setup.local_views is not None

    def _link(self, remote: RemotePrefill) -> _Link:
        return self._link_to(remote.remote_engine_id, remote.remote_host, remote.remote_port)

    def _link_to(self, engine_id: str, host: str, port: int) -> _Link:
        """The handshaken peer ``engine_id`` at ``host:port`` (P/D pulls and peer loads)."""
        link = self._links.get(engine_id)
        if link is not None:
            return link
        if self.transport is None or self.info is None:
            raise TransportError("the KV cache is not registered yet")
        try:
            info = fetch_engine_info(
                host,
                port,
                self.tp_rank,
                self.cfg.handshake_timeout_seconds,
                self.cfg.max_message_bytes,
                curve=self._curve_client,
            )
            plan = check_compatible(self.info, info, engine_id, can_relayout=self._can_relayout())
            peer = self.transport.add_peer(info.agent_metadata, info.regions, MemoryKind(info.memory), plan.backends)
        except (HandshakeError, TransportError, ValueError) as exc:
            self._stats.add("handshakes_failed")
            raise HandshakeError(str(exc)) from exc
        self._stats.add("handshakes_ok")
        if plan.mode == "relayout":
            logger.info(
                "LLMDConnector: engine %s (%s) hands off by re-layout on receive (%s) over %s",
                info.engine_id,
                info.platform or "?",
                plan.why,
                plan.backends[0],
            )
        link = self._links[engine_id] = _Link(peer, plan, info)
        return link

    def _drop_peer(self, engine_id: str) -> None:
        link = self._links.pop(engine_id, None)
        if link is not None and self.transport is not None:
            self.transport.remove_peer(link.peer)

    def _fail(self, request_id: str, why: object) -> None:
        logger.warning("LLMDConnector: pull for %s failed (%s); prefilling locally", request_id, why)
        self._recv_failed.add(request_id)
        self._stats.add("transfers_failed")

    def _start_pull(self, job: RecvJob) -> None:
        assert self.transport is not None
        if job.refused is not None:
            logger.warning("LLMDConnector: pull for %s refused (%s); prefilling locally", job.request_id, job.refused)
            self._recv_failed.add(job.request_id)
            self._stats.add("transfers_failed")
            if job.remote is not None:  # still tell the prefill side it can release its blocks
                self._start_pull(RecvJob(job.request_id, job.remote, [], []))
            return
        assert job.remote is not None
        notif = DONE_PREFIX + job.remote.remote_request_id.encode()
        parked = any(job.local_block_ids)
        try:
            link = self._link(job.remote)
            if not parked:
                self.transport.notify(link.peer, notif)
                return
            if link.plan.mode == "relayout":
                self._start_cross(job, link, time.monotonic() + self.cfg.transfer_timeout_seconds)
                return
            local, remote = [], []
            for r, g in enumerate(self.region_groups):
                lids = job.local_block_ids[g] if g < len(job.local_block_ids) else []
                rids = job.remote_block_ids[g] if g < len(job.remote_block_ids) else []
                if len(lids) != len(rids):
                    raise TransportError(f"{len(lids)} local blocks but {len(rids)} remote blocks in group {g}")
                local.extend((r, b) for b in lids)
                remote.extend((r, b) for b in rids)
            handle = self.transport.read_blocks(link.peer, local, remote, notif)
        except (HandshakeError, TransportError, ValueError) as exc:
            if parked:
                self._fail(job.request_id, exc)
            else:
                logger.warning("LLMDConnector: release notice for %s not sent: %s", job.request_id, exc)
            return
        nbytes = sum(self.transport.regions[r].block_len for r, _ in local)
        stage = sorted({b for g in job.local_block_ids for b in g}) if self.transport.stages else None
        self._track(job, link, handle, nbytes, len(local), stage_in=stage)

    def _track(self, job: RecvJob, link: _Link, handle: object, nbytes: int, nblocks: int, **kw: object) -> None:
        now = time.monotonic()
        deadline = now + self.cfg.transfer_timeout_seconds
        if job.remote.lease_expires_at is not None:  # past the lease the prefill engine may reuse the blocks
            deadline = min(deadline, now + job.remote.lease_expires_at - time.time())
        self._pulls[job.request_id] = _Pull(handle, link.info.engine_id, now, deadline, nbytes, nblocks, **kw)  # type: ignore[arg-type]

    def _start_cross(self, job: RecvJob, link: _Link, deadline: float) -> None:
        """A relayout pull: post it, or park it until the receive pool has room (until ``deadline``)."""
        assert self.transport is not None and self.setup is not None and self.setup.local_views is not None
        lay = link.info.kv_layout
        assert lay is not None
        if len(job.local_block_ids) != 1:
            raise TransportError(f"a re-layout pull needs one KV cache group, the job has {len(job.local_block_ids)}")
        plan = plan_tokens(
            job.remote.remote_block_ids[0],
            lay.block_size,
            job.local_block_ids[0],
            self.block_size,
            job.first_token,
            job.end_token,
        )
        if self._puller is None:
            self._puller = CrossLayoutPuller(self.transport, self.setup.local_views, self.cfg.relayout_buffer_mb << 20)
        notif = DONE_PREFIX + job.remote.remote_request_id.encode()
        try:
            cross = self._puller.start(link.peer, lay, plan, notif)
        except PoolTooSmall as exc:
            raise TransportError(str(exc)) from exc
        if cross is None:
            self._waiting.append((job, link, deadline))
            return
        self._track(job, link, cross.handle, cross.nbytes, len(plan.remote_blocks) * lay.num_layers, cross=cross)

    def _retry_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        now = time.monotonic()
        for job, link, deadline in waiting:
            if now >= deadline:
                self._fail(job.request_id, "no room in the receive pool before the deadline")
                continue
            try:
                self._start_cross(job, link, deadline)
            except (TransportError, ValueError) as exc:
                self._fail(job.request_id, exc)

    def _poll_pulls(self) -> None:
        assert self.transport is not None
        now = time.monotonic()
        for rid, pull in list(self._pulls.items()):
            state = self.transport.poll(pull.handle)
            if state == XferState.PENDING and now < pull.deadline:
                continue
            del self._pulls[rid]
            self.transport.release(pull.handle)
            if state == XferState.DONE:
                try:
                    self._land(pull)
                except Exception as exc:  # the bytes arrived but could not be put in place
                    self._fail(rid, f"{type(exc).__name__}: {exc}")
                    continue
                self._recv_done.add(rid)
                self._stats.add("transfers_ok")
                self._stats.add("bytes_read", pull.nbytes)
                self._stats.add("blocks_read", pull.nblocks)
                self._stats.add("transfer_seconds", time.monotonic() - pull.started)
            else:
                if pull.cross is not None and self._puller is not None:
                    self._puller.abandon(pull.cross)
                self._fail(rid, "timed out" if state == XferState.PENDING else "the read failed")
                self._drop_peer(pull.peer_engine)
        if self._waiting:
            self._retry_waiting()

    def _land(self, pull: _Pull) -> None:
        """Put read bytes where the engine reads them: re-layout, or host staging onto the device."""
        assert self.transport is not None
        if pull.cross is not None and self._puller is not None:
            before = self._puller.relayout_seconds
            self._stats.add("relayout_bytes", self._puller.finish(pull.cross))
            self._stats.add("relayout_transfers")
            self._stats.add("relayout_seconds", self._puller.relayout_seconds - before)
        elif pull.stage_in:
            self._stats.add("staged_in_bytes", self.transport.stage_in(pull.stage_in))
