"""Worker half of ``LLMDConnector`` (runs in each vLLM worker process).

Registers the KV cache with the transport, serves the handshake side channel, pulls blocks for
decode requests (async: reported through ``finished_recving``; failures through
``failed_recving`` so the scheduler recomputes the prefill locally), and on the prefill side
releases leased blocks when the consumer's completion notification arrives or the lease expires.
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
from vllm_llmd.connectors.metadata import LLMDConnectorMetadata, RecvJob, RemotePrefill
from vllm_llmd.connectors.stats import LLMDConnectorStats
from vllm_llmd.connectors.transports import (
    KVTransport,
    MemoryKind,
    Peer,
    Region,
    TransportError,
    XferState,
    make_transport,
)

from vllm_llmd.wire.curve import client_from_env, server_from_env

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

logger = logging.getLogger("vllm.vllm_llmd.connectors")

DONE_PREFIX = b"llmd:done:"


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


def kv_regions(
    kv_caches: dict[str, torch.Tensor], num_blocks: int, layer_groups: dict[str, int]
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
            raise ValueError(
                f"LLMDConnector: KV cache on {t.device.type!r} needs a host-staging transport (not built yet)"
            )
        for p in parts:
            block_len = p[0].numel() * p.element_size()
            if p.stride(0) * p.element_size() != block_len or not p[0].is_contiguous():
                raise ValueError(f"LLMDConnector: layer {name}: KV blocks are not contiguous (stride {p.stride()})")
            device = t.device.index or 0
            regions.append(Region(base_addr=p.data_ptr(), num_blocks=num_blocks, block_len=block_len, device_id=device))
            groups.append(layer_groups.get(name, 0))
    return regions, groups, layout, memory


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
        self.transport: KVTransport | None = None
        self.server: HandshakeServer | None = None
        self.info: EngineInfo | None = None
        self.region_groups: list[int] = []
        self._peers: dict[str, Peer] = {}
        self._pulls: dict[str, _Pull] = {}
        self._recv_done: set[str] = set()
        self._recv_failed: set[str] = set()
        self._leases: dict[str, float] = {}
        self._early_done: dict[str, float] = {}
        self._early_released: set[str] = set()
        self._stats = LLMDConnectorStats()
        # CURVE on the side channel, from LLMD_CURVE_* (vllm_llmd/wire/curve.py); a bad key stops start-up
        self._curve_server = server_from_env(os.environ)
        self._curve_client = client_from_env(os.environ)

    # ---- start-up ------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layer_groups = {
            name: g for g, group in enumerate(self.kv_cache_config.kv_cache_groups) for name in group.layer_names
        }
        regions, self.region_groups, layout, memory = kv_regions(
            kv_caches, self.kv_cache_config.num_blocks, layer_groups
        )
        self.transport = make_transport(
            self.cfg.transport, memory, backends=self.cfg.backends, progress_thread=self.cfg.progress_thread
        )
        self.transport.register(regions)
        self._stats.data["memory"] = memory.value
        mc = self.vllm_config.model_config
        self.info = EngineInfo(
            protocol=PROTOCOL_VERSION,
            engine_id=self.engine_id,
            tp_rank=self.tp_rank,
            model=str(mc.served_model_name if isinstance(mc.served_model_name, str) else mc.model),
            kv_dtype=str(self.vllm_config.cache_config.cache_dtype) + "/" + str(mc.dtype),
            block_size=self.block_size,
            num_layers=len(kv_caches),
            layout=layout,
            block_len=regions[0].block_len,
            transport=self.transport.name,
            memory=memory.value,
            agent_metadata=self.transport.local_metadata(),
            regions=regions,
        )
        self.server = self._serve(self.info)
        logger.info(
            "LLMDConnector worker: %d regions (%d layers, %d blocks of %d bytes) registered with %s/%s; "
            "side channel %s",
            len(regions),
            len(kv_caches),
            self.kv_cache_config.num_blocks,
            regions[0].block_len,
            self.transport.name,
            memory.value,
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
    def _peer(self, remote: RemotePrefill) -> Peer:
        peer = self._peers.get(remote.remote_engine_id)
        if peer is not None:
            return peer
        assert self.transport is not None and self.info is not None
        try:
            info = fetch_engine_info(
                remote.remote_host,
                remote.remote_port,
                self.tp_rank,
                self.cfg.handshake_timeout_seconds,
                self.cfg.max_message_bytes,
                curve=self._curve_client,
            )
            check_compatible(self.info, info, expected_engine_id=remote.remote_engine_id)
            peer = self.transport.add_peer(info.agent_metadata, info.regions)
        except (HandshakeError, TransportError):
            self._stats.add("handshakes_failed")
            raise
        self._stats.add("handshakes_ok")
        self._peers[remote.remote_engine_id] = peer
        return peer

    def _drop_peer(self, engine_id: str) -> None:
        peer = self._peers.pop(engine_id, None)
        if peer is not None and self.transport is not None:
            self.transport.remove_peer(peer)

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
            peer = self._peer(job.remote)
            if not parked:
                self.transport.notify(peer, notif)
                return
            local, remote = [], []
            for r, g in enumerate(self.region_groups):
                lids = job.local_block_ids[g] if g < len(job.local_block_ids) else []
                rids = job.remote_block_ids[g] if g < len(job.remote_block_ids) else []
                if len(lids) != len(rids):
                    raise TransportError(f"{len(lids)} local blocks but {len(rids)} remote blocks in group {g}")
                local.extend((r, b) for b in lids)
                remote.extend((r, b) for b in rids)
            handle = self.transport.read_blocks(peer, local, remote, notif)
        except (HandshakeError, TransportError) as exc:
            if parked:
                logger.warning("LLMDConnector: pull for %s failed (%s); prefilling locally", job.request_id, exc)
                self._recv_failed.add(job.request_id)
                self._stats.add("transfers_failed")
            else:
                logger.warning("LLMDConnector: release notice for %s not sent: %s", job.request_id, exc)
            return
        now = time.monotonic()
        nbytes = sum(self.transport.regions[r].block_len for r, _ in local)
        deadline = now + self.cfg.transfer_timeout_seconds
        if job.remote.lease_expires_at is not None:  # past the lease the prefill engine may reuse the blocks
            deadline = min(deadline, now + job.remote.lease_expires_at - time.time())
        self._pulls[job.request_id] = _Pull(handle, job.remote.remote_engine_id, now, deadline, nbytes, len(local))

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
                self._recv_done.add(rid)
                self._stats.add("transfers_ok")
                self._stats.add("bytes_read", pull.nbytes)
                self._stats.add("blocks_read", pull.nblocks)
                self._stats.add("transfer_seconds", now - pull.started)
            else:
                why = "timed out" if state == XferState.PENDING else "failed"
                logger.warning("LLMDConnector: pull for %s %s; prefilling locally", rid, why)
                self._recv_failed.add(rid)
                self._stats.add("transfers_failed")
                self._drop_peer(pull.peer_engine)

    # ---- prefill side --------------------------------------------------------------------
    def _poll_leases(self) -> set[str]:
        assert self.transport is not None
        released: set[str] = set()
        now = time.monotonic()
        # idle cost: no leases, nothing to release; a notice arriving now waits in NIXL for the next poll
        notifs = self.transport.get_notifs() if self._leases else ()
        for _peer, msg in notifs:
            if not msg.startswith(DONE_PREFIX):
                continue
            rid = msg[len(DONE_PREFIX) :].decode(errors="replace")
            if self._leases.pop(rid, None) is not None:
                released.add(rid)
                self._stats.add("leases_released")
            else:  # arrived before the scheduler told us about the lease
                self._early_done[rid] = now
        for rid, expiry in list(self._leases.items()):
            if now >= expiry:
                del self._leases[rid]
                released.add(rid)
                self._stats.add("leases_expired")
                logger.info("LLMDConnector: lease of %s expired; blocks freed", rid)
        for rid, seen in list(self._early_done.items()):
            if now - seen > 600:
                del self._early_done[rid]
        return released

    # ---- every step ----------------------------------------------------------------------
    def start_load_kv(self, meta: LLMDConnectorMetadata) -> None:
        if self.transport is None:
            return
        now = time.monotonic()
        for rid, lease in meta.send.items():
            if self._early_done.pop(rid, None) is not None:  # the consumer already read it
                self._stats.add("leases_released")
                self._early_released.add(rid)
            else:
                self._leases[rid] = now + lease
        for job in meta.recv:
            self._start_pull(job)
        if self._leases or self._pulls:
            self.transport.set_active(True)

    def transfer_results(self) -> KVConnectorTransferResults:
        if self.transport is None:
            return KVConnectorTransferResults(set(), set(), set())
        self._poll_pulls()
        sending = self._poll_leases() | self._early_released
        self._early_released = set()
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
