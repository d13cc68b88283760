"""The connector's ZMQ side channel, on real sockets (127.0.0.1): compatibility checks and hostile input."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
from vllm_llmd.connectors.handshake import (
    COMPAT_FIELDS,
    MAX_REQUEST_BYTES,
    PROTOCOL_VERSION,
    EngineInfo,
    HandshakeError,
    HandshakeMismatch,
    HandshakeServer,
    check_compatible,
    fetch_engine_info,
)
from vllm_llmd.connectors.transports import Region

from vllm_llmd.testing.wait import wait_until

SERVER_MAX = MAX_REQUEST_BYTES  # HandshakeServer's default max_message_bytes (what the worker uses)


def make_info(**changes: Any) -> EngineInfo:
    base: dict[str, Any] = {
        "protocol": PROTOCOL_VERSION,
        "engine_id": "engine-p",
        "tp_rank": 0,
        "model": "/models/small",
        "kv_dtype": "auto/torch.bfloat16",
        "block_size": 64,
        "num_layers": 6,
        "layout": "blocks_first",
        "block_len": 32768,
        "transport": "nixl",
        "memory": "DRAM",
        "agent_metadata": b"\x01nixl-agent-metadata",
        "regions": [Region(base_addr=0x7F0000000000 + i * 2**24, num_blocks=320, block_len=32768) for i in range(6)],
    }
    base.update(changes)
    return EngineInfo(**base)


@pytest.fixture
def server() -> Iterator[HandshakeServer]:
    srv = HandshakeServer(make_info(), "127.0.0.1", 0)
    yield srv
    srv.close()


def _port(srv: HandshakeServer) -> int:
    return int(srv.endpoint.rsplit(":", 1)[1])


def _raw_req(srv: HandshakeServer, payload: bytes, timeout_ms: int = 3000) -> bytes | None:
    """Send ``payload`` as a REQ client would; the reply, or None when none came."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
    try:
        sock.connect(srv.endpoint)
        sock.send(payload)
        try:
            return sock.recv()
        except zmq.Again:
            return None
    finally:
        sock.close(linger=0)


def _reason(reply: bytes | None) -> str:
    assert reply is not None, "the server did not answer"
    decoded = msgspec.msgpack.decode(reply)
    assert decoded["type"] == "error", decoded
    return decoded["reason"]


def _still_serves(srv: HandshakeServer) -> None:
    info = fetch_engine_info("127.0.0.1", _port(srv), 0, timeout_s=5)
    assert info == srv.info


# ---- the good path -------------------------------------------------------------------------------
def test_matching_handshake_succeeds(server: HandshakeServer) -> None:
    info = fetch_engine_info("127.0.0.1", _port(server), 0, timeout_s=5)
    assert info == make_info()
    assert info.regions[3].base_addr == make_info().regions[3].base_addr
    check_compatible(make_info(engine_id="engine-d", agent_metadata=b"other"), info, expected_engine_id="engine-p")
    assert server.served == 1 and server.refused == 0


# ---- mismatches ------------------------------------------------------------------------------------
#: differences no plan can bridge
ALWAYS_MISMATCHES = {"model": "/models/wide", "kv_dtype": "auto/torch.float16", "transport": "rbln"}
#: differences that rule out moving blocks as they are (a re-layout may still bridge them)
DIRECT_MISMATCHES = {"block_size": 128, "num_layers": 8, "layout": "kv_first", "block_len": 65536, "memory": "VRAM"}
MISMATCHES = {**ALWAYS_MISMATCHES, **DIRECT_MISMATCHES}


def test_every_compat_field_is_checked() -> None:
    assert set(COMPAT_FIELDS) == {"protocol", *MISMATCHES}


@pytest.mark.parametrize(("field", "value"), sorted(MISMATCHES.items()))
def test_a_mismatch_names_the_field_and_both_values(field: str, value: object) -> None:
    srv = HandshakeServer(make_info(**{field: value}), "127.0.0.1", 0)
    try:
        remote = fetch_engine_info("127.0.0.1", _port(srv), 0, timeout_s=5)
    finally:
        srv.close()
    with pytest.raises(HandshakeMismatch) as err:
        check_compatible(make_info(engine_id="engine-d"), remote, expected_engine_id="engine-p")
    msg = str(err.value)
    assert f"{field}: local={getattr(make_info(), field)!r} remote={value!r}" in msg
    if field in ALWAYS_MISMATCHES:
        assert msg.count("local=") == 1, msg  # only the differing field is named
    else:  # ... and why the blocks cannot be re-laid out instead (no canonical layouts published here)
        assert "kv_layout (local)" in msg and "kv_layout (remote)" in msg and "relayout_buffer_mb" in msg, msg


def test_a_peer_with_another_block_size_gets_a_relayout_plan_over_a_common_backend() -> None:
    """The canonical KV layout crosses the side channel intact; with it, a block-size difference
    becomes a re-layout on receive instead of a refusal."""
    import torch
    from vllm_llmd.connectors.cpu_probe import vec_packing
    from vllm_llmd.connectors.relayout import describe, kv_views

    kept = []

    def engine(block_size: int, **changes: Any) -> EngineInfo:  # a CPU engine's cache: [B, H, S, 2D] per layer
        caches = [torch.zeros(8, 2, block_size, 128, dtype=torch.bfloat16) for _ in range(6)]
        kept.append(caches)
        shape = {"num_blocks": 8, "num_kv_heads": 2, "head_size": 64, "block_size": block_size}
        views = kv_views(dict(enumerate(caches)), **shape, device_kind="cpu", cpu_packing=vec_packing(block_size, 64))
        lay = describe(views[1], "cpu")
        regions = [Region(base_addr=t.data_ptr(), num_blocks=8, block_len=lay.page_bytes) for t in caches]
        return make_info(block_size=block_size, block_len=lay.page_bytes, kv_layout=lay, regions=regions, **changes)

    ours = engine(64, engine_id="engine-d", backends=["RBLN", "UCX"])
    theirs = engine(128, backends=["UCX"])
    srv = HandshakeServer(theirs, "127.0.0.1", 0)
    try:
        remote = fetch_engine_info("127.0.0.1", _port(srv), 0, timeout_s=5)
    finally:
        srv.close()
    assert remote == theirs and remote.kv_layout is not None and remote.kv_layout.order() == "K:HDS/V:HSD"
    plan = check_compatible(ours, remote, expected_engine_id="engine-p", can_relayout=True)
    assert (plan.mode, plan.backends) == ("relayout", ("UCX",)) and "block_size 128->64" in plan.why
    with pytest.raises(HandshakeMismatch, match="relayout_buffer_mb"):
        check_compatible(ours, remote, expected_engine_id="engine-p", can_relayout=False)
    with pytest.raises(HandshakeMismatch, match=r"backends: local=\['RBLN'\] remote=\['UCX'\]"):
        check_compatible(engine(64, backends=["RBLN"]), theirs, expected_engine_id=None, can_relayout=True)


def test_several_mismatches_are_all_reported() -> None:
    with pytest.raises(HandshakeMismatch, match=r"block_size: local=64 remote=128.*model: local='/models/small'"):
        check_compatible(make_info(), make_info(block_size=128, model="/models/wide"), expected_engine_id=None)


def test_reaching_another_engine_than_the_one_named_is_refused(server: HandshakeServer) -> None:
    """The decode side pulls only from the engine the prefill response named (engine id)."""
    remote = fetch_engine_info("127.0.0.1", _port(server), 0, timeout_s=5)
    with pytest.raises(HandshakeMismatch, match="engine_id: local='engine-x' remote='engine-p'"):
        check_compatible(make_info(engine_id="engine-d"), remote, expected_engine_id="engine-x")


def test_protocol_and_rank_are_checked_by_the_server(server: HandshakeServer) -> None:
    enc = msgspec.msgpack.encode
    reason = _reason(_raw_req(server, enc({"type": "get", "protocol": PROTOCOL_VERSION + 1, "tp_rank": 0})))
    assert f"protocol {PROTOCOL_VERSION + 1} not supported" in reason
    assert "serves TP rank 0" in _reason(
        _raw_req(server, enc({"type": "get", "protocol": PROTOCOL_VERSION, "tp_rank": 3}))
    )
    with pytest.raises(HandshakeError, match="refused the handshake: this side channel serves TP rank 0"):
        fetch_engine_info("127.0.0.1", _port(server), 1, timeout_s=5)
    assert server.refused == 3
    _still_serves(server)


# ---- hostile input on the server ---------------------------------------------------------------------
class _Exploit:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xff\xfe garbage \x00",
        os.urandom(4096),
        msgspec.msgpack.encode([1, 2, 3]),
        msgspec.msgpack.encode({"type": "info", "protocol": 1, "tp_rank": 0}),
        msgspec.msgpack.encode({"type": "get", "protocol": "1", "tp_rank": 0}),
        b'{"type": "get", "protocol": 1, "tp_rank": 0}',
    ],
    ids=["empty", "garbage", "random", "array", "wrong-tag", "wrong-type", "json"],
)
def test_garbage_is_refused_and_the_server_keeps_serving(server: HandshakeServer, payload: bytes) -> None:
    assert "malformed handshake request" in _reason(_raw_req(server, payload))
    _still_serves(server)


def test_a_pickle_is_never_unpickled(server: HandshakeServer, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(marker))
    assert "malformed handshake request" in _reason(_raw_req(server, payload))
    assert not marker.exists()
    _still_serves(server)


def test_an_oversized_message_is_dropped_and_the_server_keeps_serving(server: HandshakeServer) -> None:
    big = msgspec.msgpack.encode({"type": "get", "protocol": 1, "tp_rank": 0, "pad": b"x" * (SERVER_MAX + 1)})
    assert _raw_req(server, big, timeout_ms=1000) is None  # ZMQ cut the peer off; nothing was decoded
    assert server.served == 0 and server.refused == 0
    _still_serves(server)


def test_a_wrongly_framed_message_is_dropped(server: HandshakeServer) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 1000)
    try:
        sock.connect(server.endpoint)
        sock.send_multipart([b"one", b"two", b"three"])  # no REQ envelope
        with pytest.raises(zmq.Again):
            sock.recv_multipart()
    finally:
        sock.close(linger=0)
    _still_serves(server)


def test_a_client_cannot_choose_where_the_engine_pulls_from(server: HandshakeServer) -> None:
    """The request carries only (protocol, tp rank): extra fields such as an address, agent metadata
    or a region table are refused, and what the server hands out is fixed at start-up."""
    enc = msgspec.msgpack.encode
    for extra in (
        {"remote_host": "10.0.0.66", "remote_port": 1},
        {"agent_metadata": b"attacker"},
        {"regions": [{"base_addr": 0, "num_blocks": 1, "block_len": 1 << 30}]},
        {"engine_id": "attacker"},
    ):
        req = {"type": "get", "protocol": PROTOCOL_VERSION, "tp_rank": 0, **extra}
        assert "malformed handshake request" in _reason(_raw_req(server, enc(req)))
    assert fetch_engine_info("127.0.0.1", _port(server), 0, timeout_s=5) == make_info()


def test_the_decode_side_does_not_take_a_peer_at_its_word() -> None:
    """A peer can only describe itself: the reply's engine id must be the one the prefill response
    named, and everything it says goes through the compat check before a block moves."""
    rogue = HandshakeServer(make_info(engine_id="engine-rogue"), "127.0.0.1", 0)
    try:
        remote = fetch_engine_info("127.0.0.1", _port(rogue), 0, timeout_s=5)
    finally:
        rogue.close()
    with pytest.raises(HandshakeMismatch, match="engine_id"):
        check_compatible(make_info(engine_id="engine-d"), remote, expected_engine_id="engine-p")


# ---- hostile or absent servers, seen from the client -------------------------------------------------
class _FakeServer:
    """A ROUTER that answers every request with a fixed payload (a broken or hostile peer)."""

    def __init__(self, reply: bytes) -> None:
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.reply = reply

    def answer_one(self) -> None:
        if self.sock.poll(5000):
            ident, empty, _ = self.sock.recv_multipart()
            self.sock.send_multipart([ident, empty, self.reply])

    def close(self) -> None:
        self.sock.close(linger=0)


def _fetch_against(reply: bytes, max_message_bytes: int = 4 * 1024 * 1024, timeout_s: float = 5) -> EngineInfo:
    fake = _FakeServer(reply)
    t = threading.Thread(target=fake.answer_one, daemon=True)
    t.start()
    try:
        return fetch_engine_info("127.0.0.1", fake.port, 0, timeout_s=timeout_s, max_message_bytes=max_message_bytes)
    finally:
        t.join(timeout=10)
        fake.close()


@pytest.mark.parametrize(
    "reply",
    [
        b"garbage",
        msgspec.msgpack.encode({"type": "info", "info": {"protocol": 1}}),
        msgspec.msgpack.encode({"type": "info", "info": {**msgspec.structs.asdict(make_info()), "evil": 1}}),
        pickle.dumps({"type": "info"}),
    ],
    ids=["garbage", "incomplete", "unknown-field", "pickle"],
)
def test_a_malformed_answer_is_a_clear_error(reply: bytes) -> None:
    with pytest.raises(HandshakeError, match="malformed handshake answer"):
        _fetch_against(reply)


def test_a_well_formed_answer_from_the_same_fake_is_accepted() -> None:
    """Control for the two tests around it: the fake server itself is not what fails."""
    info = make_info(agent_metadata=b"x" * 2048)
    assert _fetch_against(msgspec.msgpack.encode({"type": "info", "info": msgspec.structs.asdict(info)})) == info


def test_an_oversized_answer_is_not_accepted() -> None:
    huge = msgspec.msgpack.encode(
        {"type": "info", "info": msgspec.structs.asdict(make_info(agent_metadata=b"x" * 8192))}
    )
    with pytest.raises(HandshakeError, match="no handshake answer"):
        _fetch_against(huge, max_message_bytes=4096, timeout_s=1)


def test_nobody_listening_times_out_with_a_clear_error() -> None:
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    sock.close(linger=0)  # a port that was free a moment ago
    with pytest.raises(HandshakeError, match=rf"no handshake answer from 127.0.0.1:{port} within 0.5s"):
        fetch_engine_info("127.0.0.1", port, 0, timeout_s=0.5)


def test_a_refusal_is_reported_with_its_reason() -> None:
    with pytest.raises(HandshakeError, match="refused the handshake: go away"):
        _fetch_against(msgspec.msgpack.encode({"type": "error", "reason": "go away"}))


# ---- bounds on whole messages (issue 9, case 8) --------------------------------------------------------
def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _dealer(srv: HandshakeServer) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(srv.endpoint)
    return sock


_ATTACKER = """
import sys, time, zmq
sock = zmq.Context.instance().socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 2000)
sock.connect(sys.argv[1])
sock.send_multipart([b"", *([b"x" * int(sys.argv[2])] * int(sys.argv[3]))])
time.sleep(float(sys.argv[4]))  # pacing: a hostile peer that stays connected while it is measured
sock.close()
"""


def _attack(srv: HandshakeServer, frame_bytes: int, frames: int) -> subprocess.Popen:
    """Another process (so its own send buffers do not count in our RSS) sends one message of
    ``frames`` frames and stays connected for a while."""
    args = [sys.executable, "-c", _ATTACKER, srv.endpoint, str(frame_bytes), str(frames), "3"]
    return subprocess.Popen(args)


def test_a_3000_frame_message_does_not_blow_up_the_server(server: HandshakeServer) -> None:
    """Before: the size limit was per frame (64 KiB) and the server copied every frame, so 3,000
    frames of 60 KB took it from 20 to 353 MiB. Now such a frame is over the request limit (the peer
    is cut off) and a many-frame message of small frames is drained without copies and dropped."""
    before = _rss_mib()
    peak = before
    for frame_bytes in (60_000, 1_000):
        attacker = _attack(server, frame_bytes, 3000)
        try:
            t0 = time.monotonic()
            while attacker.poll() is None and time.monotonic() - t0 < 10:
                peak = max(peak, _rss_mib())
                time.sleep(0.02)  # pacing: sampling our RSS while the message arrives
            _still_serves(server)
        finally:
            attacker.kill()
            attacker.wait()
    # the 1 KB-frame message (the 60 KB one never got through ZMQ); its read does not wait on the window
    wait_until(lambda: server.dropped >= 1, 10, "the many-frame message read and dropped")
    assert server.dropped == 1
    assert peak - before < 48, (before, peak)
    assert server.served >= 2


def test_a_flood_of_misframed_messages_logs_a_bounded_number_of_lines(
    server: HandshakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    sock = _dealer(server)
    try:
        with caplog.at_level(logging.WARNING, logger="vllm.vllm_llmd.connectors"):
            for _ in range(2000):
                sock.send_multipart([b"one", b"two", b"three"])  # no REQ envelope
            wait_until(lambda: server.dropped >= 2000, 20, "every misframed message read")
    finally:
        sock.close(linger=0)
    lines = [r for r in caplog.records if "dropped a malformed message" in r.getMessage()]
    assert 1 <= len(lines) <= 10
    _still_serves(server)


def test_a_multi_frame_answer_is_refused_by_the_client() -> None:
    fake = _FakeServer(b"")
    info = msgspec.msgpack.encode({"type": "info", "info": msgspec.structs.asdict(make_info())})

    def answer() -> None:
        if fake.sock.poll(5000):
            ident, empty, _ = fake.sock.recv_multipart()
            fake.sock.send_multipart([ident, empty, info, b"extra" * 1000])

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        with pytest.raises(HandshakeError, match="more than one frame"):
            fetch_engine_info("127.0.0.1", fake.port, 0, timeout_s=5)
    finally:
        t.join(timeout=10)
        fake.close()
