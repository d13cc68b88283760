"""Peer loads, holder side (connectors/peer_serve.py, the side channel's pin/release in handshake.py):
vLLM's real DRAM-tier manager over a real shared-memory region, real ZMQ. Pinned blocks survive
eviction pressure until released or expired; the pin runs without any scheduler call; the side
channel checks the engine id, bounds the request and refuses what it does not hold."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace

import msgspec
import pytest
import zmq
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from vllm.v1.kv_offload.base import LookupResult, ReqContext, make_offload_key
from vllm.v1.kv_offload.cpu.shared_offload_region import SharedOffloadRegion
from vllm.v1.kv_offload.tiering.manager import CPUPrimaryTierOffloadingManager
from vllm_llmd.connectors.handshake import (
    MAX_PIN_HASHES,
    PROTOCOL_VERSION,
    EngineInfo,
    HandshakeError,
    HandshakeServer,
    fetch_engine_info,
    pin_blocks,
    release_blocks,
)
from vllm_llmd.connectors.peer_serve import PeerHoldings, PinRefused, PinServer
from vllm_llmd.connectors.read_windows import ReadWindows
from vllm_llmd.connectors.tiers.spec import LLMDTieringManager
from vllm_llmd.connectors.transports.base import Region

CHUNKS = 8
ROW = 4096
READER = "reader-0b1c"


def _hash(i: int) -> bytes:
    return i.to_bytes(32, "big")


@pytest.fixture
def manager() -> Iterator[LLMDTieringManager]:
    region = SharedOffloadRegion(
        engine_id=f"peer-unit-{uuid.uuid4().hex}",
        num_chunks=CHUNKS,
        rank=None,
        kv_bytes_per_chunk=ROW,
        cpu_page_size=ROW,
    )
    primary = CPUPrimaryTierOffloadingManager(num_chunks=CHUNKS, mmap_region=region)
    m = LLMDTieringManager(primary, [], publish=False)
    yield m
    m.shutdown()


def _store(m: LLMDTieringManager, ids: range) -> None:
    ctx = ReqContext(req_id=f"store-{ids.start}")
    keys = [make_offload_key(_hash(i), 0) for i in ids]
    out = m.primary_tier.prepare_store(keys, ctx)  # as the tiering manager's store does
    assert out is not None
    m.primary_tier.complete_store(keys, ctx)


def _in_tier(m: LLMDTieringManager, i: int) -> bool:
    return m.primary_tier.lookup(make_offload_key(_hash(i), 0), ReqContext(req_id="q")) == LookupResult.HIT


def test_pinned_blocks_survive_eviction_until_released(manager: LLMDTieringManager) -> None:
    _store(manager, range(0, 4))
    h = PeerHoldings(manager)
    lease, chunks = h.pin([_hash(i) for i in range(0, 6)], 5.0)  # only the leading 4 are held
    assert len(chunks) == 4 and len(set(chunks)) == 4
    _store(manager, range(10, 14))  # fills the other 4 chunks
    _store(manager, range(20, 24))  # needs room: only unpinned blocks may go
    assert all(_in_tier(manager, i) for i in range(0, 4))
    assert h.release(lease) and not h.release(lease)
    _store(manager, range(30, 34))
    assert not all(_in_tier(manager, i) for i in range(0, 4))  # evictable again
    assert h.take_counts() == {"unknown|granted": 1, "unknown|blocks": 4, "unknown|released": 1}


def test_a_lease_not_released_expires(manager: LLMDTieringManager) -> None:
    _store(manager, range(0, 2))
    h = PeerHoldings(manager)
    h.pin([_hash(0), _hash(1)], 1.0)
    assert h.expire(now=0.0) == 0 and h.held == 1
    import time

    assert h.expire(now=time.monotonic() + 2.0) == 2 and h.held == 0
    assert h.take_counts()["unknown|expired"] == 1


def test_nothing_held_or_too_much_asked_is_refused(manager: LLMDTieringManager) -> None:
    h = PeerHoldings(manager)
    with pytest.raises(PinRefused, match="none of the blocks"):
        h.pin([_hash(99)], 1.0)
    with pytest.raises(PinRefused):
        h.pin([], 1.0)
    assert h.take_counts() == {"unknown|refused": 2}


def _info(engine_id: str, tier: bool = True) -> EngineInfo:
    return EngineInfo(
        protocol=PROTOCOL_VERSION,
        engine_id=engine_id,
        tp_rank=0,
        model="m",
        kv_dtype="auto/bf16",
        block_size=32,
        num_layers=2,
        layout="LBHNC",
        block_len=ROW,
        transport="nixl",
        memory="DRAM",
        agent_metadata=b"",
        regions=[Region(0x1000, 4, ROW)],
        tier_region=Region(0x100000, CHUNKS, ROW) if tier else None,
        tier_pages=[0] if tier else [],
    )


@pytest.fixture
def holder(manager: LLMDTieringManager) -> Iterator[tuple[HandshakeServer, PeerHoldings]]:
    engine_id = f"holder-{uuid.uuid4().hex[:8]}"
    h = PeerHoldings(manager)
    pins = PinServer(engine_id, h)  # the scheduler process's half
    server = HandshakeServer(_info(engine_id), "127.0.0.1", 0)  # the worker's side channel forwards to it
    yield server, h
    server.close()
    pins.close()


def _port(server: HandshakeServer) -> int:
    return int(server.endpoint.rsplit(":", 1)[1])


def test_the_side_channel_pins_and_releases_through_the_scheduler_process_half(
    holder: tuple[HandshakeServer, PeerHoldings], manager: LLMDTieringManager
) -> None:
    server, h = holder
    _store(manager, range(0, 3))
    leases = pin_blocks("127.0.0.1", _port(server), 0, server.info.engine_id, [_hash(i) for i in range(3)], 5.0, 2.0)
    assert len(leases) == 1 and len(leases[0][1]) == 3 and h.held == 1
    release_blocks("127.0.0.1", _port(server), 0, [leases[0][0]], 2.0)
    assert h.held == 0


def test_the_side_channel_refuses_another_engine_id_and_unheld_blocks(
    holder: tuple[HandshakeServer, PeerHoldings], manager: LLMDTieringManager
) -> None:
    server, h = holder
    _store(manager, range(0, 1))
    with pytest.raises(HandshakeError, match="refused the pin: this is engine"):
        pin_blocks("127.0.0.1", _port(server), 0, "someone-else", [_hash(0)], 5.0, 2.0)
    with pytest.raises(HandshakeError, match="none of the blocks"):
        pin_blocks("127.0.0.1", _port(server), 0, server.info.engine_id, [_hash(7)], 5.0, 2.0)
    assert h.held == 0


def test_the_holder_counts_what_it_served_per_reader_on_its_metrics(
    holder: tuple[HandshakeServer, PeerHoldings], manager: LLMDTieringManager
) -> None:
    """Pins through the real side channel, counted per reader, then the connector's stats path to
    /metrics: the scheduler's stats (LLMDConnectorScheduler.count_served), aggregated with a worker's
    as vLLM does, observed by the Prometheus half the API server runs."""
    from connector_parts import scheduler
    from test_tiers_units import _registry_classes
    from vllm_llmd.connectors.stats import LLMDConnectorStats
    from vllm_llmd.connectors.tiers.stats import CombinedPromMetrics, CombinedStats

    server, h = holder
    h.block_bytes = ROW
    _store(manager, range(0, 3))
    port, engine = _port(server), server.info.engine_id
    leases = pin_blocks("127.0.0.1", port, 0, engine, [_hash(i) for i in range(3)], 5.0, 2.0, reader=READER)
    release_blocks("127.0.0.1", port, 0, [leases[0][0]], 2.0)
    with pytest.raises(HandshakeError):
        pin_blocks("127.0.0.1", port, 0, engine, [_hash(7)], 5.0, 2.0, reader=READER)
    pin_blocks("127.0.0.1", port, 0, engine, [_hash(0)], 5.0, 2.0, reader="x|y")  # a bad name: "other"
    import time

    assert h.expire(now=time.monotonic() + 10.0) == 1  # never released: it expires
    counts = h.take_counts()
    assert counts == {
        f"{READER}|granted": 1,
        f"{READER}|blocks": 3,
        f"{READER}|bytes": 3 * ROW,
        f"{READER}|released": 1,
        f"{READER}|refused": 1,
        "other|granted": 1,
        "other|blocks": 1,
        "other|bytes": ROW,
        "other|expired": 1,
    }
    assert h.take_counts() == {}
    sched = scheduler()
    sched.count_served(counts)
    st = CombinedStats()
    st.pd = sched.get_stats()  # type: ignore[assignment]
    worker = LLMDConnectorStats()
    worker.add("peer|holder-x|ok")  # a reader's own count in the same engine's stats
    st.aggregate(CombinedStats({"pd": worker.data}))
    rebuilt = CombinedStats(st.to_dict())  # what the API-server process rebuilds
    reg = CollectorRegistry()
    c, g, hist = _registry_classes(reg)
    types = {Counter: c, Gauge: g, Histogram: hist}
    cfg = SimpleNamespace(kv_transfer_config=None)
    prom = CombinedPromMetrics(cfg, types, ["model_name", "engine"], {0: ["m", "0"]})
    prom.observe(rebuilt.to_dict(), 0)
    v, lbl = reg.get_sample_value, {"model_name": "m", "engine": "0"}
    assert v("llmd:kv_peer_pins_total", {**lbl, "reader": READER, "event": "granted"}) == 1
    assert v("llmd:kv_peer_pins_total", {**lbl, "reader": READER, "event": "refused"}) == 1
    assert v("llmd:kv_peer_pins_total", {**lbl, "reader": READER, "event": "released"}) == 1
    assert v("llmd:kv_peer_pins_total", {**lbl, "reader": "other", "event": "expired"}) == 1
    assert v("llmd:kv_peer_served_blocks_total", {**lbl, "reader": READER}) == 3
    assert v("llmd:kv_peer_served_bytes_total", {**lbl, "reader": READER}) == 3 * ROW
    assert v("llmd:kv_peer_loads_total", {**lbl, "peer": "holder-x", "result": "ok"}) == 1


def test_reader_labels_are_bounded(manager: LLMDTieringManager) -> None:
    from vllm_llmd.connectors.peer_serve import MAX_READER_LABELS

    h = PeerHoldings(manager)
    names = [h.reader_label(f"r{i}") for i in range(MAX_READER_LABELS + 5)]
    assert names[:MAX_READER_LABELS] == [f"r{i}" for i in range(MAX_READER_LABELS)]
    assert set(names[MAX_READER_LABELS:]) == {"other"}
    assert h.reader_label("r0") == "r0" and h.reader_label("") == "unknown" and h.reader_label("a b") == "other"


def test_a_long_prefix_is_pinned_in_several_messages_and_stops_at_the_first_short_one(
    holder: tuple[HandshakeServer, PeerHoldings], manager: LLMDTieringManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vllm_llmd.connectors.handshake as hs

    monkeypatch.setattr(hs, "MAX_PIN_HASHES", 2)
    server, h = holder
    _store(manager, range(0, 5))
    leases = pin_blocks("127.0.0.1", _port(server), 0, server.info.engine_id, [_hash(i) for i in range(8)], 5.0, 2.0)
    assert [len(c) for _, c in leases] == [2, 2, 1] and h.held == 3


def test_a_side_channel_without_a_pin_server_refuses(manager: LLMDTieringManager) -> None:
    server = HandshakeServer(_info(f"lonely-{uuid.uuid4().hex[:8]}"), "127.0.0.1", 0)
    try:
        with pytest.raises(HandshakeError, match="serves no DRAM tier"):
            pin_blocks("127.0.0.1", _port(server), 0, server.info.engine_id, [_hash(0)], 5.0, 2.0)
    finally:
        server.close()


def test_an_oversized_pin_request_is_refused_by_its_type() -> None:
    ctx = zmq.Context.instance()
    server = HandshakeServer(_info("x", tier=False), "127.0.0.1", 0)
    try:
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.RCVTIMEO, 2000)
        sock.connect(server.endpoint)
        many = [b"\x01" * 8] * (MAX_PIN_HASHES + 1)
        sock.send(
            msgspec.msgpack.encode(
                {
                    "type": "pin",
                    "protocol": PROTOCOL_VERSION,
                    "tp_rank": 0,
                    "engine_id": "x",
                    "hashes": many,
                    "lease_seconds": 1.0,
                }
            )
        )
        reply = msgspec.msgpack.decode(sock.recv())
        sock.close(linger=0)
        assert reply["type"] == "error" and "malformed" in reply["reason"]
    finally:
        server.close()


def test_the_side_channel_opens_a_read_window_per_granted_pin_and_closes_it_at_release(
    manager: LLMDTieringManager,
) -> None:
    """The reads of a pinned block land on the holder's worker, which holds no lease of its own: the
    side channel keeps its UCX progress awake (``hold_until``) from the pin until the release."""
    pushed: list[float] = []
    windows = ReadWindows(pushed.append)
    engine_id = f"holder-{uuid.uuid4().hex[:8]}"
    pins = PinServer(engine_id, PeerHoldings(manager))
    server = HandshakeServer(_info(engine_id), "127.0.0.1", 0, windows=windows, link_seconds=5.0)
    try:
        _store(manager, range(0, 2))
        asked = time.monotonic()
        fetch_engine_info("127.0.0.1", _port(server), 0, 2.0)  # a peer links: its first read follows
        assert len(windows) == 1 and pushed[-1] >= asked + 5
        link_ends = pushed[-1]
        [(lease, _)] = pin_blocks("127.0.0.1", _port(server), 0, engine_id, [_hash(0), _hash(1)], 30.0, 2.0)
        assert len(windows) == 2 and pushed[-1] >= asked + 30  # open for the pin's lease
        with pytest.raises(HandshakeError):
            pin_blocks("127.0.0.1", _port(server), 0, engine_id, [_hash(9)], 30.0, 2.0)
        assert len(windows) == 2  # a refused pin opens nothing
        release_blocks("127.0.0.1", _port(server), 0, [lease], 2.0)
        assert len(windows) <= 1 and pushed[-1] in (link_ends, 0.0)  # back to the link window only
    finally:
        server.close()
        pins.close()


def test_read_windows_keep_the_latest_deadline_and_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import vllm_llmd.connectors.read_windows as rw

    pushed: list[float] = []
    w = rw.ReadWindows(pushed.append)
    now = time.monotonic()
    w.open("a", 10.0)
    w.open("b", 1.0)
    assert pushed[-1] >= now + 10
    w.close("a")
    assert now + 1 <= pushed[-1] < now + 10  # shortened to b's
    w.close("b")
    assert pushed[-1] == 0.0 and len(w) == 0
    monkeypatch.setattr(rw, "MAX_WINDOWS", 4)
    for i in range(10):
        w.open(f"pin:{i}", 5.0 + i)
    assert len(w) <= 4 and pushed[-1] >= now + 14  # merged, never shorter
