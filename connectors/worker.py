"""Worker half of ``LLMDConnector`` (runs in each vLLM worker process).

Registers the KV cache with the transport the platform needs (connectors/kv_setup.py), serves the
handshake side channel, pulls blocks for decode requests (async: reported through
``finished_recving``; failures through ``failed_recving`` so the scheduler recomputes the prefill
locally), and on the prefill side releases leased blocks when the consumer's completion
notification arrives or the lease expires (connectors/leases.py).

A pull is one of two kinds, agreed per peer in the handshake (connectors/negotiate.py): *direct*
(same block size and layout: region ``r`` block ``b`` into region ``r`` block ``b'``) or *relayout*
(the peer's blocks are read as they are into a receive pool and re-laid out on receive,
connectors/xpull.py). Host-staging transports (RBLN) copy prefill blocks to host memory in
``wait_for_save`` and pulled blocks onto the device before reporting them received.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorTransferResults,
)
from vllm_llmd.connectors.config import LLMDConnectorConfig
from vllm_llmd.connectors.handshake import (
    PROTOCOL_VERSION,
    EngineInfo,
    HandshakeError,
    HandshakeServer,
    check_compatible,
    fetch_engine_info,
)
from vllm_llmd.connectors.kv_setup import KVSetup, cpu_attention_isa, setup_kv
from vllm_llmd.connectors.layout import plan_tokens
from vllm_llmd.connectors.leases import DONE_PREFIX, Leases
from vllm_llmd.connectors.metadata import LLMDConnectorMetadata, RecvJob, RemotePrefill
from vllm_llmd.connectors.negotiate import Plan
from vllm_llmd.connectors.stats import LLMDConnectorStats
from vllm_llmd.connectors.transports import KVTransport, MemoryKind, Peer, TransportError, XferState, make_transport
from vllm_llmd.connectors.transports.rbln import RblnTransport
from vllm_llmd.connectors.xpull import CrossLayoutPuller, CrossPull, PoolTooSmall

from vllm_llmd.wire.curve import client_from_env, server_from_env

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

logger = logging.getLogger("vllm.vllm_llmd.connectors")


@dataclass
class LLMDHandshakeMetadata(KVConnectorHandshakeMetadata):
    """Worker → scheduler at start-up: where this worker's side channel listens."""

    host: str
    port: int
    engine_id: str


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


class LLMDConnectorWorker:
    def __init__(self, vllm_config: VllmConfig, cfg: LLMDConnectorConfig, kv_cache_config: KVCacheConfig) -> None:
        ktc = vllm_config.kv_transfer_config
        assert ktc is not None
        self.cfg = cfg
        self.vllm_config = vllm_config
        self.engine_id = str(ktc.engine_id)
        self.block_size = vllm_config.cache_config.block_size
        pc = vllm_config.parallel_config
        if pc.tensor_parallel_size != 1 or pc.pipeline_parallel_size != 1:
            raise NotImplementedError("LLMDConnector supports TP=1, PP=1 engines for now")
        self.tp_rank = 0
        self.kv_cache_config = kv_cache_config
        self.setup: KVSetup | None = None
        self.transport: KVTransport | None = None
        self.server: HandshakeServer | None = None
        self.info: EngineInfo | None = None
        self.region_groups: list[int] = []
        self._puller: CrossLayoutPuller | None = None
        self._links: dict[str, _Link] = {}
        self._pulls: dict[str, _Pull] = {}
        #: relayout pulls waiting for room in the receive pool: (job, link, deadline)
        self._waiting: list[tuple[RecvJob, _Link, float]] = []
        self._recv_done: set[str] = set()
        self._recv_failed: set[str] = set()
        self._stats = LLMDConnectorStats()
        self._leases = Leases(self._stats)
        # CURVE on the side channel, from LLMD_CURVE_* (vllm_llmd/wire/curve.py); a bad key stops start-up
        self._curve_server = server_from_env(os.environ)
        self._curve_client = client_from_env(os.environ)

    # ---- start-up ------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        cfg = self.cfg
        self.setup = setup_kv(
            kv_caches,
            self.kv_cache_config,
            transport=cfg.transport,
            rbln_path=cfg.rbln_path,
            backends=cfg.backends,
            progress_thread=cfg.progress_thread,
            cpu_isa=cpu_attention_isa(self.vllm_config, self._spec()),
            make=make_transport,  # this module's name: the unit tests swap in an in-process fake
        )
        self.transport = self.setup.transport
        self._stats.data["memory"] = self.setup.memory.value
        logger.info(
            "LLMDConnector worker: %s; transport %s (%s)",
            self.setup.platform.detail,
            self.setup.choice.transport,
            self.setup.choice.reason,
        )
        if isinstance(self.transport, RblnTransport) and self.transport.pending:
            return  # d2d: registered after warm-up (finalize_registration), then published
        self._publish(len(kv_caches))

    def _spec(self) -> object | None:
        groups = self.kv_cache_config.kv_cache_groups
        return groups[0].kv_cache_spec if groups else None

    def finalize_registration(self) -> None:
        """vllm-rbln calls this after warm-up: the RBLN d2d path registers device memory now."""
        if isinstance(self.transport, RblnTransport) and self.transport.pending and self.setup is not None:
            self.transport.finalize()
            self._publish(len(self.setup.layer_groups))

    def set_copy_op(self, op: object) -> None:
        if isinstance(self.transport, RblnTransport):
            self.transport.set_copy_op(op)  # type: ignore[arg-type]

    def _publish(self, num_layers: int) -> None:
        """Tell peers what this worker holds (EngineInfo) and open the side channel."""
        assert self.setup is not None and self.transport is not None
        regions = list(self.transport.regions)
        self.region_groups = self.setup.region_groups
        mc = self.vllm_config.model_config
        self.info = EngineInfo(
            protocol=PROTOCOL_VERSION,
            engine_id=self.engine_id,
            tp_rank=self.tp_rank,
            model=str(mc.served_model_name if isinstance(mc.served_model_name, str) else mc.model),
            kv_dtype=str(self.vllm_config.cache_config.cache_dtype) + "/" + str(mc.dtype),
            block_size=self.block_size,
            num_layers=num_layers,
            layout=self.setup.layout,
            block_len=regions[0].block_len,
            transport=self.transport.name,
            memory=self.setup.memory.value,
            agent_metadata=self.transport.local_metadata(),
            regions=regions,
            backends=list(self.transport.backends_available),
            kv_layout=self.setup.wire_layout,
            num_kv_groups=self.setup.num_kv_groups,
            platform=self.setup.platform.kind,
        )
        self.server = self._serve(self.info)
        order = self.setup.wire_layout.order() if self.setup.wire_layout else "-"
        logger.info(
            "LLMDConnector worker: %d regions (%d layers, %d blocks of %d bytes, %s) registered with %s/%s "
            "(backends %s); side channel %s",
            *(len(regions), num_layers, self.kv_cache_config.num_blocks, regions[0].block_len, order),
            *(self.transport.name, self.setup.memory.value, ",".join(self.info.backends)),
            self.server.endpoint if self.server else "-",
        )

    def _serve(self, info: EngineInfo) -> HandshakeServer | None:
        port = self.cfg.side_channel_port + self.tp_rank if self.cfg.side_channel_port else 0
        try:
            return HandshakeServer(info, self.cfg.side_channel_host, port, curve=self._curve_server)
        except Exception as exc:  # a colocated engine without P/D keeps working; no one can pull from it
            host = self.cfg.side_channel_host
            logger.warning("LLMDConnector: cannot open the side channel on %s:%s: %s", host, port, exc)
            return None

    def handshake_metadata(self) -> LLMDHandshakeMetadata | None:
        if self.server is None:
            return None
        host, port = self.server.endpoint.removeprefix("tcp://").rsplit(":", 1)
        return LLMDHandshakeMetadata(host=host, port=int(port), engine_id=self.engine_id)

    # ---- decode side ---------------------------------------------------------------------
    def _can_relayout(self) -> bool:
        return self.cfg.relayout_buffer_mb > 0 and self.setup is not None and self.setup.local_views is not None

    def _link(self, remote: RemotePrefill) -> _Link:
        link = self._links.get(remote.remote_engine_id)
        if link is not None:
            return link
        if self.transport is None or self.info is None:
            raise TransportError("the KV cache is not registered yet")
        try:
            info = fetch_engine_info(
                remote.remote_host,
                remote.remote_port,
                self.tp_rank,
                self.cfg.handshake_timeout_seconds,
                self.cfg.max_message_bytes,
                curve=self._curve_client,
            )
            plan = check_compatible(self.info, info, remote.remote_engine_id, can_relayout=self._can_relayout())
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
        link = self._links[remote.remote_engine_id] = _Link(peer, plan, info)
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

    # ---- prefill side, host staging ------------------------------------------------------
    def stage_out(self, stage: dict[str, list[int]]) -> None:
        """Copy the blocks of prompts this step completed to host memory (RBLN host staging)."""
        if self.transport is not None and self.transport.stages:
            blocks = sorted({b for ids in stage.values() for b in ids})
            self._stats.add("staged_out_bytes", self.transport.stage_out(blocks))

    # ---- every step ----------------------------------------------------------------------
    def start_load_kv(self, meta: LLMDConnectorMetadata) -> None:
        if self.transport is None:
            return
        self._leases.start(meta.send)
        for job in meta.recv:
            self._start_pull(job)
        if self._leases or self._pulls:
            self.transport.set_active(True)

    def transfer_results(self) -> KVConnectorTransferResults:
        if self.transport is None:
            return KVConnectorTransferResults(set(), set(), set())
        self._poll_pulls()
        sending = self._leases.poll(self.transport.get_notifs())
        failed = self._recv_failed
        recving = self._recv_done | failed
        self._recv_done, self._recv_failed = set(), set()
        # idle cost: the transport's background progress runs only while a peer may read our leased
        # blocks or we wait on a pull (bench/RESULTS.md, "idle connector")
        self.transport.set_active(bool(self._leases or self._pulls))
        return KVConnectorTransferResults(finished_sending=sending, finished_recving=recving, failed_recving=failed)

    def get_stats(self) -> LLMDConnectorStats | None:
        return None if self._stats.is_empty() else self._stats.clone_and_reset()

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.transport is not None:
            self.transport.close()
            self.transport = None
