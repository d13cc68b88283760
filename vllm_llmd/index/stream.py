"""The event stream's protocol: framing, sequence numbers, duplicates, gaps and engine restarts.

One ZMQ multipart message per batch, ``[topic, seq (8-byte big-endian), msgpack payload]``
(vLLM's ``ZmqEventPublisher``, :mod:`vllm_llmd.wire.kv_events`). Per pod, :class:`SeqState` remembers
the last applied seq and the digests of the last ``RECENT_SEQS`` batches, and classifies each new
batch (:class:`Verdict`). This module is the one owner of those rules: the index applies by them
and the subscriber decides when to ask a pod's replay endpoint by them.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import xxhash

from vllm_llmd.wire.kv_events import END_OF_REPLAY_SEQ, seq_to_bytes
from vllm_llmd.wire.topic import parse_topic

_END_OF_REPLAY = seq_to_bytes(END_OF_REPLAY_SEQ)
#: How many recent (seq, payload digest) pairs each pod remembers to tell duplicates from restarts.
RECENT_SEQS = 512


class Verdict(enum.Enum):
    NEXT = "next"  # the batch after the last applied one, or the first one
    GAP = "gap"  # seq jumped ahead: batches in between were missed
    DUPLICATE = "duplicate"  # a batch already applied (same seq, same payload): skip it
    RESTART = "restart"  # seq went back with a payload we never applied: a new engine process
    BAD = "bad"  # not a well-formed message: nothing may change because of it


@dataclass(slots=True)
class Frame:
    """One well-framed message."""

    pod: str  # the topic's "<host>:<port>"
    model: str
    seq: int
    payload: bytes

    @property
    def digest(self) -> int:
        return xxhash.xxh3_64_intdigest(self.payload)


def frame_seq(frames: Sequence[bytes]) -> int | None:
    """The seq of ``[topic, seq, payload]`` (unsigned 8-byte big-endian), ``None`` if there is no
    8-byte seq frame where it belongs."""
    if len(frames) < 3 or len(frames[1]) != 8:
        return None
    return int.from_bytes(frames[1], "big")


def is_end_of_replay(frames: Sequence[bytes]) -> bool:
    """Whether ``[topic, seq, payload]`` is the replay's end marker (seq ``-1``)."""
    return len(frames) >= 2 and frames[1] == _END_OF_REPLAY


def parse_frames(frames: Sequence[bytes]) -> Frame | None:
    """``[topic, seq, payload]`` -> :class:`Frame`; ``None`` for anything else."""
    try:
        if len(frames) != 3 or len(frames[1]) != 8 or not isinstance(frames[2], bytes):
            return None
        parsed = parse_topic(bytes(frames[0]).decode("utf-8"))
    except (TypeError, ValueError, UnicodeDecodeError):
        return None
    if parsed is None:
        return None
    return Frame(parsed[0], parsed[1], int.from_bytes(frames[1], "big"), frames[2])  # as frame_seq


class SeqState:
    """What one pod's stream has applied: the last seq and the digests of recent batches."""

    __slots__ = ("last", "recent")

    def __init__(self) -> None:
        self.last: int | None = None
        self.recent: OrderedDict[int, int] = OrderedDict()

    def classify(self, seq: int, digest: int) -> Verdict:
        last = self.last
        if last is None or seq == last + 1:
            return Verdict.NEXT
        if seq > last:
            return Verdict.GAP
        return Verdict.DUPLICATE if self.recent.get(seq) == digest else Verdict.RESTART

    def accept(self, seq: int, digest: int) -> None:
        """Record the batch ``seq`` as applied."""
        self.last = seq
        recent = self.recent
        recent[seq] = digest
        if len(recent) > RECENT_SEQS:
            recent.popitem(last=False)

    def seen(self, seq: int, digest: int) -> bool:
        return self.recent.get(seq) == digest

    def continues(self, replayed: Iterable[tuple[int, int]]) -> bool:
        """Whether a replay (``(seq, digest)`` pairs) still holds the last batch applied: same
        engine, nothing lost. ``False`` when nothing was applied yet."""
        last = self.last
        return last is not None and any(s == last and self.recent.get(s) == d for s, d in replayed)

    def reset(self) -> None:
        self.last = None
        self.recent.clear()
