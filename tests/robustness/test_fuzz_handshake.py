"""Standing robustness suite, side channel: property-based fuzzing (hypothesis) of the connector's
handshake server over real ZMQ sockets. Whatever a peer sends, the server answers a well-framed
request with the engine's info or a refusal, drops anything else, never unpickles, and keeps
serving real clients. Prints inputs tried and crashes (0)."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vllm_llmd.connectors.handshake import PROTOCOL_VERSION, EngineInfo, HandshakeServer, fetch_engine_info
from vllm_llmd.connectors.transports import Region
from zmq_fuzz_report import report

from vllm_llmd.testing.wait import wait_until

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


def make_info() -> EngineInfo:
    regions = [Region(base_addr=0x7F0000000000 + i * 2**20, num_blocks=64, block_len=4096) for i in range(2)]
    fields = {"protocol": PROTOCOL_VERSION, "engine_id": "fuzzed", "tp_rank": 0, "model": "m", "kv_dtype": "auto"}
    return EngineInfo(
        **fields,
        block_size=16,
        num_layers=2,
        layout="blocks_first",
        block_len=4096,
        transport="nixl",
        memory="DRAM",
        agent_metadata=b"agent",
        regions=regions,
    )


@dataclass
class Tally:
    inputs: int = 0
    crashes: int = 0
    answers: dict[str, int] = field(default_factory=dict)


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest) -> Iterator[tuple[HandshakeServer, Tally]]:
    srv = HandshakeServer(make_info(), "127.0.0.1", 0)
    tally = Tally()
    yield srv, tally
    alive = srv._thread.is_alive()
    srv.close()
    if not alive:
        tally.crashes += 1
    line = f"robustness/handshake: {tally.inputs} inputs tried (answers {tally.answers}), crashes {tally.crashes}"
    report(request.config, line)
    assert tally.crashes == 0, line


scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=8), st.binary(max_size=8)
)
request_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["get", "info", "error", "GET", ""])},
    optional={
        "protocol": st.one_of(st.just(PROTOCOL_VERSION), scalar),
        "tp_rank": st.one_of(st.just(0), scalar),
        "remote_host": scalar,
        "agent_metadata": scalar,
    },
).map(msgspec.msgpack.encode)
payload = st.one_of(
    request_like,
    st.builds(lambda v: msgspec.msgpack.encode(v), st.lists(scalar, max_size=4)),
    st.binary(max_size=256),
    st.builds(lambda v: pickle.dumps(v), st.lists(scalar, max_size=3)),
    st.just(msgspec.msgpack.encode({"type": "get", "protocol": PROTOCOL_VERSION, "tp_rank": 0})),
)
# [b"", payload] is what a REQ peer sends (ROUTER adds the identity); anything else is misframed
message = st.one_of(
    payload.map(lambda p: [b"", p]),
    st.lists(st.binary(max_size=32), min_size=1, max_size=6),
    st.tuples(st.binary(min_size=1, max_size=4), payload).map(list),
)


@FUZZ
@given(st.lists(message, min_size=1, max_size=4))
def test_whatever_a_peer_sends_the_side_channel_keeps_serving(
    server: tuple[HandshakeServer, Tally], messages: list[list[bytes]]
) -> None:
    srv, tally = server
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(srv.endpoint)
    try:
        for frames in messages:
            dropped = srv.dropped
            sock.send_multipart(frames)
            tally.inputs += 1
            if len(frames) == 2 and frames[0] == b"":  # well framed: exactly one answer
                assert sock.poll(5000), "no answer to a well-framed request"
                empty, answer = sock.recv_multipart()
                kind = msgspec.msgpack.decode(answer)["type"]
                assert empty == b"" and kind in ("info", "error")
                tally.answers[kind] = tally.answers.get(kind, 0) + 1
            else:
                wait_until(lambda d=dropped: srv.dropped > d, 5, "the misframed message dropped", interval=0.005)
                tally.answers["dropped"] = tally.answers.get("dropped", 0) + 1
    finally:
        sock.close(linger=0)
    assert srv._thread.is_alive()
    port = int(srv.endpoint.rsplit(":", 1)[1])
    assert fetch_engine_info("127.0.0.1", port, 0, timeout_s=5) == make_info()
