"""Standing robustness suite, event side: property-based fuzzing (hypothesis) of the router's KV-event
subscriber and index over real ZMQ sockets - frames, topics, sequence numbers, payloads, and replay
answers. Every example ends with a well-formed marker batch that must be applied: the subscriber
kept going, in order, and nothing it received made it raise. Prints inputs tried and crashes (0)."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zmq_fuzz_report import report

from vllm_llmd.index import KVBlockIndex, KVEventSubscriber
from vllm_llmd.index.replay import ReplayLimits, fetch_replay
from vllm_llmd.testing.wait import wait_until
from vllm_llmd.wire import AllBlocksCleared, BlockRemoved, BlockStored, encode_batch, encode_positional_batch

POD = "10.0.0.1:8000"
TOPIC = f"kv@{POD}@m".encode()
FUZZ = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


@dataclass
class Tally:
    inputs: int = 0
    crashes: int = 0
    kinds: dict[str, int] = field(default_factory=dict)


class _CrashCounter(logging.Handler):
    """Every ERROR from our index/subscriber loggers is a crash caught at a safety net."""

    def __init__(self, tally: Tally) -> None:
        super().__init__(logging.ERROR)
        self.tally = tally

    def emit(self, record: logging.LogRecord) -> None:
        self.tally.crashes += 1


@pytest.fixture(scope="module")
def tally(request: pytest.FixtureRequest) -> Iterator[Tally]:
    t = Tally()
    handler = _CrashCounter(t)
    log = logging.getLogger("vllm_llmd.index")
    log.addHandler(handler)
    yield t
    log.removeHandler(handler)
    line = f"robustness/event stream: {t.inputs} inputs tried ({t.kinds}), crashes {t.crashes}"
    report(request.config, line)
    assert t.crashes == 0, line


# ---- strategies ----------------------------------------------------------------------------------
u64 = st.one_of(st.sampled_from([0, 1, 2, 2**31, 2**63 - 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
seq_frame = st.one_of(u64.map(lambda s: s.to_bytes(8, "big")), st.binary(max_size=12))
topic_frame = st.one_of(
    st.just(TOPIC),
    st.sampled_from([b"", b"kv", b"kv@@", b"kv@x@", b"kv@a:1@\xff\xfe", b"xx@10.0.0.1:8000@m", TOPIC + b"@more"]),
    st.binary(max_size=24),
)
small_int = st.one_of(st.integers(-3, 70), st.sampled_from([2**63, -(2**63), 2**64 - 1]))
tokens = st.lists(st.one_of(st.integers(0, 5000), st.sampled_from([-1, 2**32, 2**40])), max_size=64)
medium = st.one_of(st.sampled_from(["GPU", "CPU", "STORAGE", "gpu", ""]), st.text(max_size=6), st.none())


@st.composite
def stored(draw: st.DrawFn) -> BlockStored:
    bs = draw(st.sampled_from([1, 4, 16, 32]))
    n = draw(st.integers(0, 4))
    toks = draw(st.one_of(tokens, st.lists(st.integers(0, 5000), min_size=n * bs, max_size=n * bs)))
    return BlockStored(
        block_hashes=draw(
            st.lists(st.one_of(st.integers(0, 2**64 - 1), st.binary(min_size=1, max_size=32)), min_size=n, max_size=n)
        ),
        parent_block_hash=draw(st.one_of(st.none(), st.integers(0, 40))),
        token_ids=toks,
        block_size=bs,
        lora_id=None,
        medium=draw(medium),
        lora_name=draw(st.one_of(st.none(), st.sampled_from(["lora-a", ""]))),
        extra_keys=draw(st.one_of(st.none(), st.just([None] * n), st.just([("salt",)] + [None] * max(0, n - 1)))),
        group_idx=draw(st.one_of(st.none(), st.integers(0, 3))),
        kv_cache_spec_kind=draw(st.sampled_from([None, "full_attention", "sliding_window"])),
    )


event = st.one_of(
    stored(),
    st.builds(BlockRemoved, block_hashes=st.lists(st.integers(0, 40), max_size=6), medium=medium),
    st.just(AllBlocksCleared()),
)
well_formed = st.tuples(st.lists(event, max_size=4), st.booleans()).map(
    lambda t: (encode_positional_batch if t[1] else encode_batch)(t[0], ts=1.0)
)
msgpack_junk = st.recursive(
    st.one_of(st.none(), st.booleans(), small_int, st.floats(), st.text(max_size=6), st.binary(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)),
    max_leaves=12,
).map(msgspec.msgpack.encode)
payload = st.one_of(well_formed, msgpack_junk, st.binary(max_size=64))
message = st.one_of(
    st.tuples(topic_frame, seq_frame, payload).map(list),
    st.lists(st.binary(max_size=16), min_size=1, max_size=5),  # wrong frame counts
)


def _marker(i: int) -> tuple[list[int], bytes]:
    rng = random.Random(i)
    toks = [rng.randrange(1, 5000) for _ in range(16)]
    ev = BlockStored([10_000_000 + i], None, toks, 16, None, "GPU", None)
    return toks, encode_batch([ev], ts=1.0)


# ---- live stream ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(tally: Tally) -> Iterator[tuple[zmq.Socket, KVBlockIndex, KVEventSubscriber]]:
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    idx = KVBlockIndex(block_size=16, capacity_blocks=5_000)
    sub = KVEventSubscriber(idx, curve=None)
    sub.add_pod(POD, f"tcp://127.0.0.1:{port}")  # no replay endpoint: every rule applies in the index
    sub.start()
    wait_until(lambda: POD in sub.stats() and sub.stats()[POD].connected, 10, "subscriber connected")
    yield pub, idx, sub
    sub.stop()
    pub.close(linger=0)


_n = [0]


@FUZZ
@given(st.lists(message, min_size=1, max_size=5), st.sampled_from([0, 1, 2**40, 2**64 - 1]))
def test_whatever_a_pod_sends_the_subscriber_keeps_applying_in_order(
    live: tuple[zmq.Socket, KVBlockIndex, KVEventSubscriber], tally: Tally, messages: list[list[bytes]], mseq: int
) -> None:
    pub, idx, sub = live
    for frames in messages:
        pub.send_multipart(frames)
        tally.inputs += 1
        kind = "3-frame" if len(frames) == 3 else "misframed"
        tally.kinds[kind] = tally.kinds.get(kind, 0) + 1
    _n[0] += 1
    toks, marker = _marker(_n[0])
    mtopic = f"kv@{POD}@marker{_n[0]}".encode()

    def marker_applied() -> bool:
        # a marker can be lost by PUB/SUB only if the subscriber fell behind; send it until seen
        pub.send_multipart([mtopic, mseq.to_bytes(8, "big"), marker])
        return POD in idx.match(f"marker{_n[0]}", toks)

    wait_until(marker_applied, 10, "the marker batch applied after the fuzzed messages", interval=0.01)
    assert sub._thread is not None and sub._thread.is_alive()
    st_ = idx.stats()
    assert st_.blocks <= st_.capacity_blocks
    idx.match("m", list(range(64)))


# ---- replay answers ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def replay_server() -> Iterator[tuple[zmq.Socket, str]]:
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield sock, f"tcp://127.0.0.1:{port}"
    sock.close(linger=0)


replay_msg = st.one_of(
    st.tuples(topic_frame, seq_frame, payload).map(lambda t: [b"", *t]),
    st.lists(st.binary(max_size=12), min_size=1, max_size=6),
)


@FUZZ
@given(st.lists(replay_msg, max_size=8), st.booleans())
def test_whatever_a_replay_endpoint_answers_is_taken_or_refused_never_raised(
    replay_server: tuple[zmq.Socket, str], tally: Tally, answer: list[list[bytes]], end: bool
) -> None:
    sock, endpoint = replay_server
    limits = ReplayLimits(timeout_s=0.2, max_batches=5, max_bytes=4096, max_message_bytes=1 << 16)

    def serve() -> None:
        if sock.poll(5000):
            ident, *_ = sock.recv_multipart()
            for frames in answer:
                sock.send_multipart([ident, *frames])
            if end:
                sock.send_multipart([ident, b"", TOPIC, (-1).to_bytes(8, "big", signed=True), b""])

    t = threading.Thread(target=serve)
    t.start()
    got = fetch_replay(zmq.Context.instance(), endpoint, 0, limits)
    t.join()
    tally.inputs += max(1, len(answer))
    tally.kinds["replay"] = tally.kinds.get("replay", 0) + 1
    if got is not None:
        assert len(got) <= limits.max_batches and all(len(f) == 3 and len(f[1]) == 8 for f in got)
        idx = KVBlockIndex(block_size=16)
        for frames in got:
            idx.ingest(POD, frames, hold=True)
