"""``TierStack``: the DRAM and disk tiers inside ``LLMDConnector``.

The tiers are vLLM's own ``OffloadingConnector`` (distributed/kv_transfer/kv_connector/v1/
offloading_connector.py), built as a child of ``LLMDConnector`` with a private copy of the
``VllmConfig`` whose ``kv_transfer_config`` names ``LLMDTieringSpec`` (spec.py): vLLM's scheduler-side
manager, policies, events and secondary tiers, our copy worker and disk tier. ``LLMDConnector``
forwards every connector call to it; this class adds what sits between the two halves:

- **who loads a request.** A decode request whose ``kv_transfer_params`` name a prefill engine is
  pulled by the P/D half (the prefill engine holds those blocks under a lease for it); any other
  request asks the tiers. The other half is told about the allocation with zero external tokens
  (so the P/D half still releases a lease it does not need, and the tiers still store the request's
  blocks afterwards, including blocks pulled from a prefill engine).
- **peer loads** (connectors/peer_serve.py): the scheduler half serves pins of the DRAM tier for
  peers (:class:`~vllm_llmd.connectors.peer_serve.PinServer`, fed by the worker's side channel) and
  counts what it served (:meth:`TierStack.peer_served`, into the P/D half's stats);
- **tier and tenant metrics** (stats.py): what each tier stored, evicted, promoted and loaded,
  residency gauges, load-back times, and per-tenant prompt and hit tokens.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm.config.kv_transfer import KVTransferConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.offloading_connector import OffloadingConnector
from vllm.v1.metrics.cache_hit_source import CacheHitSource
from vllm_llmd.connectors.tiers.config import TiersConfig
from vllm_llmd.connectors.tiers.stats import TierStats
from vllm_llmd.connectors.tiers.tenants import TopTenants, tenant_of

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput

logger = logging.getLogger("vllm.vllm_llmd.tiers")

#: where a hit came from, as the ``tier`` label of ``llmd:kv_tenant_hit_tokens``
SOURCE_LABEL = {CacheHitSource.HOST: "dram", CacheHitSource.DISK: "disk", CacheHitSource.P2P: "remote"}
PD, TIER = "pd", "tier"


@dataclass
class TieredMetadata(KVConnectorMetadata):
    """What the scheduler half sends the worker half each step when tiers are on."""

    pd: KVConnectorMetadata
    tiers: KVConnectorMetadata


class TierStack:
    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig, cfg: TiersConfig
    ) -> None:
        ktc = vllm_config.kv_transfer_config
        assert ktc is not None
        child_config = copy.copy(vllm_config)  # as vLLM's MultiConnector builds its children's configs
        child_config.kv_transfer_config = KVTransferConfig(
            kv_connector="OffloadingConnector",
            kv_role="kv_both",
            engine_id=ktc.engine_id,
            kv_connector_extra_config=cfg.offloading_extra_config(),
        )
        self.child = OffloadingConnector(child_config, role, kv_cache_config)
        self.cfg = cfg
        self.role = role
        self.block_size = vllm_config.cache_config.block_size
        self._claims: dict[str, str] = {}
        self._local_hits: dict[str, int] = {}
        self._recorded: set[str] = set()
        self._stats = TierStats()
        self._tenants = TopTenants(cfg.tenant.top_k)
        self._tenants_version = 0
        self._gauges: dict[str, float] = {}
        self._manager: Any = None
        self._disk: Any = None
        if role == KVConnectorRole.SCHEDULER:
            self._manager = self.child.scheduler.manager  # an LLMDTieringManager (spec.py)
            self._disk = next(iter(self._manager.secondary_tiers), None)
            self._chunk_bytes = self._manager.primary_tier.get_kv_memoryview().strides[0]
            self._dram_capacity = self._manager.primary_tier._num_chunks
            self.pin_server = self._serve_peers(str(ktc.engine_id))

    # ---- scheduler: which half loads a request ---------------------------------------------------
    def match(self, request: Any, num_computed_tokens: int, pd: tuple[int | None, bool]) -> tuple[int | None, bool]:
        rid = request.request_id
        self._local_hits[rid] = num_computed_tokens
        if pd[0]:
            self._claims[rid] = PD
            return pd
        n, load_async = self.child.get_num_new_matched_tokens(request, num_computed_tokens)
        if n:
            self._claims[rid] = TIER
        else:
            self._claims.pop(rid, None)
        return n, load_async

    def claim(self, request_id: str) -> str | None:
        return self._claims.get(request_id)

    def after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        claim = self._claims.get(request.request_id)
        self.child.update_state_after_alloc(request, blocks, num_external_tokens if claim == TIER else 0)
        self._record_request(request, num_external_tokens, claim)

    def hit_sources(self, request: Any, num_external_tokens: int) -> dict[CacheHitSource, int]:
        if self._claims.get(request.request_id) == TIER:
            return self.child.get_external_cache_hit_sources(request, num_external_tokens)
        return {CacheHitSource.P2P: num_external_tokens} if num_external_tokens else {}

    def _record_request(self, request: Any, num_external_tokens: int, claim: str | None) -> None:
        """Tenant and load-back counters, once per request (vLLM calls ``update_state_after_alloc``
        again when an asynchronously loaded request is scheduled; preempted requests are skipped, as
        vLLM's own connector prefix-cache stats skip them)."""
        rid = request.request_id
        if rid in self._recorded or getattr(request, "num_preemptions", 0):
            return
        self._recorded.add(rid)
        prompt = int(request.num_prompt_tokens)
        label = self._tenants.observe(tenant_of(request, self.cfg.tenant.source, self.cfg.tenant.xarg), prompt)
        st = self._stats
        st.tenant(label, "prompt", prompt)
        st.tenant(label, "hit:engine", self._local_hits.get(rid, 0))
        if num_external_tokens:
            for source, n in self.hit_sources(request, num_external_tokens).items():
                tier = SOURCE_LABEL.get(source, "unknown")
                st.tenant(label, f"hit:{tier}", n)
                if claim == TIER:
                    st.add(tier, "loaded_tokens", n)
        if self._tenants.version != self._tenants_version:
            self._tenants_version = self._tenants.version
            st.tenant_labels(sorted(self._tenants.labelled))

    def forget(self, request_id: str) -> None:
        self._claims.pop(request_id, None)
        self._local_hits.pop(request_id, None)
        self._recorded.discard(request_id)

    # ---- scheduler: every step -------------------------------------------------------------------
    def build_meta(self, pd_meta: KVConnectorMetadata, scheduler_output: Any) -> TieredMetadata:
        return TieredMetadata(pd=pd_meta, tiers=self.child.build_connector_meta(scheduler_output))

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        self.child.update_connector_output(output)

    def take_events(self) -> list[Any]:
        return list(self.child.take_events())

    def scheduler_stats(self) -> TierStats | None:
        m = self._manager
        st = self._stats
        if m.changes:
            for (tier, what), n in m.changes.items():
                st.add(tier, what, n)
            m.changes.clear()
        gauges = {
            "dram|blocks": m.resident_dram_blocks(),
            "dram|capacity_blocks": self._dram_capacity,
        }
        if self._disk is not None:
            gauges["disk|blocks"] = self._disk.resident_blocks
            gauges["disk|capacity_blocks"] = self._disk.capacity_blocks
            c = self._disk.take_counters()
            st.add("disk", "dropped", c.dropped)
            st.add("disk", "skipped", c.skipped)
            for kind, n in c.errors.items():
                st.add("disk", f"err:{kind}", n)
            for s in c.read_seconds:
                st.sample("disk", s)
        if gauges != self._gauges:
            self._gauges = gauges
            for key, value in gauges.items():
                tier, _, what = key.partition("|")
                per_block = self._disk.file_bytes if tier == "disk" else self._chunk_bytes
                st.gauge(tier, what, value)
                st.gauge(tier, what.replace("blocks", "bytes"), value * per_block)
        if st.is_empty():
            return None
        self._stats = TierStats()
        return st

    def reset_cache(self) -> bool | None:
        return self.child.reset_cache()

    def tier_worker(self) -> Any:
        """The DRAM tier's copy worker (worker half, after ``register_kv_caches``), or ``None``."""
        cw = self.child.connector_worker
        return None if cw is None else getattr(cw, "worker", None)

    def _serve_peers(self, engine_id: str) -> Any:
        from vllm_llmd.connectors.peer_serve import PeerHoldings, PinServer

        try:
            return PinServer(engine_id, PeerHoldings(self._manager, block_bytes=self._chunk_bytes))
        except Exception as exc:  # the engine runs; peers cannot load from it (they prefill)
            logger.warning("LLMDConnector: the DRAM tier is not served to peers: %s", exc)
            return None

    def peer_served(self) -> dict[str, float]:
        """What this holder served peers since the last call (``"<reader>|<what>"`` -> count,
        :meth:`~vllm_llmd.connectors.peer_serve.PeerHoldings.take_counts`); scheduler half only."""
        server = getattr(self, "pin_server", None)
        return {} if server is None else server.holdings.take_counts()

    def shutdown(self) -> None:
        if getattr(self, "pin_server", None) is not None:
            self.pin_server.close()
            self.pin_server = None
        self.child.shutdown()

    # ---- worker ------------------------------------------------------------------------------------
    def worker_stats(self) -> TierStats | None:
        worker = self.child.connector_worker.worker if self.child.connector_worker is not None else None
        if worker is None:
            return None
        samples = worker.take_samples()
        if not samples:
            return None
        st = TierStats()
        for s in samples:
            if s.is_load:
                st.sample("dram", s.seconds)
        return st if not st.is_empty() else None
