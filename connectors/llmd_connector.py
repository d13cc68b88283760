"""``LLMDConnector``: the single connector name vllm-llmd registers for every platform.

Prefill/decode disaggregation by *pull*: the prefill engine (``kv_producer`` or ``kv_both``, request
carrying ``kv_transfer_params.do_remote_decode``) computes the prompt, holds its blocks under a
lease and returns ``kv_transfer_params``; the decode engine (request carrying those params with
``do_remote_prefill``) pulls the blocks through a transport (picked per platform: NIXL with DRAM
on CPU and VRAM on GPU; on Rebellions NPUs host staging or nixl_rbln, connectors/platform.py),
then decodes. Engines whose block sizes or KV byte orders differ (a GPU and an NPU) hand off through
a re-layout on receive, agreed in the handshake (connectors/negotiate.py). A failed or timed-out
pull is reported as a failed receive and vLLM prefills locally
(``kv_load_failure_policy="recompute"``, set by this connector unless configured otherwise): the
request still completes. Requests without ``kv_transfer_params`` run as on a
plain engine.

Shape follows ``KVConnectorBase_V1`` (vllm/distributed/kv_transfer/kv_connector/v1/base.py) as it
is in vLLM 0.30-0.33: three-argument constructor with ``kv_cache_config``; ``SupportsHMA`` so vLLM
keeps the hybrid KV cache manager on. What differs between those releases is bridged in
:mod:`vllm_llmd.vllm_compat`. See docs/pd-disaggregation.md for the config keys and the protocol.

With a ``tiers`` block in ``kv_connector_extra_config`` the connector also carries DRAM and disk KV
tiers (vLLM's OffloadingConnector with our spec, connectors/tiers/, docs/tiers.md). Every call that
concerns them goes through ``self.tiers`` (``None`` without tiers); those lines are marked ``tiers``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)
from vllm_llmd.connectors.config import LLMDConnectorConfig
from vllm_llmd.connectors.metadata import LLMDConnectorMetadata

from vllm_llmd.vllm_compat import cache_hit_source

if TYPE_CHECKING:
    from collections.abc import Iterable

    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
    from vllm.v1.outputs import KVConnectorOutput

logger = logging.getLogger("vllm.vllm_llmd.connectors")

__all__ = ["LLMDConnector", "LLMDConnectorMetadata"]


class LLMDConnector(KVConnectorBase_V1, SupportsHMA):
    # external prefix-cache hits are KV pulled from a peer engine (read by vLLM 0.32+ only)
    _cache_hit_source = cache_hit_source("P2P")

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        ktc = vllm_config.kv_transfer_config
        assert ktc is not None
        self.cfg = LLMDConnectorConfig.from_extra(ktc.kv_connector_extra_config, default_port=0)
        self.scheduler = None
        self.worker = None
        self.tiers = None  # tiers: a TierStack when the config has a tiers block
        if role == KVConnectorRole.SCHEDULER:
            from vllm_llmd.connectors.scheduler import LLMDConnectorScheduler

            # The scheduler reads the policy right after building us (vllm/v1/core/sched/scheduler.py).
            if ktc.kv_load_failure_policy != self.cfg.load_failure_policy:
                object.__setattr__(ktc, "kv_load_failure_policy", self.cfg.load_failure_policy)
            groups = len(getattr(kv_cache_config, "kv_cache_groups", None) or ()) or 1
            self.scheduler = LLMDConnectorScheduler(vllm_config, self.cfg, num_groups=groups)
        else:
            from vllm_llmd.connectors.worker import LLMDConnectorWorker

            self.worker = LLMDConnectorWorker(vllm_config, self.cfg, kv_cache_config)
        if self.cfg.tiers is not None:  # tiers
            from vllm_llmd.connectors.tiers.stack import TierStack

            self.tiers = TierStack(vllm_config, role, kv_cache_config, self.cfg.tiers)

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: Any) -> bool:
        # asked by vLLM 0.33+ (vllm/config/vllm.py refuses sleep mode on False): the transport
        # registered the KV cache at fixed addresses and does not re-register after a remap
        return False

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: VllmConfig) -> str | None:
        # one contiguous slab per (layer, block), as vLLM's NIXL connector asks for; MLA: any
        if vllm_config.model_config is None or vllm_config.model_config.use_mla:
            return None
        return "LBHNC"

    # ---- worker side -------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        assert self.worker is not None
        tier_worker = None
        if self.tiers is not None:  # tiers: first, so the worker can offer the DRAM tier to peers
            self.tiers.child.register_kv_caches(kv_caches)
            tier_worker = self.tiers.tier_worker()
        self.worker.register_kv_caches(kv_caches, tier_worker=tier_worker)

    # tiers: the worker half of the tiers reads its own part of the step's metadata
    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self.tiers is not None:
            self.tiers.child.bind_connector_metadata(connector_metadata.tiers)  # type: ignore[attr-defined]

    def clear_connector_metadata(self) -> None:
        super().clear_connector_metadata()
        if self.tiers is not None:
            self.tiers.child.clear_connector_metadata()

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if self.tiers is not None:
            self.tiers.child.handle_preemptions(kv_connector_metadata.tiers)  # type: ignore[attr-defined]

    def build_connector_worker_meta(self) -> Any:
        return None if self.tiers is None else self.tiers.child.build_connector_worker_meta()

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        return None if self.worker is None else self.worker.handshake_metadata()

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        assert self.worker is not None
        meta = self._get_connector_metadata()
        if self.tiers is not None:  # tiers
            meta = meta.pd  # type: ignore[attr-defined]
            self.tiers.child.start_load_kv(forward_context, **kwargs)
        assert isinstance(meta, LLMDConnectorMetadata)
        self.worker.start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata() if self.has_connector_metadata() else None
        if self.tiers is not None and meta is not None:  # tiers: the P/D half of the step's metadata
            meta = meta.pd  # type: ignore[attr-defined]
        # host-staging transports copy the blocks of prompts finished this step to host memory here,
        # before vLLM finishes those requests and their kv_transfer_params leave the engine
        if self.worker is not None and isinstance(meta, LLMDConnectorMetadata) and meta.stage:
            self.worker.stage_out(meta.stage)
        if self.tiers is not None:  # tiers: stores of this step's blocks
            self.tiers.child.wait_for_save()

    def set_host_xfer_buffer_ops(self, copy_operation: Any) -> None:
        # the model runner's host <-> device block copy (vllm-rbln's runner passes its own)
        if self.worker is not None:
            self.worker.set_copy_op(copy_operation)

    def finalize_kv_cache_registration(self) -> None:
        """vllm-rbln's runner calls this after warm-up (its ``SupportsKVCacheRegistrationFinalize``
        protocol): the RBLN d2d path registers device memory only then."""
        if self.worker is not None:
            self.worker.finalize_registration()

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        assert self.worker is not None
        results = self.worker.transfer_results()
        if self.tiers is not None:  # tiers: loads from the DRAM tier finish like pulls
            _, loaded = self.tiers.child.get_finished(finished_req_ids)
            results.finished_recving |= loaded
        return results

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        r = self.get_transfer_results(finished_req_ids)
        return r.finished_sending or None, r.finished_recving or None

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
        if self.tiers is not None:  # tiers
            self.tiers.shutdown()

    # ---- scheduler side ----------------------------------------------------------------------
    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        if self.scheduler is None:
            return
        md = metadata.get(0)
        if md is not None:
            self.scheduler.set_side_channel(md.host, md.port)  # type: ignore[attr-defined]
            logger.info("LLMDConnector: engine %s serves KV at %s:%s", self.scheduler.engine_id, md.host, md.port)  # type: ignore[attr-defined]

    def on_new_request(self, request: Any) -> None:
        # vLLM's scheduler reads request.kv_transfer_params right after this: check them first
        if self.scheduler is not None:
            self.scheduler.on_new_request(request)
        if self.tiers is not None:  # tiers: after the check, so the tiers see the admitted params
            self.tiers.child.on_new_request(request)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self.scheduler is not None
        pd = self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)
        if self.tiers is not None:  # tiers: a P/D pull wins, otherwise the tiers may hold the prefix
            return self.tiers.match(request, num_computed_tokens, pd)
        return pd

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        assert self.scheduler is not None
        if self.tiers is not None and self.tiers.claim(request.request_id) == "tier":  # tiers
            self.scheduler.update_state_after_alloc(request, blocks, 0)
        else:
            self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)
        if self.tiers is not None:
            self.tiers.after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        assert self.scheduler is not None
        meta = self.scheduler.build_connector_meta(scheduler_output)
        if self.tiers is not None:  # tiers
            return self.tiers.build_meta(meta, scheduler_output)
        return meta

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        assert self.scheduler is not None
        self.scheduler.update_connector_output(connector_output)
        if self.tiers is not None:  # tiers
            self.tiers.update_connector_output(connector_output)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished_all_groups(request, (block_ids,))

    def request_finished_all_groups(
        self, request: Any, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        assert self.scheduler is not None
        if self.tiers is not None:  # tiers: its stores of the request's blocks are built next step
            self.tiers.child.request_finished_all_groups(request, block_ids)
            self.tiers.forget(request.request_id)
        return self.scheduler.request_finished(request, block_ids)

    def take_events(self) -> Iterable[KVCacheEvent]:
        if self.scheduler is None:
            return []
        events = self.scheduler.take_events()
        if self.tiers is not None:  # tiers
            events.extend(self.tiers.take_events())
        return events

    # ---- tiers: the rest of the scheduler-side calls the tiers need ----------------------------
    def bind_kv_cache_manager(self, kv_cache_manager: Any) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        if self.tiers is not None:
            self.tiers.child.bind_kv_cache_manager(kv_cache_manager)

    def get_external_cache_hit_sources(self, request: Any, num_external_tokens: int) -> dict[CacheHitSource, int]:
        if self.tiers is not None:
            return self.tiers.hit_sources(request, num_external_tokens)
        return super().get_external_cache_hit_sources(request, num_external_tokens)

    def has_pending_push_work(self) -> bool:
        return self.tiers is not None and self.tiers.child.has_pending_push_work()

    def reset_cache(self) -> bool | None:
        return None if self.tiers is None else self.tiers.reset_cache()

    # ---- stats (both sides) ------------------------------------------------------------------
    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self.tiers is not None and self.scheduler is not None:  # tiers: what this holder served peers
            self.scheduler.count_served(self.tiers.peer_served())
        side = self.scheduler or self.worker
        pd = None if side is None else side.get_stats()
        if self.tiers is None:
            return pd
        # tiers: {"pd": ..., "tiers": ...} (connectors/tiers/stats.py)
        tier = self.tiers.scheduler_stats() if self.scheduler is not None else self.tiers.worker_stats()
        if pd is None and tier is None:
            return None
        from vllm_llmd.connectors.tiers.stats import CombinedStats

        out = CombinedStats()
        if pd is not None:
            out.pd = pd
        if tier is not None:
            out.tiers = tier
        out.to_dict()
        return out

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        if data is not None and ("pd" in data or "tiers" in data):  # tiers: the combined shape
            from vllm_llmd.connectors.tiers.stats import CombinedStats

            return CombinedStats(data)
        from vllm_llmd.connectors.stats import LLMDConnectorStats

        return LLMDConnectorStats(data=dict(data)) if data is not None else LLMDConnectorStats()

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics | None:
        from vllm_llmd.connectors.tiers.stats import CombinedPromMetrics

        # P/D series as before, plus the tier and tenant series (fed only when tiers are on)
        return CombinedPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
