"""Ask a pod's replay endpoint for the batches it still buffers, within fixed bounds.

vLLM's ``ZmqEventPublisher`` (vllm/distributed/kv_events.py, ``_service_replay``) answers a DEALER's
``[b"", start_seq]`` on its ROUTER with one ``[b"", topic, seq, payload]`` message per buffered batch
from ``start_seq`` on (``buffer_steps``, default 10,000) and ends with seq ``-1``.

Everything here is bounded, because the answer comes from the network: each frame by ZMQ's
``MAXMSGSIZE`` (``max_message_bytes``), the answer by ``max_batches`` batches and ``max_bytes``
payload bytes, and each wait by ``timeout_s``. An answer over a bound is a failed replay (``None``),
as is a misframed message or a timeout; the caller retries later.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import zmq

from vllm_llmd.index.stream import is_end_of_replay
from vllm_llmd.wire.curve import CurveClient
from vllm_llmd.wire.logs import LogLimiter

logger = logging.getLogger(__name__)
_warn = LogLimiter(logger)

#: defaults: a little over vLLM's default buffer of 10,000 batches; 256 MiB of payloads
MAX_BATCHES = 20_000
MAX_BYTES = 256 << 20
#: largest frame accepted on event sockets (a BlockStored of a 1M-token prompt is ~4 MB)
MAX_MESSAGE_BYTES = 64 << 20


@dataclass(frozen=True)
class ReplayLimits:
    timeout_s: float = 2.0
    max_batches: int = MAX_BATCHES
    max_bytes: int = MAX_BYTES
    max_message_bytes: int = MAX_MESSAGE_BYTES


def fetch_replay(
    ctx: zmq.Context, endpoint: str, start: int, limits: ReplayLimits, curve: CurveClient | None = None
) -> list[list[bytes]] | None:
    """Batches ``[topic, seq, payload]`` with seq >= ``start``, or ``None`` if the replay failed."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, limits.max_message_bytes)
    out: list[list[bytes]] = []
    nbytes = 0
    try:
        if curve is not None:
            curve.apply(sock)
        sock.connect(endpoint)
        sock.send_multipart([b"", start.to_bytes(8, "big")])
        deadline = time.monotonic() + limits.timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(int(remaining * 1000) + 1):
                _warn.warning("kv subscriber: replay from %s timed out", endpoint)
                return None
            msg = sock.recv_multipart()
            if len(msg) != 4 or msg[0] != b"" or len(msg[2]) != 8:
                _warn.warning("kv subscriber: malformed replay message from %s (%d frames)", endpoint, len(msg))
                return None
            if is_end_of_replay(msg[1:]):
                return out
            nbytes += len(msg[3]) + len(msg[1])
            if len(out) >= limits.max_batches or nbytes > limits.max_bytes:
                _warn.warning(
                    "kv subscriber: replay from %s exceeds %d batches / %d bytes; treated as failed",
                    endpoint,
                    limits.max_batches,
                    limits.max_bytes,
                )
                return None
            out.append(msg[1:])
            deadline = time.monotonic() + limits.timeout_s
    except zmq.ZMQError as exc:
        _warn.warning("kv subscriber: replay from %s failed: %s", endpoint, exc)
        return None
    finally:
        sock.close(linger=0)
