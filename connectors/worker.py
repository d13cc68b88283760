"""Worker half of ``LLMDConnector`` (runs in each vLLM worker process): start-up and the per-step calls.

Registers the KV cache with the transport the platform needs (connectors/kv_setup.py), publishes
what it holds and serves the handshake side channel (connectors/handshake.py), and each step hands
vLLM's ``start_load_kv`` / ``get_transfer_results`` calls (``vllm/distributed/kv_transfer/kv_connector/v1/base.py``,
``KVConnectorBase_V1``) to the two sides: the decode side's pulls (connectors/pulls.py: async,
reported through ``finished_recving``; failures through ``failed_recving`` so the scheduler
recomputes the prefill locally) and the prefill side's leases (connectors/leases.py: leased blocks
are released when the consumer's completion notification arrives or the lease expires).
Host-staging transports (RBLN) copy prefill blocks to host memory in ``wait_for_save``.

Idle cost: the transport's UCX progress parks unless something can need it (:meth:`_busy`: leases,
a prefill for a remote decode being computed, pulls, peer loads; connectors/transports/progress.py);
reads this worker cannot see coming (a peer's first read after its handshake, reads of DRAM-tier
blocks a peer pinned through the scheduler process) open windows from the side channel
(connectors/read_windows.py).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorTransferResults,
)
from vllm_llmd.connectors.config import LLMDConnectorConfig
from vllm_llmd.connectors.handshake import PROTOCOL_VERSION, EngineInfo, HandshakeServer
from vllm_llmd.connectors.kv_setup import KVSetup, cpu_attention_isa, setup_kv
from vllm_llmd.connectors.leases import Leases
from vllm_llmd.connectors.metadata import LLMDConnectorMetadata, RecvJob
from vllm_llmd.connectors.peer_load import PeerLoader, tier_offer
from vllm_llmd.connectors.pulls import DecodePulls
from vllm_llmd.connectors.read_windows import ReadWindows
from vllm_llmd.connectors.stats import LLMDConnectorStats
from vllm_llmd.connectors.transports import KVTransport, make_transport
from vllm_llmd.connectors.transports.rbln import RblnTransport

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


class LLMDConnectorWorker(DecodePulls):
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
        self._init_pulls()
        self._stats = LLMDConnectorStats()
        self._leases = Leases(self._stats)
        #: the scheduler computes a prefill for a remote decode (its read may beat the lease)
        self._producing = False
        self._windows: ReadWindows | None = None  # peers' reads announced on the side channel
        self._tier_worker: object | None = None  # the DRAM tier's copy worker: offered to peers
        self._peer_loader: PeerLoader | None = None
        # CURVE on the side channel, from LLMD_CURVE_* (vllm_llmd/wire/curve.py); a bad key stops start-up
        self._curve_server = server_from_env(os.environ)
        self._curve_client = client_from_env(os.environ)

    # ---- start-up ------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor], tier_worker: object | None = None) -> None:
        cfg = self.cfg
        self._tier_worker = tier_worker
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
        offer = tier_offer(self._tier_worker, regions) if self._tier_worker is not None else None
        if offer is not None:  # peers read DRAM-tier slots with one-sided reads: register the region
            try:
                self.transport.register_scratch(offer[2], offer[3])
            except Exception as exc:
                logger.warning("LLMDConnector: the DRAM tier is not offered to peers: %s", exc)
                offer = None
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
            tier_region=offer[0] if offer else None,
            tier_pages=offer[1] if offer else [],
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
        assert self.transport is not None
        self._windows = ReadWindows(self.transport.hold_until)
        try:
            return HandshakeServer(
                info,
                self.cfg.side_channel_host,
                port,
                curve=self._curve_server,
                windows=self._windows,
                link_seconds=self.cfg.transfer_timeout_seconds,
            )
        except Exception as exc:  # a colocated engine without P/D keeps working; no one can pull from it
            host = self.cfg.side_channel_host
            logger.warning("LLMDConnector: cannot open the side channel on %s:%s: %s", host, port, exc)
            return None

    def handshake_metadata(self) -> LLMDHandshakeMetadata | None:
        if self.server is None:
            return None
        host, port = self.server.endpoint.removeprefix("tcp://").rsplit(":", 1)
        return LLMDHandshakeMetadata(host=host, port=int(port), engine_id=self.engine_id)

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
        self._producing = meta.producing
        for job in meta.recv:
            if job.peer is not None:  # a peer load (connectors/peer_load.py)
                self._start_peer(job)
            else:
                self._start_pull(job)
        if self._busy():
            self.transport.set_active(True)

    def transfer_results(self) -> KVConnectorTransferResults:
        if self.transport is None:
            return KVConnectorTransferResults(set(), set(), set())
        self._poll_pulls()
        if self._peer_loader is not None:
            loaded, not_loaded = self._peer_loader.poll()
            self._recv_done |= loaded
            self._recv_failed |= not_loaded
        sending = self._leases.poll(self.transport.get_notifs())
        failed = self._recv_failed
        recving = self._recv_done | failed
        self._recv_done, self._recv_failed = set(), set()
        # idle cost: the transport's background progress parks unless a peer may read our blocks or
        # we wait on a read (bench/RESULTS.md, "The idle connector"); the side channel's read windows
        # keep it awake for reads we hold no lease for (connectors/read_windows.py)
        self.transport.set_active(self._busy())
        return KVConnectorTransferResults(finished_sending=sending, finished_recving=recving, failed_recving=failed)

    def _start_peer(self, job: RecvJob) -> None:
        if self._peer_loader is None:
            assert self.transport is not None
            cfg = self.cfg
            self._peer_loader = PeerLoader(
                self.transport,
                self._link_to,
                self._stats,
                cfg.transfer_timeout_seconds,
                cfg.handshake_timeout_seconds,
                self._curve_client,
                self.tp_rank,
                reader=self.engine_id,
            )
        self._peer_loader.start(job)

    def _busy(self) -> bool:
        """Leases held, a remote decode's prefill computing, a pull or a peer load in flight."""
        return bool(self._leases) or self._producing or bool(self._pulls) or self._peer_busy()

    def _peer_busy(self) -> bool:
        return self._peer_loader is not None and self._peer_loader.busy

    def get_stats(self) -> LLMDConnectorStats | None:
        return None if self._stats.is_empty() else self._stats.clone_and_reset()

    def shutdown(self) -> None:
        if self._peer_loader is not None:
            self._peer_loader.close()
            self._peer_loader = None
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.transport is not None:
            self.transport.close()
            self.transport = None
