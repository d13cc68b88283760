"""Block copies between the engine's KV cache and the DRAM tier, with plain tensor ops.

vLLM's ``CPUOffloadingWorker`` (vllm/v1/kv_offload/cpu/gpu_worker.py) copies with CUDA/XPU streams,
events and the ``swap_blocks_batch`` kernel, so it refuses to start on other platforms
(``CPUOffloadingSpec.get_worker``: "CPU Offloading is currently only supported on CUDA-alike and
XPU GPUs"). :class:`HostCopyWorker` implements the same :class:`OffloadingWorker` contract with
row copies: on host memory through numpy views (``dst[row] = src[row]``, a memcpy), otherwise with
``Tensor.copy_`` (any torch device, e.g. an RBLN staging path). It supports one engine block per
DRAM-tier chunk (``blocks_per_chunk == 1``, what ``LLMDTieringSpec`` configures) and the direct
layout (each worker's pages side by side in a chunk row, as ``create_next_worker_view`` lays them out).

Copies are synchronous: ``submit_store``/``submit_load`` return once the bytes are in place and the
job is reported finished at the next ``get_finished``. That keeps the framework's ordering promises
trivially (a store reads blocks that the scheduler keeps unchanged until the job is reported; a
load is done before the request is scheduled again) and costs the copy time on the worker thread:
measured on this machine, 0.1-0.4 ms per 16 blocks of the tiny test model (bench/bench_tiers.py
``--copy-only`` reports the bandwidth against a plain memcpy of the same bytes).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from vllm.v1.kv_offload.base import (
    BlockIDsLoadStoreSpec,
    CanonicalKVCacheRef,
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    OffloadingWorker,
    TransferResult,
)
from vllm.v1.kv_offload.cpu.shared_offload_region import SharedOffloadRegion


@dataclass(slots=True)
class CopySample:
    """One finished job, for the tier metrics (load-back time histogram)."""

    is_load: bool
    nbytes: int
    seconds: float


def _runs(src: np.ndarray, dst: np.ndarray) -> list[tuple[int, int, int]]:
    """``(src_start, dst_start, length)`` runs where both index lists advance by one together."""
    out: list[tuple[int, int, int]] = []
    n = len(src)
    i = 0
    while i < n:
        j = i + 1
        while j < n and src[j] == src[j - 1] + 1 and dst[j] == dst[j - 1] + 1:
            j += 1
        out.append((int(src[i]), int(dst[i]), j - i))
        i = j
    return out


class _Side:
    """One tensor of the engine cache and its DRAM-tier view (rows of int8 pages)."""

    __slots__ = ("cpu", "cpu_np", "engine", "engine_np")

    def __init__(self, engine: torch.Tensor, cpu: torch.Tensor) -> None:
        self.engine = engine
        self.cpu = cpu
        host = engine.device.type == "cpu"
        self.engine_np = engine.numpy() if host else None
        self.cpu_np = cpu.numpy()


class HostCopyWorker(OffloadingWorker):
    """Engine KV cache <-> DRAM tier (a shared-memory region) for one worker."""

    def __init__(
        self, kv_caches: CanonicalKVCaches, cpu_views: Sequence[torch.Tensor], region: SharedOffloadRegion | None = None
    ) -> None:
        """``cpu_views[t]``: the DRAM-tier view for ``kv_caches.tensors[t]``, shape
        ``(num_chunks, page_size_bytes)``, int8 (from ``SharedOffloadRegion.create_next_worker_view``);
        ``region``: the shared-memory region behind them, released at :meth:`shutdown`."""
        self._region = region
        if len(cpu_views) != len(kv_caches.tensors):
            raise ValueError("one DRAM-tier view per KV cache tensor")
        self._sides: list[_Side] = []
        for ref, cpu in zip(kv_caches.tensors, cpu_views, strict=True):
            t = ref.tensor
            if t.dtype != torch.int8 or t.dim() != 2 or t.shape[1] < ref.page_size_bytes:
                raise ValueError(f"engine KV tensor must be int8 [blocks, page bytes], got {t.dtype} {tuple(t.shape)}")
            if cpu.dtype != torch.int8 or cpu.dim() != 2 or cpu.shape[1] < ref.page_size_bytes:
                raise ValueError("DRAM-tier view must be int8 [chunks, page bytes]")
            self._sides.append(_Side(t, cpu))
        self._refs: list[list[CanonicalKVCacheRef]] = kv_caches.group_data_refs
        self._finished: list[TransferResult] = []
        self._samples: list[CopySample] = []

    # ---- the OffloadingWorker contract -------------------------------------------------------
    def submit_store(self, job_id: int, src_spec: GPULoadStoreSpec, dst_spec: LoadStoreSpec) -> bool:
        return self._run(job_id, src_spec, dst_spec, to_cpu=True)

    def submit_load(self, job_id: int, src_spec: LoadStoreSpec, dst_spec: GPULoadStoreSpec) -> bool:
        return self._run(job_id, dst_spec, src_spec, to_cpu=False)

    def get_finished(self) -> list[TransferResult]:
        out, self._finished = self._finished, []
        return out

    def wait(self, job_ids: set[int]) -> None:
        return None  # every submitted job has already completed

    def shutdown(self) -> None:
        self._sides.clear()  # drop our views of the region before it is unmapped
        region, self._region = self._region, None
        if region is not None:
            if not os.path.exists(region.mmap_path):
                region._creator = False  # the scheduler already unlinked it (spec.py); nothing to remove
            region.cleanup()

    def take_samples(self) -> list[CopySample]:
        out, self._samples = self._samples, []
        return out

    # ---- copies -----------------------------------------------------------------------------
    def _run(self, job_id: int, engine_spec: LoadStoreSpec, cpu_spec: LoadStoreSpec, to_cpu: bool) -> bool:
        assert isinstance(engine_spec, GPULoadStoreSpec) and isinstance(cpu_spec, BlockIDsLoadStoreSpec)
        blocks, chunks = engine_spec.block_ids, cpu_spec.block_ids
        if len(blocks) != len(chunks) or sum(engine_spec.group_sizes) != len(blocks):
            raise ValueError(f"job {job_id}: {len(blocks)} engine blocks for {len(chunks)} DRAM-tier chunks")
        if len(engine_spec.group_sizes) != len(self._refs):
            raise ValueError(f"job {job_id}: {len(engine_spec.group_sizes)} groups, worker has {len(self._refs)}")
        t0 = time.perf_counter()
        nbytes = 0
        off = 0
        for g, size in enumerate(engine_spec.group_sizes):
            if size == 0:
                continue
            b, c = blocks[off : off + size], chunks[off : off + size]
            off += size
            runs = _runs(c, b) if to_cpu else _runs(b, c)  # destination first
            for ref in self._refs[g]:
                side = self._sides[ref.tensor_idx]
                nbytes += size * ref.page_size_bytes
                self._copy(side, runs, ref.page_size_bytes, to_cpu)
        seconds = time.perf_counter() - t0
        self._finished.append(TransferResult(job_id=job_id, success=True, transfer_size=nbytes, transfer_time=seconds))
        self._samples.append(CopySample(is_load=not to_cpu, nbytes=nbytes, seconds=seconds))
        return True

    @staticmethod
    def _copy(side: _Side, runs: list[tuple[int, int, int]], page: int, to_cpu: bool) -> None:
        # runs are (first, second, n) with first = cpu chunk when storing, engine block when loading
        if side.engine_np is not None:
            eng, cpu = side.engine_np, side.cpu_np
            for a, b, n in runs:
                if to_cpu:
                    cpu[a : a + n, :page] = eng[b : b + n, :page]
                else:
                    eng[a : a + n, :page] = cpu[b : b + n, :page]
            return
        for a, b, n in runs:  # a device tensor: let torch move the bytes
            if to_cpu:
                side.cpu[a : a + n, :page].copy_(side.engine[b : b + n, :page])
            else:
                side.engine[a : a + n, :page].copy_(side.cpu[b : b + n, :page])
