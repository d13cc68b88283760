"""The disk tier's store threshold (vLLM's ``store_threshold``, connectors/tiers/store_threshold.py):
the counting rule alone, the disk tier on a real filesystem, and the disk tier under vLLM's real
``TieringOffloadingManager`` with a real shared-memory DRAM tier (no engine), where a block still in
DRAM reaches the disk on its second offer through vLLM's request-level cascade."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_tiers_disk import FILE, ROW, Harness
from tiers_helpers import PlainSpec, key, offloading_config
from vllm.v1.kv_offload.base import LookupResult, OffloadPolicy, ReqContext, ScheduleEndContext
from vllm.v1.kv_offload.cpu.shared_offload_region import SharedOffloadRegion
from vllm.v1.kv_offload.tiering.manager import CPUPrimaryTierOffloadingManager, TieringOffloadingManager
from vllm_llmd.connectors.tiers.disk import ChecksummedDiskTier
from vllm_llmd.connectors.tiers.store_threshold import StoreThreshold

from vllm_llmd.testing.wait import wait_until


# ---- the rule ---------------------------------------------------------------------------------------
def test_threshold_1_counts_nothing_and_admits_every_block():
    t = StoreThreshold(1, 10)
    t.offer([key(1)])
    assert not t.active and t.counts is None and t.admits(key(1)) and t.admits(key(2))


def test_threshold_n_admits_a_block_from_its_nth_offer():
    t = StoreThreshold(3, 10)
    for n in (1, 2, 3, 4):
        t.offer([key(1), key(2)] if n < 3 else [key(1)])
        assert t.admits(key(1)) is (n >= 3)
    assert not t.admits(key(2))  # offered twice only
    assert not t.admits(key(9))  # never offered


def test_the_counts_are_bounded_least_recently_offered_forgotten_first():
    t = StoreThreshold(2, 3)
    for i in range(50):
        t.offer([key(i)])
        assert t.counts is not None and len(t.counts) <= 3
    assert list(t.counts) == [key(47), key(48), key(49)]
    t.offer([key(0)])  # forgotten: this is its first counted offer again
    assert not t.admits(key(0))
    t.offer([key(48)])  # remembered (key 47 goes to make room for key 0 above)
    assert t.admits(key(48))


def test_an_offer_never_forgets_its_own_blocks():
    t = StoreThreshold(2, 2)
    offer = [key(1), key(2), key(3)]  # larger than the table: the third stays uncounted
    t.offer(offer)
    assert t.counts == {key(1): 1, key(2): 1}
    t.offer(offer)
    assert t.admits(key(1)) and t.admits(key(2)) and not t.admits(key(3))


@pytest.mark.parametrize(("threshold", "tracker"), [(0, 10), (-1, 10), (2, 0)])
def test_bad_values_are_refused(threshold: int, tracker: int):
    with pytest.raises(ValueError, match="must be at least 1"):
        StoreThreshold(threshold, tracker)


# ---- the disk tier ----------------------------------------------------------------------------------
@pytest.fixture
def disk2(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path / "kv", capacity_blocks=4, store_threshold=2)
    yield h
    h.close()


def test_threshold_1_is_the_write_through_tier_of_before(tmp_path: Path):
    h = Harness(tmp_path / "kv", capacity_blocks=4, store_threshold=1)
    try:
        assert h.tier.on_new_request(h.ctx).policy is OffloadPolicy.CHUNK_LEVEL  # vLLM's default policy
        h.fill(0, 0)
        assert h.run([key(1)], [0], promotion=False).transfer_bytes == FILE
        assert h.tier.lookup(key(1), h.ctx) is LookupResult.HIT and len(h.files()) == 1
        assert h.tier.take_counters().skipped == 0
    finally:
        h.close()


def test_threshold_2_writes_a_block_on_its_second_offer_only(disk2: Harness):
    assert disk2.tier.on_new_request(disk2.ctx).policy is OffloadPolicy.REQUEST_LEVEL
    for c in (0, 1):
        disk2.fill(c, c)
    r = disk2.run([key(1), key(2)], [0, 1], promotion=False)
    assert r.success and r.transfer_bytes == 0  # offered once each: nothing written
    assert disk2.files() == [] and disk2.tier.lookup(key(1), disk2.ctx) is LookupResult.MISS
    assert not [e for e in disk2.tier.take_events() if not e.removed]  # nothing announced on disk
    assert disk2.tier.take_counters().skipped == 2
    r = disk2.run([key(1)], [0], promotion=False)  # key 1 again
    assert r.success and r.transfer_bytes == FILE
    assert disk2.tier.lookup(key(1), disk2.ctx) is LookupResult.HIT
    assert disk2.tier.lookup(key(2), disk2.ctx) is LookupResult.MISS
    c = disk2.tier.take_counters()
    assert (c.stored, c.skipped) == (1, 0)
    before = disk2.dram[0].copy()
    assert disk2.run([key(1)], [7], promotion=True).success  # what was written is the block
    assert np.array_equal(disk2.dram[7], before)


def test_a_block_dropped_from_disk_is_written_again_on_its_next_offer(tmp_path: Path):
    h = Harness(tmp_path / "kv", capacity_blocks=1, store_threshold=2)
    try:
        h.fill(0, 0)
        h.fill(1, 1)
        for _ in range(2):
            h.run([key(1)], [0], promotion=False)
        for _ in range(2):
            h.run([key(2)], [1], promotion=False)  # evicts key 1 (capacity 1)
        assert h.tier.lookup(key(1), h.ctx) is LookupResult.MISS
        h.run([key(1)], [0], promotion=False)  # its third offer: written at once
        assert h.tier.lookup(key(1), h.ctx) is LookupResult.HIT
    finally:
        h.close()


def test_the_disk_tiers_count_memory_is_bounded(tmp_path: Path):
    h = Harness(tmp_path / "kv", capacity_blocks=4, store_threshold=2, max_tracker_size=8)
    try:
        for i in range(40):
            h.run([key(i)], [i % 16], promotion=False)
        assert h.tier.threshold.counts is not None and len(h.tier.threshold.counts) == 8
        h.run([key(0)], [0], promotion=False)  # forgotten long ago: a first offer again
        assert h.tier.lookup(key(0), h.ctx) is LookupResult.MISS
        h.run([key(39)], [0], promotion=False)
        assert h.tier.lookup(key(39), h.ctx) is LookupResult.HIT
    finally:
        h.close()


# ---- under vLLM's tiering manager ---------------------------------------------------------------------
class Tiered:
    """vLLM's TieringOffloadingManager over a real shared-memory DRAM tier of 8 chunks and our disk tier,
    driven as vLLM's offloading scheduler drives it (prepare_store, the GPU copy, complete_store)."""

    def __init__(self, root: Path, threshold: int) -> None:
        self.region = SharedOffloadRegion(f"llmd-unit-{uuid.uuid4().hex[:8]}", 8, None, ROW, ROW)
        self.primary = CPUPrimaryTierOffloadingManager(num_chunks=8, mmap_region=self.region)
        view = self.primary.get_kv_memoryview()
        spec = PlainSpec(offloading_config(ROW))
        self.disk = ChecksummedDiskTier(
            spec, view, "ChecksummedDiskTier", str(root), 8 * FILE, store_threshold=threshold
        )
        self.m = TieringOffloadingManager(self.primary, [self.disk])
        self.n = 0

    def request(self, keys: list[bytes]) -> None:
        """One request offering ``keys`` for storing, to the end of its stores."""
        self.n += 1
        ctx = ReqContext(req_id=f"r{self.n}")
        self.m.on_new_request(ctx)
        out = self.m.prepare_store(keys, ctx)
        assert out is not None
        if out.keys_to_store:
            self.m.complete_store(out.keys_to_store, ctx)  # the GPU -> DRAM copy "done"
        self.m.on_request_finished(ctx)
        self.step()

    def step(self) -> None:
        self.m.on_schedule_end(ScheduleEndContext((), ()))

    def on_disk(self, k: bytes) -> bool:
        return self.disk.lookup(k, ReqContext(req_id="probe")) is LookupResult.HIT

    def settle(self) -> None:
        def idle() -> bool:
            self.step()
            return not self.m.has_pending_work()

        wait_until(idle, 10, "the tiers' jobs to finish", interval=0.01)

    def close(self) -> None:
        self.m.shutdown()


@pytest.fixture
def tiered(tmp_path: Path) -> Iterator[Tiered]:
    t = Tiered(tmp_path / "kv", threshold=2)
    yield t
    t.close()


def test_a_block_reused_while_in_dram_reaches_disk_through_vllms_request_level_cascade(tiered: Tiered):
    tiered.request([key(1), key(2)])
    tiered.settle()
    assert tiered.primary.lookup(key(1), ReqContext(req_id="x")) is LookupResult.HIT  # in DRAM
    assert not tiered.on_disk(key(1)) and not tiered.on_disk(key(2))
    tiered.request([key(1)])  # a second request using block 1, still in DRAM (not stored again there)
    tiered.settle()
    assert tiered.on_disk(key(1)) and not tiered.on_disk(key(2))
    c = tiered.disk.take_counters()
    assert (c.stored, c.skipped) == (1, 2)


def test_under_vllms_manager_threshold_1_writes_every_block_once(tmp_path: Path):
    t = Tiered(tmp_path / "kv", threshold=1)
    try:
        t.request([key(1), key(2)])
        t.request([key(1)])  # already in DRAM: not offered to the disk again (vLLM's chunk-level cascade)
        t.settle()
        assert t.on_disk(key(1)) and t.on_disk(key(2))
        c = t.disk.take_counters()
        assert (c.stored, c.skipped) == (2, 0)
    finally:
        t.close()
