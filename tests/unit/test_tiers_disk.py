"""The disk tier on a real filesystem, driven as vLLM's TieringOffloadingManager drives it (no engine):
stores, promotions, LRU capacity, and every way a file can be bad (never served, always a miss)."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from tiers_helpers import PlainSpec, key, offloading_config
from vllm.v1.kv_offload.base import LookupResult, Medium, ReqContext
from vllm.v1.kv_offload.tiering.base import TransferJob
from vllm_llmd.connectors.config import ConnectorConfigError
from vllm_llmd.connectors.tiers.disk import ChecksummedDiskTier
from vllm_llmd.connectors.tiers.diskio import header_size

from vllm_llmd.testing.wait import wait_until

ROW = 4096  # bytes per DRAM-tier chunk
CHUNKS = 16
FILE = header_size(36) + ROW


class Harness:
    """A DRAM tier (numpy rows) and one disk tier over it, with job bookkeeping as the manager does."""

    def __init__(self, root: Path, capacity_blocks: int, store_threshold: int = 1, **tier: int) -> None:
        """``store_threshold`` 1 (every block written on its first offer) unless a test asks for more
        (tests/unit/test_tiers_threshold.py)."""
        self.dram = np.zeros((CHUNKS, ROW), dtype=np.int8)
        spec = PlainSpec(offloading_config(ROW))
        self.tier = ChecksummedDiskTier(
            spec,
            memoryview(self.dram),
            "ChecksummedDiskTier",
            str(root),
            capacity_blocks * FILE,
            store_threshold=store_threshold,
            **tier,
        )
        self.ctx = ReqContext(req_id="r")
        self.next_job = 0
        self.results: dict[int, object] = {}

    def fill(self, chunk: int, seed: int) -> None:
        self.dram[chunk] = np.random.default_rng(seed).integers(-128, 127, ROW, dtype=np.int8)

    def _job(self, keys: list[bytes], chunks: list[int], promotion: bool) -> int:
        jid = self.next_job
        self.next_job += 1
        job = TransferJob(jid, keys, np.array(chunks, dtype=np.int32), promotion, self.ctx)
        (self.tier.submit_load if promotion else self.tier.submit_store)(job)
        return jid

    def run(self, keys: list[bytes], chunks: list[int], promotion: bool):  # type: ignore[no-untyped-def]
        jid = self._job(keys, chunks, promotion)

        def done() -> bool:
            for r in self.tier.get_finished_jobs():
                self.results[r.job_id] = r
            return jid in self.results

        wait_until(done, 10, f"disk tier job {jid}")
        return self.results.pop(jid)

    def files(self) -> list[Path]:
        return sorted(p for p in Path(self.tier._dir).rglob("*.bin"))

    def close(self) -> None:
        self.tier.shutdown()


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path / "kv", capacity_blocks=4)
    yield h
    h.close()


def test_store_then_promote_round_trips_the_bytes(disk: Harness):
    disk.fill(0, 1)
    before = disk.dram[0].copy()
    r = disk.run([key(1)], [0], promotion=False)
    assert r.success and r.transfer_bytes == FILE
    assert disk.tier.lookup(key(1), disk.ctx) is LookupResult.HIT
    assert disk.tier.lookup(key(2), disk.ctx) is LookupResult.MISS
    stored = [e for e in disk.tier.take_events() if not e.removed]
    assert stored and stored[0].keys == [key(1)] and stored[0].medium is Medium.STORAGE and stored[0].removal_expected
    r = disk.run([key(1)], [5], promotion=True)
    assert r.success and r.successful_keys is None
    assert np.array_equal(disk.dram[5], before)
    c = disk.tier.take_counters()
    assert (c.stored, c.promoted, sum(c.errors.values())) == (1, 1, 0)
    assert len(c.read_seconds) == 1


def test_the_writer_backlog_is_bounded_stores_beyond_it_are_dropped(tmp_path: Path):
    h = Harness(tmp_path / "kv", capacity_blocks=8)
    h.tier.write_queue_blocks = 2  # blocks queued for the writer at most
    try:
        for c in range(3):
            h.fill(c, c)
        r = h.run([key(1), key(2), key(3)], [0, 1, 2], promotion=False)
        assert r.success and r.transfer_bytes == 2 * FILE
        assert len(h.files()) == 2 and h.tier.resident_blocks == 2
        assert h.tier.take_counters().dropped == 1
        assert h.tier.lookup(key(3), h.ctx) == LookupResult.MISS
        # the backlog drained: the next store is written
        assert h.run([key(3)], [2], promotion=False).transfer_bytes == FILE
    finally:
        h.close()


def test_capacity_evicts_least_recently_used_and_announces_it(disk: Harness):
    for i in range(4):
        disk.fill(i, i)
        disk.run([key(i)], [i], promotion=False)
    disk.tier.take_events()
    disk.run([key(0)], [8], promotion=True)  # key 0 is now the most recently used
    disk.fill(9, 9)
    disk.run([key(9)], [9], promotion=False)
    assert disk.tier.lookup(key(1), disk.ctx) is LookupResult.MISS  # the least recently used went
    assert all(disk.tier.lookup(key(i), disk.ctx) is LookupResult.HIT for i in (0, 2, 3, 9))
    removed = [e for e in disk.tier.take_events() if e.removed]
    assert [e.keys for e in removed] == [[key(1)]] and removed[0].medium is Medium.STORAGE
    wait_until(lambda: len(disk.files()) == 4, 5, "the evicted file deleted")
    assert disk.tier.resident_blocks == 4
    assert disk.tier.take_counters().evicted == 1


def test_files_being_read_are_not_evicted(tmp_path: Path):
    h = Harness(tmp_path / "kv", capacity_blocks=1)
    try:
        h.fill(0, 0)
        h.run([key(0)], [0], promotion=False)
        h._job([key(0)], [5], promotion=True)  # a promotion of key 0, not yet reported finished
        h.run([key(1)], [1], promotion=False)
        assert h.tier.lookup(key(0), h.ctx) is LookupResult.HIT
        assert h.tier.lookup(key(1), h.ctx) is LookupResult.MISS
        assert h.tier.take_counters().dropped == 1
    finally:
        h.close()


@pytest.mark.parametrize(
    "damage",
    ["flip_payload", "flip_header", "truncate", "append", "other_block", "delete"],
)
def test_a_bad_file_is_a_miss_never_served(disk: Harness, damage: str):
    for i in (1, 2):
        disk.fill(i, i)
        disk.run([key(i)], [i], promotion=False)
    victim = next(p for p in disk.files() if p.name == key(1)[:-4].hex() + ".bin")
    data = bytearray(victim.read_bytes())
    if damage == "flip_payload":
        data[-100] ^= 0x01
    elif damage == "flip_header":
        data[20] ^= 0x01  # payload length
    elif damage == "truncate":
        data = data[:-1]
    elif damage == "append":
        data += b"\0"
    elif damage == "other_block":  # a valid file of another block under this name
        other = next(p for p in disk.files() if p.name == key(2)[:-4].hex() + ".bin")
        data = bytearray(other.read_bytes())
    if damage == "delete":
        victim.unlink()
    else:
        victim.write_bytes(bytes(data))
    disk.dram[10] = 7
    disk.dram[11] = 7
    good = disk.dram[2].copy()
    r = disk.run([key(1), key(2)], [10, 11], promotion=True)
    assert not r.success
    assert list(r.successful_keys) == [key(2)]  # only the good block is kept
    assert np.array_equal(disk.dram[11], good)
    assert disk.tier.lookup(key(1), disk.ctx) is LookupResult.MISS  # dropped: never tried again
    removed = [e.keys for e in disk.tier.take_events() if e.removed]
    assert [key(1)] in removed
    errors = disk.tier.take_counters().errors
    assert errors == {"missing" if damage == "delete" else "corrupt": 1}


def test_a_second_engine_cannot_share_the_directory(disk: Harness):
    with pytest.raises(ConnectorConfigError, match=r"tiers\.disk\.path .* in use by another engine"):
        Harness(Path(disk.tier._mapper.base_path).parent, capacity_blocks=4)


def test_files_of_an_earlier_run_are_removed_at_start(tmp_path: Path):
    h = Harness(tmp_path / "kv", capacity_blocks=4)
    h.fill(0, 0)
    h.run([key(0)], [0], promotion=False)
    assert len(h.files()) == 1
    h.close()
    h2 = Harness(tmp_path / "kv", capacity_blocks=4)
    try:
        assert h2.files() == [] and h2.tier.lookup(key(0), h2.ctx) is LookupResult.MISS
    finally:
        h2.close()


def test_capacity_below_one_block_is_a_start_up_error(tmp_path: Path):
    with pytest.raises(ConnectorConfigError, match=r"tiers\.disk\.capacity = \d+ bytes holds no KV block"):
        ChecksummedDiskTier(
            PlainSpec(offloading_config(ROW)), memoryview(np.zeros((2, ROW), np.int8)), "t", str(tmp_path), FILE - 1
        )


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB tmpfs (a full disk after a few blocks)."""
    mnt = tmp_path / f"full-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_drops_stores_and_serves_what_it_holds(tiny_fs: Path):
    h = Harness(tiny_fs, capacity_blocks=12)  # more than the 64 KiB filesystem holds
    try:
        stored = 0
        for i in range(12):
            h.fill(i, i)
            r = h.run([key(i)], [i], promotion=False)
            stored += r.success
        assert 0 < stored < 12
        c = h.tier.take_counters()
        assert c.errors["write"] == 12 - stored and c.stored == stored
        assert h.tier.resident_blocks == stored
        assert len(h.files()) == stored  # failed writes leave nothing
        first = h.dram[0].copy()
        h.dram[15] = 0
        assert h.run([key(0)], [15], promotion=True).success
        assert np.array_equal(h.dram[15], first)
    finally:
        h.close()


def test_block_files_are_private_to_the_engine(disk: Harness):
    disk.fill(0, 0)
    disk.run([key(0)], [0], promotion=False)
    assert all(os.stat(p).st_mode & 0o077 == 0 for p in disk.files())
