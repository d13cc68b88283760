"""The connector's worker half in seconds, without engines: two workers (a prefill and a decode
engine's) in this process, real KV tensors, the real ZMQ handshake side channel, and an in-process
fake transport (tests/unit/fake_transport.py) that really copies the blocks. Covers the lease state
machine, pull deadlines, early release and the abort paths; then the scheduler's side of leases."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from connector_parts import BLOCK, finish, remote_params, request, scheduler, vllm_config
from fake_transport import Fabric, FakeTransport
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import KVConnectorOutput
from vllm_llmd.connectors import worker as worker_mod
from vllm_llmd.connectors.config import LLMDConnectorConfig
from vllm_llmd.connectors.metadata import LLMDConnectorMetadata, RecvJob
from vllm_llmd.connectors.worker import LLMDConnectorWorker

from vllm_llmd.testing.wait import wait_until
from vllm_llmd.wire import RemotePrefill

NUM_BLOCKS = 16
LAYERS = ("layer.0", "layer.1")


def kv_cache_config() -> KVCacheConfig:
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=8, dtype=torch.float32)
    return KVCacheConfig(
        num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(list(LAYERS), spec)]
    )


@dataclass
class Engine:
    worker: LLMDConnectorWorker
    kv: dict[str, torch.Tensor]

    @property
    def port(self) -> int:
        md = self.worker.handshake_metadata()
        assert md is not None
        return md.port

    def results(self) -> Any:
        return self.worker.transfer_results()

    def step(self, send: dict[str, float] | None = None, recv: list[RecvJob] | None = None) -> Any:
        self.worker.start_load_kv(LLMDConnectorMetadata(recv=recv or [], send=send or {}))
        return self.results()

    def stats(self) -> dict[str, Any]:
        s = self.worker.get_stats()
        return {} if s is None else s.data


@pytest.fixture
def fabric(monkeypatch: pytest.MonkeyPatch) -> Fabric:
    fab = Fabric()
    monkeypatch.setattr(worker_mod, "make_transport", lambda name, memory, **kw: FakeTransport(fab, memory))
    return fab


def make_engine(role: str, engine_id: str, **extra: Any) -> Engine:
    cfg = LLMDConnectorConfig.from_extra({"transfer_timeout_seconds": 5, "lease_seconds": 30, **extra}, 0)
    w = LLMDConnectorWorker(vllm_config(role, engine_id=engine_id), cfg, kv_cache_config())
    # [num_blocks, kv heads, block, head*2] per layer: the CPU backend's LBHNC layout
    kv = {name: torch.zeros(NUM_BLOCKS, 2, BLOCK, 16) for name in LAYERS}
    w.register_kv_caches(kv)
    return Engine(w, kv)


@pytest.fixture
def pair(fabric: Fabric) -> Iterator[tuple[Engine, Engine]]:
    p, d = make_engine("kv_producer", "engine-p"), make_engine("kv_consumer", "engine-d")
    for i, t in enumerate(p.kv.values()):
        for b in range(NUM_BLOCKS):
            t[b] = 1000 * i + b  # each (layer, block) recognisable
    yield p, d
    p.worker.shutdown()
    d.worker.shutdown()


def job(p: Engine, rid: str, local: list[int], remote: list[int], **changes: Any) -> RecvJob:
    params = remote_params(
        remote_engine_id="engine-p",
        remote_request_id=f"p-{rid}",
        remote_port=p.port,
        remote_block_ids=[remote],
        remote_num_tokens=len(remote) * BLOCK,
        **changes,
    )
    return RecvJob(rid, RemotePrefill(**params), [local] if local else [], [remote] if local else [])


def test_a_pull_copies_the_blocks_and_releases_the_lease(pair: tuple[Engine, Engine]) -> None:
    p, d = pair
    assert p.step(send={"p-r1": 30}).finished_sending == set()
    out = d.step(recv=[job(p, "r1", [3, 4, 5], [7, 8, 9])])
    assert out.finished_recving == {"r1"} and not out.failed_recving
    for name in LAYERS:
        assert torch.equal(d.kv[name][3:6], p.kv[name][7:10])  # the bytes moved
    assert torch.count_nonzero(d.kv[LAYERS[1]][0]) == 0  # and nothing else
    assert p.results().finished_sending == {"p-r1"}  # the consumer's notice released the lease
    assert p.stats()["leases_released"] == 1
    st = d.stats()
    assert st["transfers_ok"] == 1 and st["blocks_read"] == 6 and st["handshakes_ok"] == 1
    assert st["bytes_read"] == 6 * d.worker.transport.regions[0].block_len


def test_a_pull_past_its_deadline_fails_and_is_cancelled(fabric: Fabric) -> None:
    p = make_engine("kv_producer", "engine-p")
    d = make_engine("kv_consumer", "engine-d", transfer_timeout_seconds=0.2)
    try:
        fabric.hold = True  # the network never completes the read
        p.step(send={"p-r1": 30})
        assert d.step(recv=[job(p, "r1", [1], [2])]).finished_recving == set()
        t0 = time.monotonic()
        out = wait_until(lambda: (r := d.results()).failed_recving and r, 5, "the pull given up")
        assert out.failed_recving == {"r1"} and out.finished_recving == {"r1"}  # vLLM then recomputes
        assert time.monotonic() - t0 > 0.1  # not before its deadline (an upper bound is wait_until's 5 s)
        assert fabric.cancelled == 1 and d.stats()["transfers_failed"] == 1
        assert "engine-p" not in d.worker._links  # a peer that let a pull hang is handshaken again
        assert p.results().finished_sending == set()  # no notice: the lease is still held
    finally:
        p.worker.shutdown()
        d.worker.shutdown()


def test_the_prefill_lease_end_caps_a_pulls_deadline(pair: tuple[Engine, Engine], fabric: Fabric) -> None:
    p, d = pair
    fabric.hold = True
    d.step(recv=[job(p, "r1", [1], [2], lease_expires_at=time.time() + 0.15)])
    out = wait_until(lambda: (r := d.results()).failed_recving and r, 3, "the pull stopped at the lease end")
    assert out.failed_recving == {"r1"}


def test_a_failed_read_falls_back_and_the_next_pull_handshakes_again(
    pair: tuple[Engine, Engine], fabric: Fabric
) -> None:
    p, d = pair
    fabric.hold = True
    d.step(recv=[job(p, "r1", [1], [2])])
    fabric.fail()
    assert d.results().failed_recving == {"r1"}
    fabric.hold = False
    assert d.step(recv=[job(p, "r2", [1], [2])]).finished_recving == {"r2"}
    assert d.stats()["handshakes_ok"] == 2


def test_a_notice_before_the_lease_releases_it_at_once(pair: tuple[Engine, Engine]) -> None:
    """The consumer can finish reading before the prefill worker hears of the lease (the scheduler
    tells it one step later): the early notice is kept and the lease ends the step it starts."""
    p, d = pair
    d.step(recv=[job(p, "r1", [1, 2], [3, 4])])
    assert p.results().finished_sending == set()  # notice arrived, no lease yet
    assert p.step(send={"p-r1": 30}).finished_sending == {"p-r1"}
    assert p.results().finished_sending == set()  # reported once
    assert p.stats()["leases_released"] == 1


def test_a_lease_nobody_claims_expires(fabric: Fabric) -> None:
    p = make_engine("kv_producer", "engine-p")
    try:
        assert p.step(send={"p-r1": 0.2}).finished_sending == set()
        t0 = time.monotonic()
        wait_until(lambda: "p-r1" in p.results().finished_sending, 5, "the lease expired")
        assert time.monotonic() - t0 > 0.1 and p.stats()["leases_expired"] == 1
    finally:
        p.worker.shutdown()


def test_an_aborted_decode_request_only_releases_the_lease(pair: tuple[Engine, Engine], fabric: Fabric) -> None:
    p, d = pair
    p.step(send={"p-r1": 30})
    out = d.step(recv=[job(p, "r1", [], [])])  # aborted before it was scheduled: no blocks
    assert out.finished_recving == set() and out.failed_recving == set()
    assert fabric.xfers == []  # nothing read
    assert p.results().finished_sending == {"p-r1"}


def test_a_refused_job_fails_at_once_and_still_releases_the_lease(pair: tuple[Engine, Engine]) -> None:
    p, d = pair
    p.step(send={"p-r1": 30})
    refused = job(p, "r1", [1], [2])
    refused.refused = "the prefill engine offers too few blocks"
    out = d.step(recv=[refused])
    assert out.failed_recving == {"r1"} and d.stats()["transfers_failed"] == 1
    assert p.results().finished_sending == {"p-r1"}


@pytest.mark.parametrize(
    "bad",
    [
        {"remote_port": 1},  # nobody answers the handshake there
        {"remote_engine_id": "engine-x"},  # someone else answers
    ],
    ids=["dead-port", "wrong-engine"],
)
def test_a_failed_handshake_falls_back(pair: tuple[Engine, Engine], bad: dict[str, Any]) -> None:
    p, d = pair
    d.worker.cfg = LLMDConnectorConfig.from_extra({"handshake_timeout_seconds": 0.3}, 0)
    j = job(p, "r1", [1], [2])
    j.remote = RemotePrefill(**{**remote_params(remote_port=p.port, remote_engine_id="engine-p"), **bad})
    assert d.step(recv=[j]).failed_recving == {"r1"}
    assert d.stats()["handshakes_failed"] == 1


def test_block_ids_beyond_the_peers_memory_fail_the_pull(pair: tuple[Engine, Engine], fabric: Fabric) -> None:
    p, d = pair
    assert d.step(recv=[job(p, "r1", [1, 2], [3, NUM_BLOCKS + 5])]).failed_recving == {"r1"}
    assert d.step(recv=[job(p, "r2", [1, 2], [3])]).failed_recving == {"r2"}  # counts differ
    assert fabric.xfers == []


# ---- the scheduler's side of a lease ------------------------------------------------------------
def test_the_scheduler_holds_announces_and_releases_leased_blocks() -> None:
    s = scheduler(role="kv_producer", events_medium="CPU")
    req = request({"do_remote_decode": True}, tokens=4 * BLOCK)
    req.block_hashes = [b"h%d" % i for i in range(4)]  # what vLLM's block hasher fills in
    delay, params = s.request_finished(finish(req, 4 * BLOCK), ([3, 4, 5, 6],))
    assert delay and params and params["remote_block_ids"] == [[3, 4, 5, 6]]
    assert s.held_requests == 1
    meta = s.build_connector_meta()
    assert meta.send == {"r1": 30.0} and s.build_connector_meta().send == {}  # told to the worker once
    [stored] = s.take_events()
    assert stored.medium == "CPU" and len(stored.block_hashes) == 4
    s.update_connector_output(KVConnectorOutput(finished_sending={"r1"}))
    [removed] = s.take_events()
    assert removed.block_hashes == stored.block_hashes and s.held_requests == 0
    st = s.get_stats().data
    assert st["leases_started"] == 1 and st["blocks_leased"] == 4 and st["held_blocks"] == 0


def test_an_aborted_decode_request_asks_the_worker_to_release() -> None:
    s = scheduler(role="kv_consumer")
    req = request(remote_params())
    s.admit(req)
    from vllm.v1.request import RequestStatus

    req.status = RequestStatus.FINISHED_ABORTED
    assert s.request_finished(req, ([],)) == (False, None)
    [j] = s.build_connector_meta().recv
    assert j.local_block_ids == [] and j.remote is not None and j.refused is None


def test_an_expired_lease_is_not_pulled() -> None:
    s = scheduler(role="kv_consumer")
    req = request(remote_params(lease_expires_at=time.time() + 0.1))  # within the safety margin
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    assert req.kv_transfer_params["do_remote_prefill"] is False
    assert s.get_stats().data["transfers_failed"] == 1
