"""KVEventSubscriber: one ZMQ SUB per pod, feeding a :class:`KVBlockIndex` in order, in a thread.

Per pod: a SUB socket on the pod's publisher (vLLM's ``ZmqEventPublisher``,
``vllm/distributed/kv_events.py``; ZMQ reconnects on its own with exponential backoff,
``RECONNECT_IVL`` .. ``RECONNECT_IVL_MAX``), a socket monitor that reports each (re)connect, and,
when given, the pod's replay endpoint (a ROUTER; asked with a short-lived DEALER by :mod:`.replay`).
This module owns the sockets, the thread and its commands; what each batch, gap, restart and
(re)connect means for the pod's entries is :mod:`.pod_sync`'s.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import zmq
from zmq.utils.monitor import recv_monitor_message

from vllm_llmd.index.block_index import KVBlockIndex
from vllm_llmd.index.pod_sync import PodConn, PodStats, PodSync
from vllm_llmd.index.replay import MAX_BATCHES, MAX_BYTES, MAX_MESSAGE_BYTES, ReplayLimits, fetch_replay
from vllm_llmd.wire.curve import CurveClient, client_from_env

logger = logging.getLogger(__name__)


_HANDSHAKE = getattr(zmq, "EVENT_HANDSHAKE_SUCCEEDED", zmq.EVENT_CONNECTED)


class KVEventSubscriber:
    def __init__(
        self,
        index: KVBlockIndex,
        *,
        replay_timeout_s: float = 2.0,
        reconnect_ivl_ms: int = 100,
        reconnect_ivl_max_ms: int = 5000,
        context: zmq.Context | None = None,
        replay_max_batches: int = MAX_BATCHES,
        replay_max_bytes: int = MAX_BYTES,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        curve: CurveClient | Literal["env"] | None = "env",
    ) -> None:
        """``replay_max_batches`` / ``replay_max_bytes``: a replay answer beyond either is a failed
        replay; ``max_message_bytes``: largest frame accepted on the event and replay sockets;
        ``curve``: CURVE client keys for every pod (default: from ``LLMD_CURVE_SERVER_PUBLIC`` /
        ``LLMD_CURVE_CLIENT_SECRET``, :mod:`vllm_llmd.wire.curve`; ``None``: plain text)."""
        self.index = index
        self.curve = client_from_env() if curve == "env" else curve
        self.limits = ReplayLimits(replay_timeout_s, replay_max_batches, replay_max_bytes, max_message_bytes)
        self.reconnect_ivl_ms = reconnect_ivl_ms
        self.reconnect_ivl_max_ms = reconnect_ivl_max_ms
        self._ctx = context or zmq.Context.instance()
        self._cmds: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]]] = queue.SimpleQueue()
        self._conns: dict[str, PodConn] = {}
        self._stats_lock = threading.Lock()
        self._pods = PodSync(index, self._stats_lock, self._fetch)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_addr = f"inproc://kv-sub-wake-{id(self)}"
        self._wake_recv = self._ctx.socket(zmq.PULL)
        self._wake_recv.bind(self._wake_addr)
        self._wake_send_lock = threading.Lock()
        self._wake_send = self._ctx.socket(zmq.PUSH)
        self._wake_send.connect(self._wake_addr)

    # ------------------------------------------------------------- public API

    @property
    def replay_timeout_s(self) -> float:
        return self.limits.timeout_s

    @replay_timeout_s.setter
    def replay_timeout_s(self, value: float) -> None:
        self.limits = dataclasses.replace(self.limits, timeout_s=value)

    def add_pod(self, pod: str, endpoint: str, replay_endpoint: str | None = None) -> None:
        self._command(self._do_add, pod, endpoint, replay_endpoint)

    def remove_pod(self, pod: str) -> None:
        self._command(self._do_remove, pod)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="kv-event-subscriber", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for conn in list(self._conns.values()):
            self._close(conn)
        self._conns.clear()
        with self._wake_send_lock:
            self._wake_send.close(linger=0)
        self._wake_recv.close(linger=0)

    def stats(self) -> dict[str, PodStats]:
        with self._stats_lock:
            return {pod: PodStats(**vars(c.stats)) for pod, c in self._conns.items()}

    def synced(self, pod: str) -> bool:
        """Whether ``pod``'s stream has been synced (:attr:`PodStats.synced`); ``False`` if unknown."""
        with self._stats_lock:
            conn = self._conns.get(pod)
            return conn is not None and conn.stats.synced

    def sync_seconds(self) -> float | None:
        """The longest time a pod subscribed now took from its subscription to its first sync (a
        router's index rebuild time at start-up); ``None`` until every pod has synced once."""
        with self._stats_lock:
            times = [c.stats.sync_s for c in self._conns.values()]
        if not times or any(t is None for t in times):
            return None
        return max(t for t in times if t is not None)

    @property
    def alive(self) -> bool:
        """The subscriber thread runs (``False`` before :meth:`start` and after :meth:`stop` or a crash)."""
        return self._thread is not None and self._thread.is_alive()

    # -------------------------------------------------------------- internals

    def _fetch(self, endpoint: str, start: int) -> list[list[bytes]] | None:
        return fetch_replay(self._ctx, endpoint, start, self.limits, self.curve)

    def _command(self, fn: Callable[..., None], *args: Any) -> None:
        self._cmds.put((fn, args))
        self._wake()

    def _wake(self) -> None:
        with self._wake_send_lock:
            try:
                self._wake_send.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def _do_add(self, pod: str, endpoint: str, replay: str | None) -> None:
        if pod in self._conns:
            self._do_remove(pod)
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 100_000)
        sub.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
        sub.setsockopt(zmq.RECONNECT_IVL, self.reconnect_ivl_ms)
        sub.setsockopt(zmq.RECONNECT_IVL_MAX, self.reconnect_ivl_max_ms)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        if self.curve is not None:
            self.curve.apply(sub)
        mon = None
        try:
            mon = sub.get_monitor_socket(_HANDSHAKE | zmq.EVENT_DISCONNECTED)
        except zmq.ZMQError as exc:  # pragma: no cover - monitoring unsupported
            logger.warning("kv subscriber: no socket monitor for %s: %s", pod, exc)
        try:
            sub.connect(endpoint)
        except zmq.ZMQError as exc:
            logger.error("kv subscriber: cannot connect to %s (%s): %s", pod, endpoint, exc)
            sub.close(linger=0)
            if mon is not None:
                mon.close(linger=0)
            return
        with self._stats_lock:
            self._conns[pod] = PodConn(pod, endpoint, replay, sub, mon)

    def _close(self, conn: PodConn) -> None:
        try:
            if conn.mon is not None:
                conn.sub.disable_monitor()
                conn.mon.close(linger=0)
        except zmq.ZMQError:
            pass
        conn.sub.close(linger=0)

    def _do_remove(self, pod: str) -> None:
        with self._stats_lock:
            conn = self._conns.pop(pod, None)
        if conn is not None:
            self._close(conn)
        self.index.remove_pod(pod)

    def _run(self) -> None:
        poller = zmq.Poller()
        registered: set[int] = set()
        poller.register(self._wake_recv, zmq.POLLIN)
        while not self._stop.is_set():
            while True:
                try:
                    fn, args = self._cmds.get_nowait()
                except queue.Empty:
                    break
                try:
                    fn(*args)
                except Exception:
                    logger.exception("kv subscriber: command failed")
            # keep the poller in step with the pods
            wanted: dict[int, tuple[zmq.Socket, PodConn, bool]] = {}
            for conn in self._conns.values():
                wanted[id(conn.sub)] = (conn.sub, conn, False)
                if conn.mon is not None:
                    wanted[id(conn.mon)] = (conn.mon, conn, True)
            for sid in list(registered):
                if sid not in wanted:
                    registered.discard(sid)
            poller = zmq.Poller()
            poller.register(self._wake_recv, zmq.POLLIN)
            for sock, _, _ in wanted.values():
                poller.register(sock, zmq.POLLIN)
            registered = set(wanted)
            try:
                ready = dict(poller.poll(500))
            except zmq.ZMQError:
                if self._stop.is_set():
                    break
                raise
            if self._wake_recv in ready:
                while True:
                    try:
                        self._wake_recv.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
            for sock, conn, is_mon in wanted.values():
                if sock not in ready or conn.pod not in self._conns:
                    continue
                try:
                    if is_mon:
                        self._on_monitor(conn)
                    else:
                        self._drain(conn)
                except Exception:
                    logger.exception("kv subscriber: error handling %s", conn.pod)
                    with self._stats_lock:
                        conn.stats.errors += 1
            now = time.monotonic()
            for conn in list(self._conns.values()):
                if conn.sync_due is not None and conn.sync_due <= now and conn.stats.connected:
                    try:
                        self._pods.sync(conn)
                    except Exception:
                        logger.exception("kv subscriber: sync of %s failed", conn.pod)

    def _on_monitor(self, conn: PodConn) -> None:
        assert conn.mon is not None
        while True:
            try:
                evt = recv_monitor_message(conn.mon, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = evt.get("event")
            if kind == _HANDSHAKE or (kind == zmq.EVENT_CONNECTED and _HANDSHAKE == zmq.EVENT_CONNECTED):
                with self._stats_lock:
                    conn.stats.connected = True
                    if conn.ever_connected:
                        conn.stats.reconnects += 1
                    if conn.stats.replay_endpoint is None:
                        conn.mark_synced()
                conn.ever_connected = True
                self._pods.sync(conn)
            elif kind == zmq.EVENT_DISCONNECTED:
                with self._stats_lock:
                    conn.stats.connected = False

    def _drain(self, conn: PodConn, budget: int = 1000) -> None:
        for _ in range(budget):
            try:
                frames = conn.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._pods.on_live(conn, frames)
