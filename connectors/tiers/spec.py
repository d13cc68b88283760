"""``LLMDTieringSpec``: vLLM's tiering offloading spec with a worker that runs on any platform.

vLLM 0.32's ``TieringOffloadingSpec`` (vllm/v1/kv_offload/tiering/spec.py) is everything the tiers
need except the worker: a DRAM primary tier in a shared-memory region that the scheduler process and
the workers both map (``SharedOffloadRegion``, /dev/shm), vLLM's ``CPUPrimaryTierOffloadingManager``
with its LRU/ARC policies, ``TieringOffloadingManager`` cascading every DRAM store to the secondary
tiers and promoting their hits back, and the events of both. Its worker is CUDA/XPU only
(``CPUOffloadingSpec.get_worker`` raises on other platforms), so this subclass keeps all of it and
swaps the worker for :class:`~.host_copy.HostCopyWorker`. It also:

- refuses chunks of several engine blocks (``HostCopyWorker`` copies one block per chunk) and a
  DRAM capacity that holds no block, with errors naming the config key;
- builds the manager as vLLM does, with two differences: the primary tier always records its
  events and the manager is :class:`LLMDTieringManager`, which counts every tier change for the
  ``llmd:kv_tier_*`` metrics and forwards the events only when the engine publishes KV events;
- makes the manager lock-holding (every ``OffloadingManager`` call the connector makes takes
  ``manager.lock``), so the side channel's thread can pin DRAM-tier blocks for a peer between two
  scheduler calls without the engine stepping (connectors/peer_serve.py, docs/peer-loading.md);
- unlinks the shared-memory file once the scheduler has mapped it (the workers mapped it first,
  when they registered the KV cache), so an engine killed with SIGKILL leaves nothing in /dev/shm.
  vLLM's tiering spec unlinks it only at a clean shutdown.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections import Counter
from collections.abc import Iterable
from typing import Any

from vllm.v1.kv_offload.base import CanonicalKVCaches, Medium, OffloadingEvent, OffloadingManager, OffloadingWorker
from vllm.v1.kv_offload.config import OffloadingConfig
from vllm.v1.kv_offload.cpu.shared_offload_region import SharedOffloadRegion
from vllm.v1.kv_offload.tiering.base import JobResult
from vllm.v1.kv_offload.tiering.factory import SecondaryTierFactory
from vllm.v1.kv_offload.tiering.manager import (
    CPUPrimaryTierOffloadingManager,
    JobMetadata,
    TieringOffloadingManager,
)
from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec
from vllm_llmd.connectors.config import ConnectorConfigError
from vllm_llmd.connectors.tiers.host_copy import HostCopyWorker

logger = logging.getLogger("vllm.vllm_llmd.tiers")

#: our tier names (metric labels) for vLLM's media
TIER_OF_MEDIUM = {Medium.CPU: "dram", Medium.STORAGE: "disk"}
#: the ``OffloadingManager`` calls vLLM's offloading scheduler makes (vllm/distributed/kv_transfer/
#: kv_connector/v1/offloading/scheduler.py and offloading_connector.py), each run under the lock
LOCKED_CALLS = (
    "lookup",
    "get_load_source",
    "prepare_load",
    "touch",
    "complete_load",
    "prepare_store",
    "complete_store",
    "on_new_request",
    "on_request_finished",
    "on_schedule_end",
    "has_pending_work",
    "reset_cache",
    "get_stats",
    "shutdown",
)


def _locked(lock: threading.RLock, fn: Any, materialise: bool = False) -> Any:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with lock:
            out = fn(*args, **kwargs)
            return list(out) if materialise else out

    return call


class LLMDTieringManager(TieringOffloadingManager):
    """vLLM's tiering manager, counting what every tier stores, evicts and promotes."""

    def __init__(self, primary_tier: CPUPrimaryTierOffloadingManager, secondary_tiers: list[Any], publish: bool):
        super().__init__(primary_tier=primary_tier, secondary_tiers=secondary_tiers)
        self._publish = publish
        #: (tier, "stored" | "evicted") -> blocks, and ("disk", "promoted"); drained by the connector
        self.changes: Counter[tuple[str, str]] = Counter()
        #: held by every manager call and by a peer's pin or release (connectors/peer_serve.py)
        self.lock = threading.RLock()
        for name in LOCKED_CALLS:
            setattr(self, name, _locked(self.lock, getattr(self, name)))
        # a generator: iterated inside the lock
        self.take_events = _locked(self.lock, self.take_events, materialise=True)  # type: ignore[method-assign]

    def take_events(self) -> Iterable[OffloadingEvent]:
        for event in super().take_events():
            tier = TIER_OF_MEDIUM.get(event.medium, event.medium.value.lower())
            self.changes[tier, "evicted" if event.removed else "stored"] += len(event.keys)
            if self._publish:
                yield event

    def _complete_promotion(self, job_metadata: JobMetadata, completed_job: JobResult) -> None:
        tier = self.secondary_tiers[job_metadata.tier_idx]
        keys = job_metadata.transfer_job.keys
        n = len(keys) if completed_job.success else len(completed_job.successful_keys or ())
        self.changes[TIER_OF_MEDIUM.get(tier.medium, tier.tier_type), "promoted"] += n
        super()._complete_promotion(job_metadata, completed_job)

    def resident_dram_blocks(self) -> int:
        """Ready blocks in the DRAM tier (the fields ``CPUOffloadingManager.get_stats`` reads, in
        vllm/v1/kv_offload/cpu/manager.py: allocated - free - still being written)."""
        p = self.primary_tier
        return max(0, p._num_allocated_chunks - len(p._free_list) - p._num_write_pending_chunks)


class LLMDTieringSpec(TieringOffloadingSpec):
    def __init__(self, config: OffloadingConfig) -> None:
        super().__init__(config)
        if self.blocks_per_chunk != 1:
            raise ConnectorConfigError("LLMDConnector: tiers store one engine block per DRAM-tier chunk")
        if self.num_chunks <= 0:
            raise ConnectorConfigError(
                "LLMDConnector: kv_connector_extra_config.tiers.dram.capacity = "
                f"{self.extra_config.get('cpu_bytes_to_use')} bytes holds no KV block "
                f"(one block takes {self.kv_bytes_per_chunk} bytes)"
            )

    # ---- scheduler side ---------------------------------------------------------------------
    def get_manager(self) -> OffloadingManager:
        if self._manager is not None:
            return self._manager
        region = SharedOffloadRegion(
            engine_id=self._engine_id,
            num_chunks=self.num_chunks,
            rank=None,
            kv_bytes_per_chunk=self.kv_bytes_per_chunk,
            cpu_page_size=self.cpu_page_size_per_worker,
        )
        primary: CPUPrimaryTierOffloadingManager | None = None
        secondary: list[Any] = []
        try:
            if region._creator:
                logger.warning("LLMD tiers: the scheduler mapped the DRAM tier before the workers did")
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(region.mmap_path)
            primary = CPUPrimaryTierOffloadingManager(
                num_chunks=self.num_chunks,
                cache_policy=self.eviction_policy,
                cache_policy_module_path=self.cache_policy_module_path,
                enable_events=True,  # counted by LLMDTieringManager even when not published
                mmap_region=region,
            )
            view = primary.get_kv_memoryview()
            for tier_config in self.secondary_tier_configs:
                secondary.append(SecondaryTierFactory.create_secondary_tier(tier_config, view, self))
            self._manager = LLMDTieringManager(primary, secondary, publish=self.kv_events_config.enable_kv_cache_events)
        except Exception:
            for tier in reversed(secondary):
                with contextlib.suppress(Exception):
                    tier.shutdown()
            if primary is not None:
                with contextlib.suppress(Exception):
                    primary.shutdown()
            else:
                region.cleanup()
            raise
        logger.info(
            "LLMD tiers: DRAM tier of %d blocks (%s) + %d secondary tier(s)",
            self.num_chunks,
            self.eviction_policy,
            len(secondary),
        )
        return self._manager

    # ---- worker side --------------------------------------------------------------------------
    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        if self._worker is None:
            self._worker = self.create_worker(kv_caches)  # type: ignore[assignment]
        return self._worker  # type: ignore[return-value]

    def create_worker(self, kv_caches: CanonicalKVCaches) -> HostCopyWorker:  # type: ignore[override]
        if self.config.canonical_layout:
            raise ConnectorConfigError("LLMDConnector: tiers do not support canonical_layout")
        region = SharedOffloadRegion(
            engine_id=self._engine_id,
            num_chunks=self.num_chunks,
            rank=0 if self.replicated_layout else self.config.parallel.rank,
            kv_bytes_per_chunk=self.kv_bytes_per_chunk,
            cpu_page_size=self.cpu_page_size_per_worker,
        )
        try:
            views = [region.create_next_worker_view(t.page_size_bytes) for t in kv_caches.tensors]
            return HostCopyWorker(kv_caches, views, region)
        except Exception:
            region.cleanup()
            raise
