"""KVEventSubscriber against vLLM's own ``ZmqEventPublisher`` (real PUB + ROUTER replay sockets)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import zmq
from vllm.distributed.kv_events import AllBlocksCleared, BlockStored, KVEventBatch, ZmqEventPublisher

from vllm_llmd.index import KVBlockIndex, KVEventSubscriber
from vllm_llmd.testing.engine import free_port
from vllm_llmd.testing.wait import wait_until

POD = "127.0.0.1:8000"
TOPIC = f"kv@{POD}@m"
BS = 16


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    wait_until(cond, timeout)


class Publisher:
    """A vLLM publisher on fixed ports (so a 'restarted engine' binds the same ones)."""

    def __init__(self, port: int, replay_port: int) -> None:
        self.pub = ZmqEventPublisher(
            data_parallel_rank=0, endpoint=f"tcp://*:{port}", replay_endpoint=f"tcp://*:{replay_port}", topic=TOPIC
        )
        self.next_hash = random.randrange(1 << 60)

    def store(self, tokens: list[int]) -> None:
        n = len(tokens) // BS
        hashes = list(range(self.next_hash, self.next_hash + n))
        self.next_hash += n
        ev = BlockStored(
            block_hashes=hashes,
            parent_block_hash=None,
            token_ids=tokens,
            block_size=BS,
            lora_id=None,
            medium="GPU",
            lora_name=None,
        )
        self.pub.publish(KVEventBatch(ts=time.time(), events=[ev]))

    def close(self) -> None:
        self.pub.shutdown()


def prompt(seed: int, n: int = 64) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 30_000) for _ in range(n)]


@pytest.fixture
def ports() -> tuple[int, int]:
    return free_port(), free_port()


@pytest.fixture
def idx() -> KVBlockIndex:
    return KVBlockIndex(block_size=BS)


@pytest.fixture
def sub(idx: KVBlockIndex) -> Iterator[KVEventSubscriber]:
    s = KVEventSubscriber(idx, reconnect_ivl_ms=50, reconnect_ivl_max_ms=200)
    s.start()
    yield s
    s.stop()


def connected(sub: KVEventSubscriber) -> bool:
    st = sub.stats().get(POD)
    return st is not None and st.connected


def holds(idx: KVBlockIndex, tokens: list[int]) -> int:
    m = idx.match("m", tokens).get(POD)
    return 0 if m is None else m.tokens


def test_router_start_rebuilds_from_replay_then_follows_live(
    idx: KVBlockIndex, sub: KVEventSubscriber, ports: tuple[int, int]
) -> None:
    pub = Publisher(*ports)
    try:
        early = [prompt(i) for i in range(3)]
        for p in early:
            pub.store(p)
        wait_for(lambda: len(pub.pub._buffer) == 3)  # nobody listens yet: only the replay buffer has them
        sub.add_pod(POD, f"tcp://127.0.0.1:{ports[0]}", f"tcp://127.0.0.1:{ports[1]}")
        wait_for(lambda: all(holds(idx, p) == 64 for p in early))
        late = prompt(10)
        pub.store(late)
        wait_for(lambda: holds(idx, late) == 64)
        st = sub.stats()[POD]
        assert st.connected and st.replays >= 1 and st.replayed_batches >= 3
        assert st.last_seq == 3 and st.batches >= 1 and st.lag_s is not None and st.lag_s < 5
        assert idx.stats().seq_gaps == 0
    finally:
        pub.close()


class _Dropping:
    """Wraps the publisher's PUB socket and loses the batches whose seq is in ``drop`` (a lossy
    network); the publisher still buffers them for replay, as vLLM does after sending."""

    def __init__(self, sock: zmq.Socket, drop: set[int]) -> None:
        self._sock, self._drop = sock, drop

    def send_multipart(self, frames, *a, **kw):
        if int.from_bytes(frames[1], "big") in self._drop:
            return None
        return self._sock.send_multipart(frames, *a, **kw)

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


def test_a_gap_is_filled_from_the_replay_endpoint(
    idx: KVBlockIndex, sub: KVEventSubscriber, ports: tuple[int, int]
) -> None:
    pub = Publisher(*ports)
    try:
        sub.add_pod(POD, f"tcp://127.0.0.1:{ports[0]}", f"tcp://127.0.0.1:{ports[1]}")
        wait_for(lambda: connected(sub))
        first = prompt(1)
        pub.store(first)
        wait_for(lambda: holds(idx, first) == 64)
        pub.pub._pub = _Dropping(pub.pub._pub, {1, 2})
        lost, after = prompt(2), prompt(3)
        pub.store(lost)
        pub.store(prompt(4))
        pub.store(after)
        wait_for(lambda: holds(idx, after) == 64)
        assert holds(idx, lost) == 64  # fetched from the replay buffer
        assert idx.last_seq(POD) == 3 and idx.stats().seq_gaps == 0
    finally:
        pub.close()


def test_engine_restart_drops_stale_entries_even_before_new_events(
    idx: KVBlockIndex, sub: KVEventSubscriber, ports: tuple[int, int]
) -> None:
    pub = Publisher(*ports)
    old = prompt(1)
    sub.add_pod(POD, f"tcp://127.0.0.1:{ports[0]}", f"tcp://127.0.0.1:{ports[1]}")
    try:
        wait_for(lambda: connected(sub))
        pub.store(old)
        pub.store(prompt(2))
        wait_for(lambda: holds(idx, old) == 64)
    finally:
        pub.close()
    wait_for(lambda: not connected(sub))
    assert holds(idx, old) == 64  # a disconnect alone keeps the entries
    pub = Publisher(*ports)  # the engine comes back: same ports, seq from 0, empty cache
    try:
        wait_for(lambda: holds(idx, old) == 0)
        st = sub.stats()[POD]
        assert st.reconnects >= 1 and st.restarts >= 1
        new = prompt(3)
        pub.store(new)
        wait_for(lambda: holds(idx, new) == 64)
        assert idx.last_seq(POD) == 0
        pub.pub.publish(KVEventBatch(ts=time.time(), events=[AllBlocksCleared()]))
        wait_for(lambda: holds(idx, new) == 0)
    finally:
        pub.close()


def test_remove_pod_and_garbage_on_the_socket(idx: KVBlockIndex, sub: KVEventSubscriber) -> None:
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.PUB)
    port = raw.bind_to_random_port("tcp://127.0.0.1")
    try:
        sub.add_pod(POD, f"tcp://127.0.0.1:{port}")  # no replay endpoint
        wait_for(lambda: connected(sub))
        good = prompt(5)
        from vllm_llmd.wire import BlockStored as WireStored
        from vllm_llmd.wire import encode_batch

        payload = encode_batch([WireStored(list(range(4)), None, good, BS, None, "GPU", None)])

        def send_until_seen() -> bool:
            raw.send_multipart([b"garbage"])
            raw.send_multipart([TOPIC.encode(), (0).to_bytes(8, "big"), b"\x00\xff junk"])
            raw.send_multipart([TOPIC.encode(), (1).to_bytes(8, "big"), payload])
            return holds(idx, good) == 64

        wait_for(send_until_seen)
        st = sub.stats()[POD]
        assert st.errors >= 1 and idx.stats().decode_errors >= 2
        sub.remove_pod(POD)
        wait_for(lambda: POD not in sub.stats())
        assert holds(idx, good) == 0 and idx.pods() == []
    finally:
        raw.close(linger=0)


def test_a_failed_sync_is_retried_until_the_replay_endpoint_answers(idx: KVBlockIndex, sub: KVEventSubscriber) -> None:
    """An engine that is still starting does not answer replay requests yet: keep trying."""
    raw = zmq.Context.instance().socket(zmq.PUB)
    port = raw.bind_to_random_port("tcp://127.0.0.1")
    replay_port = free_port()  # nothing listens there yet
    sub.replay_timeout_s = 0.2
    pub = None
    try:
        sub.add_pod(POD, f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{replay_port}")
        wait_for(lambda: connected(sub) and sub.stats()[POD].replays >= 2)
        assert sub.stats()[POD].errors >= 2
        pub = Publisher(free_port(), replay_port)  # now the replay endpoint comes up, with history
        early = prompt(7)
        pub.store(early)
        wait_for(lambda: holds(idx, early) == 64)
    finally:
        raw.close(linger=0)
        if pub is not None:
            pub.close()


# ---- hostile or broken pods (issue 9, case 8) ----------------------------------------------------
def _payload(tokens: list[int], first_hash: int = 0) -> bytes:
    from vllm_llmd.wire import BlockStored as WireStored
    from vllm_llmd.wire import encode_batch

    n = len(tokens) // BS
    return encode_batch([WireStored(list(range(first_hash, first_hash + n)), None, tokens, BS, None, "GPU", None)])


def test_a_garbage_frame_with_an_old_seq_does_not_wipe_a_pod_without_replay(
    idx: KVBlockIndex, sub: KVEventSubscriber
) -> None:
    raw = zmq.Context.instance().socket(zmq.PUB)
    port = raw.bind_to_random_port("tcp://127.0.0.1")
    try:
        sub.add_pod(POD, f"tcp://127.0.0.1:{port}")  # no replay endpoint
        wait_for(lambda: connected(sub))
        good = prompt(21)

        def send_until_held() -> bool:
            raw.send_multipart([TOPIC.encode(), (5).to_bytes(8, "big"), _payload(good)])
            return holds(idx, good) == 64

        wait_for(send_until_held)
        for seq in (0, 3, 5, 2**63):  # lower, equal, and absurdly high seqs with garbage payloads
            raw.send_multipart([TOPIC.encode(), seq.to_bytes(8, "big"), b"\x00\xff junk"])
        nxt = prompt(22)
        raw.send_multipart([TOPIC.encode(), (6).to_bytes(8, "big"), _payload(nxt, 100)])
        wait_for(lambda: holds(idx, nxt) == 64)
        assert holds(idx, good) == 64  # still there: garbage is not an engine restart
        s = idx.stats()
        assert s.resets == 0 and s.seq_gaps == 0 and idx.last_seq(POD) == 6
        assert sub.stats()[POD].errors >= 4
    finally:
        raw.close(linger=0)


class _FloodingReplay:
    """A replay endpoint (ROUTER) that answers with ``n`` batches, then the end marker."""

    def __init__(self, n: int, size: int = 64) -> None:
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.n, self.size, self.answered = n, size, 0
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        payload = _payload(prompt(1, self.size))
        while not self._stop:
            if not self.sock.poll(50):
                continue
            ident, _, _start = self.sock.recv_multipart()
            for seq in range(self.n):
                self.sock.send_multipart([ident, b"", TOPIC.encode(), seq.to_bytes(8, "big"), payload])
            self.sock.send_multipart([ident, b"", TOPIC.encode(), (-1).to_bytes(8, "big", signed=True), b""])
            self.answered += 1

    def close(self) -> None:
        self._stop = True
        self.thread.join(timeout=5)
        self.sock.close(linger=0)


def test_a_replay_answer_over_the_caps_is_a_failed_replay(idx: KVBlockIndex) -> None:
    """Before: replay answers were buffered without a cap."""
    sub = KVEventSubscriber(idx, reconnect_ivl_ms=50, replay_max_batches=500, replay_max_bytes=1 << 20)
    pub = zmq.Context.instance().socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    flood = _FloodingReplay(2_000)
    sub.start()
    try:
        sub.add_pod(POD, f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{flood.port}")
        wait_for(lambda: connected(sub) and sub.stats()[POD].errors >= 1 and flood.answered >= 1)
        st = sub.stats()[POD]
        assert st.replayed_batches == 0 and idx.stats().batches == 0  # nothing of the oversized answer applied
        flood.n = 100  # an answer within the caps is applied
        wait_for(lambda: sub.stats()[POD].replayed_batches == 100, timeout=15)
        assert idx.last_seq(POD) == 99
    finally:
        sub.stop()
        flood.close()
        pub.close(linger=0)
