"""Real vLLM offloading objects for the tier unit tests (no engine): an ``OffloadingConfig`` as vLLM's
``build_offloading_config`` would produce for the tiny test model, and a concrete spec around it."""

from __future__ import annotations

from typing import Any

from vllm.v1.kv_offload.base import OffloadingSpec, make_offload_key
from vllm.v1.kv_offload.config import (
    OffloadingCacheConfig,
    OffloadingConfig,
    OffloadingGroupConfig,
    OffloadingModelConfig,
    OffloadingParallelConfig,
)


def offloading_config(block_bytes: int = 4096, extra: dict[str, Any] | None = None) -> OffloadingConfig:
    return OffloadingConfig(
        groups=(OffloadingGroupConfig(tokens_per_block=32, layer_names=("l0", "l1"), group_id=0),),
        worker_kv_bytes_per_block=block_bytes,
        enable_kv_cache_events=True,
        extra_config=extra or {},
        engine_id="unit-test-engine",
        model=OffloadingModelConfig(name="unit/test-model", dtype="bfloat16"),
        cache=OffloadingCacheConfig(tokens_per_hash=32, blocks_per_chunk=1),
        parallel=OffloadingParallelConfig(
            rank=0,
            world_size=1,
            tp_size=1,
            pp_size=1,
            pcp_size=1,
            dcp_size=1,
            data_parallel_index=0,
            data_parallel_size=1,
            data_parallel_rank_local=None,
            is_parallelism_agnostic=True,
        ),
        kv_cache_layout="LBHNC",
    )


class PlainSpec(OffloadingSpec):
    """vLLM's OffloadingSpec base with its two factory methods unused (the disk tier reads only the config)."""

    def get_manager(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def get_worker(self, kv_caches):  # type: ignore[no-untyped-def]
        raise NotImplementedError


def key(i: int) -> bytes:
    return make_offload_key(i.to_bytes(32, "big"), 0)
