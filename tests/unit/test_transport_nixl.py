"""NixlTransport for real: NIXL's UCX backend moving host memory between two processes.

The remote endpoint is a child process (the "prefill worker") that registers random bytes and
answers commands on stdin; the test process is the "decode worker". Metadata crosses as the
connector ships it: NIXL's agent-metadata blob plus our msgspec region table.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import numpy as np
import pytest
from vllm_llmd.connectors.transports import MemoryKind, Region, TransportError, XferState, make_transport
from vllm_llmd.connectors.transports.nixl import NixlTransport

from vllm_llmd.testing.wait import wait_until

pytestmark = pytest.mark.nixl

NUM_REGIONS = 2
NUM_BLOCKS = 8
BLOCK_LEN = 4096
SEED = 99
#: the connector's default transfer_timeout_seconds (connectors/config.py)
TRANSFER_TIMEOUT = 30.0

# The child: register NUM_REGIONS x NUM_BLOCKS x BLOCK_LEN random bytes, print its metadata, then
# answer one JSON command per stdin line ("notifs", "digest", "active", "hold", "quit"). Between
# commands its main thread blocks on stdin: only its transport's progress thread drives its UCX.
PEER_SCRIPT = r"""
import hashlib, json, sys
import msgspec, numpy as np
from vllm_llmd.connectors.transports import MemoryKind, Region, make_transport

n_regions, n_blocks, block_len, seed = (int(x) for x in sys.argv[1:5])
rng = np.random.default_rng(seed)
bufs = [rng.integers(0, 256, size=n_blocks * block_len, dtype=np.uint8) for _ in range(n_regions)]
regions = [Region(base_addr=b.ctypes.data, num_blocks=n_blocks, block_len=block_len) for b in bufs]
t = make_transport("nixl", MemoryKind.DRAM)
t.register(regions)
print(json.dumps({"metadata": t.local_metadata().hex(), "regions": msgspec.json.encode(regions).decode(),
                  "name": t._agent.name if hasattr(t._agent, "name") else ""}), flush=True)
notifs = []
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "notifs":
        notifs.extend([p, m.decode()] for p, m in t.get_notifs())
        print(json.dumps({"notifs": notifs}), flush=True)
    elif cmd["op"] == "digest":
        r, b = cmd["region"], cmd["block"]
        data = bufs[r][b * block_len:(b + 1) * block_len].tobytes()
        print(json.dumps({"sha": hashlib.sha256(data).hexdigest()}), flush=True)
    elif cmd["op"] == "active":  # the worker's in-flight hint: False parks our progress thread
        t.set_active(cmd["on"])
        print(json.dumps({"parks": t._progress.parks}), flush=True)
    elif cmd["op"] == "hold":  # a read window, as the side channel opens one (read_windows.py)
        import time
        t.hold_until(time.monotonic() + cmd["seconds"])
        print(json.dumps({"parks": t._progress.parks}), flush=True)
    elif cmd["op"] == "quit":
        break
t.close()
"""


def _expected() -> list[np.ndarray]:
    rng = np.random.default_rng(SEED)
    return [rng.integers(0, 256, size=NUM_BLOCKS * BLOCK_LEN, dtype=np.uint8) for _ in range(NUM_REGIONS)]


class RemotePeer:
    """A child process holding registered memory behind its own NIXL agent."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PEER_SCRIPT, str(NUM_REGIONS), str(NUM_BLOCKS), str(BLOCK_LEN), str(SEED)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        hello = self._reply()
        self.metadata = bytes.fromhex(hello["metadata"])
        self.regions = msgspec.json.decode(hello["regions"], type=list[Region])

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # NIXL/UCX may log on stdout too
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"peer process exited ({self.proc.poll()})")

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask(op="quit")
            except (BrokenPipeError, RuntimeError):
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def _until(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    return wait_until(predicate, timeout, interval=0.01)


def _wait(transport: NixlTransport, handle: object, timeout: float = 10.0) -> XferState:
    """The transfer's final state, or ``PENDING`` if it did not finish within ``timeout``."""

    def finished() -> XferState | None:
        state = transport.poll(handle)
        return None if state == XferState.PENDING else state

    try:
        return wait_until(finished, timeout, "transfer finished", interval=0.001)
    except AssertionError:
        return XferState.PENDING


class Local:
    def __init__(self) -> None:
        self.bufs = [np.zeros(NUM_BLOCKS * BLOCK_LEN, dtype=np.uint8) for _ in range(NUM_REGIONS)]
        self.regions = [Region(base_addr=b.ctypes.data, num_blocks=NUM_BLOCKS, block_len=BLOCK_LEN) for b in self.bufs]
        transport = make_transport("nixl", MemoryKind.DRAM)
        assert isinstance(transport, NixlTransport)
        self.transport = transport
        self.transport.register(self.regions)

    def block(self, region: int, block: int) -> np.ndarray:
        return self.bufs[region][block * BLOCK_LEN : (block + 1) * BLOCK_LEN]


@pytest.fixture(scope="module")
def remote() -> Iterator[RemotePeer]:
    peer = RemotePeer()
    yield peer
    peer.close()


@pytest.fixture
def local() -> Iterator[Local]:
    side = Local()
    yield side
    side.transport.close()


def test_read_scattered_blocks_arrive_exactly_and_notify(remote: RemotePeer, local: Local) -> None:
    peer = local.transport.add_peer(remote.metadata, remote.regions)
    assert local.transport.regions == tuple(local.regions)
    remote_pairs = [(0, 5), (0, 1), (1, 7), (1, 0), (0, 3)]
    local_pairs = [(1, 2), (0, 0), (0, 6), (1, 4), (0, 7)]
    handle = local.transport.read_blocks(peer, local_pairs, remote_pairs, notif=b"llmd:done:req-1")
    assert _wait(local.transport, handle) == XferState.DONE
    assert local.transport.poll(handle) == XferState.DONE  # polling again must not notify again
    local.transport.release(handle)

    expected = _expected()
    for (lr, lb), (rr, rb) in zip(local_pairs, remote_pairs, strict=True):
        want = expected[rr][rb * BLOCK_LEN : (rb + 1) * BLOCK_LEN]
        assert np.array_equal(local.block(lr, lb), want), f"local ({lr},{lb}) != remote ({rr},{rb})"
    untouched = [(r, b) for r in range(NUM_REGIONS) for b in range(NUM_BLOCKS) if (r, b) not in local_pairs]
    assert all(not local.block(r, b).any() for r, b in untouched), "a block outside the read was written"

    # the notification reaches the prefill side, from this agent, exactly once (a later message from
    # the same agent arrives after it: once that one is in, a duplicate would be too)
    local.transport.notify(peer, b"marker")
    notifs = _until(lambda: (n := remote.ask(op="notifs")["notifs"]) and n[-1][1] == "marker" and n)
    assert [n for n in notifs if n[1] == "llmd:done:req-1"] == [[local.transport.agent_name, "llmd:done:req-1"]]


def test_write_blocks_and_standalone_notify(remote: RemotePeer, local: Local) -> None:
    peer = local.transport.add_peer(remote.metadata, remote.regions)
    rng = np.random.default_rng(5)
    local.block(0, 2)[:] = rng.integers(0, 256, size=BLOCK_LEN, dtype=np.uint8)
    handle = local.transport.write_blocks(peer, [(0, 2)], [(1, 6)])
    assert _wait(local.transport, handle) == XferState.DONE
    local.transport.release(handle)
    assert remote.ask(op="digest", region=1, block=6)["sha"] == hashlib.sha256(local.block(0, 2).tobytes()).hexdigest()

    local.transport.notify(peer, b"llmd:done:standalone")
    _until(lambda: any(n[1] == "llmd:done:standalone" for n in remote.ask(op="notifs")["notifs"]))


def test_adding_the_same_peer_twice_reuses_it(remote: RemotePeer, local: Local) -> None:
    first = local.transport.add_peer(remote.metadata, remote.regions)
    second = local.transport.add_peer(remote.metadata, remote.regions)
    assert first == second
    local.transport.remove_peer(first)
    local.transport.remove_peer(first)  # idempotent
    with pytest.raises(TransportError, match="unknown peer"):
        local.transport.read_blocks(first, [(0, 0)], [(0, 0)])


def test_blocks_outside_the_registered_regions_are_refused(remote: RemotePeer, local: Local) -> None:
    peer = local.transport.add_peer(remote.metadata, remote.regions)
    with pytest.raises(TransportError, match="outside the registered regions"):
        local.transport.read_blocks(peer, [(0, 0)], [(0, NUM_BLOCKS)])
    with pytest.raises(TransportError, match="outside the registered regions"):
        local.transport.read_blocks(peer, [(NUM_REGIONS, 0)], [(0, 0)])
    with pytest.raises(TransportError, match="outside the registered regions"):
        local.transport.read_blocks(peer, [(0, -1)], [(0, 0)])
    with pytest.raises(TransportError, match="1 local blocks but 2 remote"):
        local.transport.read_blocks(peer, [(0, 0)], [(0, 0), (0, 1)])


def test_a_region_table_beyond_the_peers_registered_memory_is_refused(remote: RemotePeer, local: Local) -> None:
    """A peer cannot make us read memory it did not register (NIXL checks against its metadata)."""
    r = remote.regions[0]
    lying = [Region(base_addr=r.base_addr, num_blocks=r.num_blocks * 1000, block_len=r.block_len), *remote.regions[1:]]
    with pytest.raises(TransportError, match="does not match the memory it registered"):
        local.transport.add_peer(remote.metadata, lying)
    # the half-added peer was dropped: the honest table is accepted afterwards and works
    peer = local.transport.add_peer(remote.metadata, remote.regions)
    handle = local.transport.read_blocks(peer, [(0, 0)], [(0, 0)])
    assert _wait(local.transport, handle) == XferState.DONE
    local.transport.release(handle)


def test_garbage_metadata_is_rejected_with_a_clear_error(local: Local) -> None:
    regions = [Region(base_addr=4096, num_blocks=1, block_len=4096)]
    for garbage in (b"", b"\x00" * 64, os.urandom(512), b"not nixl metadata at all"):
        with pytest.raises(TransportError, match="NIXL rejected the peer's agent metadata"):
            local.transport.add_peer(garbage, regions)


def test_register_rules() -> None:
    t = make_transport("nixl", MemoryKind.DRAM)
    buf = np.zeros(BLOCK_LEN, dtype=np.uint8)
    try:
        with pytest.raises(TransportError, match="register memory before adding peers"):
            t.add_peer(b"x", [])
        with pytest.raises(TransportError, match="nothing to register"):
            t.register([])
        t.register([Region(base_addr=buf.ctypes.data, num_blocks=1, block_len=BLOCK_LEN)])
        with pytest.raises(TransportError, match="already registered"):
            t.register([Region(base_addr=buf.ctypes.data, num_blocks=1, block_len=BLOCK_LEN)])
    finally:
        t.close()
    with pytest.raises(ValueError, match="unknown KV transport"):
        make_transport("carrier-pigeon", MemoryKind.DRAM)


def test_reading_from_a_killed_peer_fails_within_the_timeout(local: Local) -> None:
    dead = RemotePeer()
    peer = local.transport.add_peer(dead.metadata, dead.regions)
    # a first read works (the endpoint is up) ...
    h = local.transport.read_blocks(peer, [(0, 0)], [(0, 0)])
    assert _wait(local.transport, h) == XferState.DONE
    local.transport.release(h)
    dead.kill()

    # ... then the process dies: the next read must fail (at post or poll), not hang
    outcome: dict[str, Any] = {}

    def attempt() -> None:
        t0 = time.monotonic()
        try:
            handle = local.transport.read_blocks(peer, [(0, 1), (1, 1)], [(0, 1), (1, 1)], notif=b"llmd:done:x")
        except TransportError as exc:
            outcome["error"] = str(exc)
        else:
            outcome["state"] = _wait(local.transport, handle, timeout=TRANSFER_TIMEOUT)
            local.transport.release(handle)
        outcome["seconds"] = time.monotonic() - t0

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=TRANSFER_TIMEOUT + 15)
    assert not worker.is_alive(), "reading from a dead peer hung"
    assert "error" in outcome or outcome["state"] == XferState.FAILED, outcome
    assert outcome["seconds"] < TRANSFER_TIMEOUT
    if "error" in outcome:
        assert peer.name in outcome["error"]
    local.transport.remove_peer(peer)


def test_the_progress_thread_parks_while_nothing_is_in_flight(local: Local) -> None:
    """Idle cost: ``set_active(False)`` stops the background progress polls (each one wakes a thread
    and takes the GIL on the engine's core); ``set_active(True)`` resumes them."""
    t = local.transport
    calls = [0]
    collect = t._collect_notifs

    def counting() -> None:
        calls[0] += 1
        collect()

    t._collect_notifs = counting  # type: ignore[method-assign]
    _until(lambda: calls[0] >= 5)  # active by default: polls every progress interval
    t.set_active(False)
    parked_at = calls[0]
    window = time.monotonic() + 0.3  # a measurement window, not a wait for an event
    while time.monotonic() < window:
        time.sleep(0.05)  # pacing: the window is one in which no poll may happen
    assert calls[0] <= parked_at + 1, "polls continued while parked"  # at most the poll in progress
    t.set_active(True)
    _until(lambda: calls[0] >= parked_at + 5)
    t.set_active(False)
    t.close()  # a parked thread still stops at close
    assert t._progress is None


def test_a_hold_wakes_a_parked_progress_thread_until_its_deadline(local: Local) -> None:
    """A read window (``hold_until``) wakes a parked thread at once and lets it park again at its
    deadline; a deadline in the past wakes nothing."""
    t = local.transport
    assert t._progress is not None
    t.set_active(False)
    _until(lambda: not t._progress.awake() and t._progress.parks >= 1)
    parks = t._progress.parks
    t.hold_until(time.monotonic() - 1.0)
    assert not t._progress.awake()
    t.hold_until(time.monotonic() + 0.3)
    assert t._progress.awake()
    _until(lambda: t._progress.parks == parks + 1)  # parked again once the window ended
    assert not t._progress.awake()


def test_a_read_from_a_parked_peer_waits_for_it_and_completes_in_a_read_window(local: Local) -> None:
    """Why the thread may not simply park while the worker holds no lease (the bug of the first
    parking attempt): a READ from a peer whose UCX nobody progresses does not complete (the
    endpoint's wire-up, and the data over TCP, need the target). A fresh peer process parks its
    progress thread; our read stays pending until the peer opens a read window, then lands."""
    peer_proc = RemotePeer()
    try:
        assert peer_proc.ask(op="active", on=False)["parks"] >= 0
        peer = local.transport.add_peer(peer_proc.metadata, peer_proc.regions)
        handle = local.transport.read_blocks(peer, [(0, 1)], [(1, 3)])
        assert _wait(local.transport, handle, timeout=1.0) == XferState.PENDING
        peer_proc.ask(op="hold", seconds=30.0)
        assert _wait(local.transport, handle) == XferState.DONE
        local.transport.release(handle)
        assert np.array_equal(local.block(0, 1), _expected()[1][3 * BLOCK_LEN : 4 * BLOCK_LEN])
        local.transport.remove_peer(peer)
    finally:
        peer_proc.close()
