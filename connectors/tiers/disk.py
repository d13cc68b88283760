"""``ChecksummedDiskTier``: the disk tier, a secondary tier of vLLM's tiering framework.

Loaded by vLLM's ``SecondaryTierFactory`` from the ``secondary_tiers`` entry ``{"type":
"ChecksummedDiskTier", "module_path": "vllm_llmd.connectors.tiers.disk", ...}`` that
``TiersConfig.offloading_extra_config`` writes, and driven by ``TieringOffloadingManager``
(vllm/v1/kv_offload/tiering/manager.py): every block stored in the DRAM tier is cascaded here
(``submit_store``); a lookup that misses DRAM and hits here is promoted back into a DRAM slot
(``submit_load``) and from there loaded into the engine.

Why not vLLM's own ``fs`` tier (vllm/v1/kv_offload/tiering/fs/manager.py): its files carry no
checksum (a corrupt file of the right size is loaded as KV: wrong tokens), it has no capacity (it
never deletes), and it emits no removals. This tier keeps vLLM's file naming (``FileMapper``: one
directory per model / dtype / layout, so a file of another model is never looked up) and adds:

- the checksummed file format of :mod:`.diskio`; a block that fails any check is a miss (the
  engine recomputes it), its file is deleted and the failure counted;
- a byte capacity with LRU eviction of whole files (files being read are never evicted), each
  eviction a ``BlockRemoved(medium="STORAGE")`` KV event;
- one engine per directory: an exclusive ``flock`` on ``<path>/.llmd-disk-tier.lock`` held while the
  engine runs; block files of an earlier run are removed at start-up (the events that described
  them are gone, so the router could never index them);
- an in-memory index, so lookups answer at once (no asynchronous ``RETRY`` round);
- vLLM's ``store_threshold`` rule (:mod:`.store_threshold`): a block is written only once it has
  been offered ``store_threshold`` times (default 2), so a block never reused costs no disk write.

All methods run in the scheduler process and never block on I/O: reads and writes run on small
thread pools (one writer, so a deletion queued before a rewrite of the same file runs first).
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import shutil
import time
from collections import Counter, OrderedDict
from collections.abc import Collection, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from vllm.v1.kv_offload.base import (
    LookupResult,
    Medium,
    OffloadingEvent,
    OffloadKey,
    OffloadPolicy,
    ReqContext,
    RequestOffloadingContext,
    get_offload_block_hash,
    get_offload_group_idx,
)
from vllm.v1.kv_offload.file_mapper import FileMapper
from vllm.v1.kv_offload.tiering.base import JobResult, SecondaryTierManager, TransferJob
from vllm_llmd.connectors.config import ConnectorConfigError
from vllm_llmd.connectors.tiers.config import DiskTier
from vllm_llmd.connectors.tiers.diskio import BlockFileError, header_size, read_block, write_block
from vllm_llmd.connectors.tiers.store_threshold import StoreThreshold

if TYPE_CHECKING:
    from vllm.v1.kv_offload.base import OffloadingSpec
    from vllm.v1.kv_offload.tiering.backpressure import BackpressureDetector

logger = logging.getLogger("vllm.vllm_llmd.tiers")

LOCK_NAME = ".llmd-disk-tier.lock"
#: the defaults of the ``tiers.disk`` keys (config.py owns them)
_DEFAULT = {name: f.default for name, f in DiskTier.model_fields.items()}


@dataclass
class DiskTierCounters:
    """What the tier did since the last :meth:`ChecksummedDiskTier.take_counters` call."""

    stored: int = 0  # blocks written
    evicted: int = 0  # blocks deleted for room
    promoted: int = 0  # blocks read back into DRAM
    dropped: int = 0  # blocks not stored: no room (everything pinned), the writer behind, or the write failed
    skipped: int = 0  # offers not written: the block was offered fewer than store_threshold times
    errors: Counter[str] = field(default_factory=Counter)  # by kind: missing, corrupt, io, write
    read_seconds: list[float] = field(default_factory=list)  # one sample per promotion job


@dataclass
class _Job:
    keys: list[OffloadKey]
    is_load: bool
    future: Future[Any] | None = None


class ChecksummedDiskTier(SecondaryTierManager):
    medium: ClassVar[Medium] = Medium.STORAGE

    def __init__(
        self,
        offloading_spec: OffloadingSpec,
        primary_kv_view: memoryview,
        tier_type: str,
        root_dir: str,
        capacity_bytes: int,
        read_threads: int = _DEFAULT["read_threads"],
        write_queue_blocks: int = _DEFAULT["write_queue_blocks"],
        store_threshold: int = _DEFAULT["store_threshold"],
        max_tracker_size: int = _DEFAULT["max_tracker_size"],
        backpressure_detector: BackpressureDetector | None = None,
    ) -> None:
        super().__init__(offloading_spec, primary_kv_view, tier_type, backpressure_detector)
        # one flat byte view; chunk c is bytes [c * row, (c + 1) * row) (SharedOffloadRegion.create_kv_memoryview)
        flat_ok = primary_kv_view.ndim == 1 and primary_kv_view.format == "B"
        self._flat = primary_kv_view if flat_ok else primary_kv_view.cast("B")
        mapper = FileMapper.from_offloading_spec(
            root_dir=root_dir, offloading_spec=offloading_spec, blocks_per_file=1, parallel_agnostic=True
        )
        self._mapper = mapper
        self._dir = f"{mapper.base_path}_r{mapper.rank}"
        self._lock_fd = self._lock(root_dir)
        shutil.rmtree(self._dir, ignore_errors=True)  # an earlier run's files (see the module docstring)
        self._made_dirs: set[str] = set()
        self.file_bytes = header_size(len(self._key_example())) + self.block_size_bytes
        self.capacity_blocks = int(capacity_bytes) // self.file_bytes
        if self.capacity_blocks <= 0:
            raise ConnectorConfigError(
                f"LLMDConnector: kv_connector_extra_config.tiers.disk.capacity = {capacity_bytes} bytes holds no "
                f"KV block (one block file is {self.file_bytes} bytes)"
            )
        self._index: OrderedDict[OffloadKey, None] = OrderedDict()  # ready files, least recently used first
        self._pinned: Counter[OffloadKey] = Counter()  # files being read
        self._writing: set[OffloadKey] = set()  # queued or being written: at most write_queue_blocks
        self.write_queue_blocks = int(write_queue_blocks)
        self.threshold = StoreThreshold(int(store_threshold), int(max_tracker_size))
        # with a threshold, every request offers the disk each block it uses, also those DRAM holds
        # (store_threshold.py); without, only blocks newly stored in DRAM (vLLM's default policy)
        self._policy = OffloadPolicy.REQUEST_LEVEL if self.threshold.active else OffloadPolicy.CHUNK_LEVEL
        self._jobs: dict[int, _Job] = {}
        self._done: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        self._events: list[OffloadingEvent] = []
        self._counters = DiskTierCounters()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="llmd-disk-w")
        self._readers = ThreadPoolExecutor(read_threads, thread_name_prefix="llmd-disk-r")
        logger.info(
            "LLMD disk tier at %s: %d blocks of %d bytes (%.1f MiB), store_threshold %d",
            self._dir,
            self.capacity_blocks,
            self.file_bytes,
            self.capacity_blocks * self.file_bytes / 2**20,
            self.threshold.store_threshold,
        )

    # ---- start-up -------------------------------------------------------------------------
    @staticmethod
    def _lock(root_dir: str) -> int:
        os.makedirs(root_dir, exist_ok=True)
        fd = os.open(os.path.join(root_dir, LOCK_NAME), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConnectorConfigError(
                f"LLMDConnector: kv_connector_extra_config.tiers.disk.path {root_dir!r} is in use by another "
                "engine; give each engine its own directory"
            ) from None
        return fd

    def _key_example(self) -> bytes:
        from vllm.v1.kv_offload.base import make_offload_key

        return make_offload_key(b"\0" * 32, 0)

    def _path(self, key: OffloadKey) -> str:
        """``<base>_r<rank>/<hh>_g<group>/<hash>.bin``: vLLM's ``FileMapper`` base path and file name,
        with one directory level of at most 256 entries per KV group instead of its two (``<hhh>/<hh>_g<n>``,
        about a million directories, so nearly every new block made a directory or two)."""
        hash_hex = get_offload_block_hash(key).hex()
        return f"{self._dir}/{hash_hex[:2]}_g{get_offload_group_idx(key)}/{hash_hex}.bin"

    def _chunk(self, chunk: int) -> memoryview:
        row = self.block_size_bytes
        return self._flat[chunk * row : (chunk + 1) * row]

    # ---- lookups ----------------------------------------------------------------------------
    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        return LookupResult.HIT if key in self._index else LookupResult.MISS

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        for key in keys:
            if key in self._index:
                self._index.move_to_end(key)

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext(policy=self._policy)

    # ---- stores (DRAM -> disk) ----------------------------------------------------------------
    def submit_store(self, job_metadata: TransferJob) -> None:
        self.threshold.offer(job_metadata.keys)
        todo: list[tuple[OffloadKey, int]] = []
        for key, chunk in zip(job_metadata.keys, job_metadata.chunk_ids, strict=True):
            if key in self._index or key in self._writing:
                continue
            if not self.threshold.admits(key):
                self._counters.skipped += 1
                continue
            todo.append((key, int(chunk)))
        # the writer's backlog is bounded: a queued block pins its DRAM chunk until it is written, so a
        # disk slower than the stores would otherwise fill DRAM with pinned chunks (dropped instead)
        room = min(len(todo), max(0, self.write_queue_blocks - len(self._writing)))
        free = self.capacity_blocks - len(self._index) - len(self._writing)
        if room > free:
            free += self._evict(room - free)
        room = min(room, max(free, 0))
        self._counters.dropped += len(todo) - room
        todo = todo[:room]
        self._writing.update(k for k, _ in todo)
        job = _Job([k for k, _ in todo], is_load=False)
        self._jobs[job_metadata.job_id] = job
        if not todo:  # nothing to write: done at once, without a trip through the writer thread
            self._done.put((job_metadata.job_id, ([], 0.0)))
            return
        paths = [self._path(k) for k, _ in todo]
        job.future = self._writer.submit(self._write_files, job_metadata.job_id, todo, paths)

    def _evict(self, n: int) -> int:
        """Delete up to ``n`` least recently used files that nobody reads; returns how many."""
        victims = []
        for key in self._index:
            if len(victims) == n:
                break
            if not self._pinned[key]:
                victims.append(key)
        for key in victims:
            self._remove(key)
        self._counters.evicted += len(victims)
        return len(victims)

    def _remove(self, key: OffloadKey) -> None:
        del self._index[key]
        self._events.append(OffloadingEvent(keys=[key], medium=self.medium, removed=True))
        self._writer.submit(_unlink, self._path(key))

    def _write_files(self, job_id: int, todo: list[tuple[OffloadKey, int]], paths: list[str]) -> None:
        t0 = time.perf_counter()
        ok: list[bool] = []
        for (key, chunk), path in zip(todo, paths, strict=True):
            try:
                parent = os.path.dirname(path)
                if parent not in self._made_dirs:  # only the (single) writer thread touches this set
                    os.makedirs(parent, exist_ok=True)
                    self._made_dirs.add(parent)
                write_block(path, key, self._chunk(chunk))
                ok.append(True)
            except OSError as exc:
                logger.warning("LLMD disk tier: cannot write %s: %s", path, exc)
                ok.append(False)
        self._done.put((job_id, (ok, time.perf_counter() - t0)))

    # ---- promotions (disk -> DRAM) ------------------------------------------------------------
    def submit_load(self, job_metadata: TransferJob) -> None:
        keys = list(job_metadata.keys)
        chunks = [int(c) for c in job_metadata.chunk_ids]
        for key in keys:
            self._pinned[key] += 1
            if key in self._index:
                self._index.move_to_end(key)
        job = _Job(keys, is_load=True)
        self._jobs[job_metadata.job_id] = job
        # a key evicted since its lookup has no file to read: it fails like a missing file
        paths = [self._path(k) if k in self._index else None for k in keys]
        job.future = self._readers.submit(self._read_files, job_metadata.job_id, keys, chunks, paths)

    def _read_files(self, job_id: int, keys: list[OffloadKey], chunks: list[int], paths: list[str | None]) -> None:
        t0 = time.perf_counter()
        failed: dict[OffloadKey, str] = {}
        for key, chunk, path in zip(keys, chunks, paths, strict=True):
            if path is None:
                failed[key] = "missing"
                continue
            try:
                read_block(path, key, self._chunk(chunk))
            except BlockFileError as exc:
                logger.warning("LLMD disk tier: %s; the block will be recomputed", exc)
                failed[key] = exc.kind
        self._done.put((job_id, (failed, time.perf_counter() - t0)))

    # ---- completions --------------------------------------------------------------------------
    def get_finished_jobs(self) -> Iterable[JobResult]:
        results: list[JobResult] = []
        while True:
            try:
                job_id, payload = self._done.get_nowait()
            except queue.Empty:
                return results
            job = self._jobs.pop(job_id)
            finish = self._finish_load if job.is_load else self._finish_store
            results.append(finish(job_id, job, *payload))

    def _finish_store(self, job_id: int, job: _Job, ok: list[bool], seconds: float) -> JobResult:
        stored = []
        for key, good in zip(job.keys, ok, strict=True):
            self._writing.discard(key)
            if good:
                self._index[key] = None
                stored.append(key)
            else:
                self._counters.errors["write"] += 1
                self._counters.dropped += 1
        self._counters.stored += len(stored)
        if stored:
            # removal_expected: this tier announces removals, so vLLM's event tracker keeps the blocks'
            # token payload while they are here (distributed/.../offloading/events.py)
            self._events.append(OffloadingEvent(keys=stored, medium=self.medium, removed=False, removal_expected=True))
        return JobResult(
            job_id=job_id,
            success=all(ok),
            transfer_time=seconds,
            transfer_bytes=len(stored) * self.file_bytes,
        )

    def _finish_load(self, job_id: int, job: _Job, failed: dict[OffloadKey, str], seconds: float) -> JobResult:
        for key in job.keys:
            self._pinned[key] -= 1
            if not self._pinned[key]:
                del self._pinned[key]
        for key, kind in failed.items():
            self._counters.errors[kind] += 1
            if key in self._index and not self._pinned[key]:
                self._remove(key)
        good = [k for k in job.keys if k not in failed]
        self._counters.promoted += len(good)
        self._counters.read_seconds.append(seconds)
        return JobResult(
            job_id=job_id,
            success=not failed,
            successful_keys=tuple(good) if failed else None,
            transfer_time=seconds,
            transfer_bytes=len(good) * self.block_size_bytes,
        )

    def has_pending_work(self) -> bool:
        return bool(self._jobs)

    def drain_jobs(self) -> None:
        wait([j.future for j in self._jobs.values() if j.future is not None])

    # ---- events, metrics, shutdown --------------------------------------------------------------
    def take_events(self) -> Iterable[OffloadingEvent]:
        events, self._events = self._events, []
        return events

    def take_counters(self) -> DiskTierCounters:
        out, self._counters = self._counters, DiskTierCounters()
        return out

    @property
    def resident_blocks(self) -> int:
        return len(self._index)

    def shutdown(self) -> None:
        self._readers.shutdown(wait=True, cancel_futures=True)
        self._writer.shutdown(wait=True, cancel_futures=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("LLMD disk tier: cannot delete %s: %s", path, exc)
