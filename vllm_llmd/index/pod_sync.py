"""One pod's KV event stream applied to the index in order: live batches, gap fills and (re)syncs.

The subscriber (:mod:`.subscriber`) owns the sockets and the thread; this module owns what a batch
means for the pod's entries. The replay protocol is vLLM's ``ZmqEventPublisher``
(``vllm/distributed/kv_events.py``, ``_service_replay``): ask the pod's ROUTER with
``[b"", start_seq]``, get ``[b"", topic, seq, payload]`` for every buffered batch with seq >=
start_seq, then an end marker (fetched and bounded by :mod:`.replay`).

* on every (re)connect the pod is *synced*: replay from seq 0 and compare with what the index
  applied last (same seq, same payload digest -> same engine, apply what is new; otherwise the
  engine restarted or we missed more than its buffer holds -> drop the pod's entries and rebuild
  from the replay). This also rebuilds the index when the router restarts.
* a live batch after a gap in seq -> fetch the missing batches from the replay endpoint;
* a live batch whose seq went backwards (and is no duplicate) -> engine restart: drop the pod's
  entries, replay from 0;
* a replay that fails (times out: an engine still starting, or overloaded; or its answer is
  misframed or over the bounds of :mod:`.replay`) is retried every ``RETRY_SYNC_S`` while
  connected; a gap that could not be filled makes the next sync rebuild the pod.

Without a replay endpoint gaps are only counted, and a restart is noticed at its first batch. What
counts as a gap, a duplicate or a restart is decided by :mod:`.stream` (through
``KVBlockIndex.ingest(..., hold=True)``); only a well-formed batch can be any of them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq

from vllm_llmd.index.block_index import KVBlockIndex
from vllm_llmd.index.stream import Verdict, frame_seq

logger = logging.getLogger(__name__)

#: batches from a pod's replay endpoint with seq >= start, or ``None`` if the replay failed
Fetch = Callable[[str, int], "list[list[bytes]] | None"]


class _BatchHead(msgspec.Struct, array_like=True):
    """Only the timestamp of an ``EventBatch`` (the events stay undecoded)."""

    ts: float
    events: msgspec.Raw
    data_parallel_rank: Any = None


_head = msgspec.msgpack.Decoder(_BatchHead)
#: seconds between retries of a failed sync (replay request)
RETRY_SYNC_S = 1.0


@dataclass
class PodStats:
    endpoint: str
    replay_endpoint: str | None
    connected: bool = False
    batches: int = 0
    errors: int = 0  # malformed frames, failed replays
    reconnects: int = 0  # connects after the first
    replays: int = 0
    replayed_batches: int = 0
    restarts: int = 0
    last_seq: int | None = None
    lag_s: float | None = None  # receive time minus the batch's engine timestamp, last batch
    last_batch_at: float | None = None  # time.time() of the last live batch
    #: the index holds what the engine's replay buffer held at the last (re)connect (without a replay
    #: endpoint: the stream is connected); stays set across later disconnects
    synced: bool = False
    #: seconds from the pod's subscription to its first sync (the index rebuilt from its replay)
    sync_s: float | None = None


class PodConn:
    def __init__(self, pod: str, endpoint: str, replay: str | None, sub: zmq.Socket, mon: zmq.Socket | None) -> None:
        self.pod = pod
        self.sub = sub
        self.mon = mon
        self.stats = PodStats(endpoint, replay)
        self.ever_connected = False
        #: when to (re)try a sync that failed (replay timed out, e.g. an engine still starting)
        self.sync_due: float | None = None
        #: a gap could not be filled: the next successful sync drops the pod and rebuilds it
        self.rebuild = False
        self.added_at = time.monotonic()

    def mark_synced(self) -> None:
        """(Under the stats lock.)"""
        st = self.stats
        if not st.synced:
            st.synced = True
            st.sync_s = time.monotonic() - self.added_at


class PodSync:
    """Applies every pod's batches to ``index``; the counters in :class:`PodStats` under ``stats_lock``."""

    def __init__(self, index: KVBlockIndex, stats_lock: threading.Lock, fetch: Fetch) -> None:
        self.index = index
        self._stats_lock = stats_lock
        self._fetch = fetch

    def on_live(self, conn: PodConn, frames: list[bytes]) -> None:
        st = conn.stats
        now = time.time()
        replay = st.replay_endpoint is not None
        verdict = self.index.ingest(conn.pod, frames, hold=replay)
        if verdict is Verdict.GAP:
            last = self.index.last_seq(conn.pod)
            self._fill(conn, 0 if last is None else last + 1)
            self.index.ingest(conn.pod, frames)  # a duplicate now, unless the replay failed
        elif verdict is Verdict.RESTART:
            logger.info(
                "kv subscriber: %s restarted (seq %s after %s); rebuilding from replay",
                conn.pod,
                frame_seq(frames),
                self.index.last_seq(conn.pod),
            )
            with self._stats_lock:
                st.restarts += 1
            self.index.reset_pod(conn.pod)
            self._fill(conn, 0)
            self.index.ingest(conn.pod, frames)
        elif verdict is Verdict.BAD:
            with self._stats_lock:
                st.errors += 1
            return
        lag = None
        try:
            lag = max(0.0, now - _head.decode(frames[2]).ts)
        except Exception:
            pass
        with self._stats_lock:
            st.batches += 1
            st.last_seq = self.index.last_seq(conn.pod)
            st.last_batch_at = now
            if lag is not None:
                st.lag_s = lag

    def _replay(self, conn: PodConn, start: int) -> list[list[bytes]] | None:
        """Batches with seq >= start from the pod's replay endpoint, counted; ``None`` if that failed
        (then a sync is retried in ``RETRY_SYNC_S``)."""
        endpoint = conn.stats.replay_endpoint
        got = None if endpoint is None else self._fetch(endpoint, start)
        with self._stats_lock:
            conn.stats.replays += 1
            if got is None:
                conn.stats.errors += 1
        if got is None:
            conn.sync_due = time.monotonic() + RETRY_SYNC_S
        return got

    def _replayed(self, conn: PodConn, got: list[list[bytes]]) -> None:
        with self._stats_lock:
            conn.stats.replayed_batches += len(got)
            conn.stats.last_seq = self.index.last_seq(conn.pod)
            conn.mark_synced()

    def _fill(self, conn: PodConn, start: int) -> None:
        """Apply the batches from ``start`` on; if the replay buffer no longer reaches back to
        ``start``, the missed blocks are unknowable: drop the pod and rebuild from the buffer."""
        got = self._replay(conn, start)
        if got is None:
            conn.rebuild = True  # the missing batches are unknown: rebuild once a replay works
            return
        first = frame_seq(got[0]) if got else None
        if start > 0 and first is not None and first > start:
            logger.info("kv subscriber: %s replay buffer starts after seq %d; resyncing", conn.pod, start)
            self.index.reset_pod(conn.pod)
        for frames in got:
            if (frame_seq(frames) or 0) >= start:
                self.index.ingest(conn.pod, frames)
        self._replayed(conn, got)

    def sync(self, conn: PodConn) -> None:
        """On (re)connect: bring the pod's entries in line with the engine's replay buffer."""
        if conn.stats.replay_endpoint is None:
            return
        got = self._replay(conn, 0)
        if got is None:
            return
        conn.sync_due = None
        last = self.index.last_seq(conn.pod)
        if conn.rebuild:
            conn.rebuild = False
            self.index.reset_pod(conn.pod)
            last = None
        if last is not None and not self.index.continues(conn.pod, got):
            logger.info("kv subscriber: %s has a new engine or lost history; rebuilding", conn.pod)
            with self._stats_lock:
                conn.stats.restarts += 1
            self.index.reset_pod(conn.pod)
            last = None
        for frames in got:
            if last is None or (frame_seq(frames) or 0) > last:
                self.index.ingest(conn.pod, frames)
        self._replayed(conn, got)
