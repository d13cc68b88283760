"""KV event publisher of a simulated engine: vLLM's ``ZmqEventPublisher`` on asyncio.

Follows ``vllm/distributed/kv_events.py`` of vLLM 0.32: a PUB socket bound to the events endpoint
sends ``[topic, seq (8-byte big-endian), msgpack(KVEventBatch)]`` per engine step with events, seq
counting from 0; the batch is ``[ts, [events...], data_parallel_rank]`` with rank 0 filled in. The
last ``buffer_steps`` batches are kept; a ROUTER socket on the replay endpoint answers
``[client, b"", start_seq]`` with every kept batch whose seq >= start_seq as
``[client, b"", topic, seq, payload]`` and then ``[client, b"", b"", seq -1, b""]``
(``_service_replay``). A malformed replay request is ignored, as vLLM does. Wire types come from
:mod:`vllm_llmd.wire`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque

import msgspec
import zmq
import zmq.asyncio

from vllm_llmd.sim.kv_cache import Event
from vllm_llmd.wire import KVEventBatch, seq_to_bytes
from vllm_llmd.wire.kv_events import END_OF_REPLAY_SEQ

log = logging.getLogger(__name__)


class EventPublisher:
    """PUB + replay ROUTER for one pod; ``publish`` never blocks (PUB drops above its HWM)."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        endpoint: str,
        replay_endpoint: str | None,
        topic: str,
        buffer_steps: int = 10_000,
        hwm: int = 100_000,
    ) -> None:
        self.topic = topic.encode()
        self._pub = ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.bind(endpoint)
        self._replay: zmq.asyncio.Socket | None = None
        if replay_endpoint is not None:
            self._replay = ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(replay_endpoint)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._seq = 0
        self._encoder = msgspec.msgpack.Encoder()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.replays = 0

    def start(self) -> None:
        if self._replay is not None:
            self._task = asyncio.get_running_loop().create_task(self._serve_replay(), name="sim-replay")

    def publish(self, events: list[Event]) -> None:
        payload = self._encoder.encode(KVEventBatch(ts=time.time(), events=events, data_parallel_rank=0))
        seq = self._seq
        self._seq += 1
        try:
            self._pub.send_multipart((self.topic, seq_to_bytes(seq), payload), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # above the HWM a PUB socket drops, as vLLM's does
        self._buffer.append((seq, payload))
        self.batches += 1

    async def _serve_replay(self) -> None:
        assert self._replay is not None
        end = seq_to_bytes(END_OF_REPLAY_SEQ)
        while True:
            frames = await self._replay.recv_multipart()
            if len(frames) != 3:
                log.warning("invalid replay request (%d frames)", len(frames))
                continue
            client, _, raw = frames
            start = int.from_bytes(raw, "big")
            self.replays += 1
            for seq, payload in list(self._buffer):
                if seq >= start:
                    await self._replay.send_multipart((client, b"", self.topic, seq_to_bytes(seq), payload))
            await self._replay.send_multipart((client, b"", b"", end, b""))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pub.close(0)
        if self._replay is not None:
            self._replay.close(0)
