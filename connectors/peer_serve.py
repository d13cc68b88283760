"""Holder side of a peer load: pin DRAM-tier blocks for a peer under a short lease.

A pod that loads a prefix from a peer (docs/peer-loading.md) reads the peer's **DRAM tier**
(vLLM's offloading manager over a shared-memory region, connectors/tiers/) with one-sided NIXL
reads. Before it reads, the holder must keep those slots from being evicted or rewritten. vLLM's
primary tier does exactly that for its own loads: ``prepare_read`` ref-counts the chunks (evictable
again at ``complete_read``; vllm/v1/kv_offload/tiering/manager.py, ``CPUPrimaryTierOffloadingManager``,
and cpu/manager.py ``_prepare_load``). :class:`PeerHoldings` calls those two under the manager's lock
(``LLMDTieringManager.lock``, connectors/tiers/spec.py) from the side channel's thread, so a pin
never waits for the holder's engine to step (an idle engine core does not step: anything tied to its
scheduler would hang) and never runs inside one of the scheduler's own manager calls.

Why not vLLM 0.32's P2P tier (vllm/v1/kv_offload/tiering/p2p/): its server side answers lookups from
``serve_external_requests``, which ``TieringOffloadingManager.on_schedule_end`` calls, i.e. only
when the holder's scheduler steps; it lands peer blocks in the reader's DRAM tier and copies them
into the engine afterwards (two copies, a DRAM tier needed on the reader); and its sessions carry
their own ``kv_transfer_params`` and handshake, outside our parser, identity checks and CURVE.

**Processes.** The manager lives in the engine-core (scheduler) process, the side channel in the
worker process (vLLM's CPU platform runs its worker in a process of its own even at TP = 1). The
scheduler half runs a :class:`PinServer` thread on a private IPC socket named after the engine id
(:func:`pin_endpoint`, in a directory only this user may open); the side channel checks a peer's
request (type, bounds, the engine id it names) and forwards the same bytes there
(:func:`forward_to_scheduler`). No engine step is involved at either end.

Bounds: at most :data:`MAX_LEASES` leases at once, each at most :data:`MAX_PIN_HASHES` blocks (one
message; the side channel's 4 KiB frame bound); a lease not released by the reader expires after
its seconds (the pin server checks every poll, ~100 ms) and the blocks are evictable again.

**What the holder served** (:meth:`PeerHoldings.take_counts`, drained by the connector's scheduler
stats into ``llmd:kv_peer_pins{reader,event}`` and ``llmd:kv_peer_served_blocks/bytes{reader}``,
connectors/stats.py): pins granted or refused, leases released or expired, blocks pinned and their
bytes, per reader as the reader names itself in its pin request (its engine id; at most
:data:`MAX_READER_LABELS` distinct names, then ``other``). The holder never sees the one-sided NIXL
read itself: a block counts as served when it is pinned for the reader. The counts leave with the
connector's stats at the engine's next step (vLLM collects them in ``Scheduler.update_from_output``), so an
idle holder reports them when it next serves a request.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import zmq

logger = logging.getLogger("vllm.vllm_llmd.connectors")

#: leases held at once (a reader holds one per request being loaded, one per 64 blocks)
MAX_LEASES = 1024
#: block hashes per pin request (a vLLM block hash is 32 bytes: sha256): ~2.3 KiB
MAX_PIN_HASHES = 64
MAX_HASH_BYTES = 64
#: the side channel's wait for the scheduler's answer
FORWARD_TIMEOUT_S = 2.0
#: distinct reader names on the holder's metrics (a reader names itself: bounded, the rest ``other``)
MAX_READER_LABELS = 32
_READER_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
#: what the holder counts per reader: pins answered and leases ended (events), blocks and bytes pinned
SERVE_EVENTS = ("granted", "refused", "released", "expired")
SERVE_AMOUNTS = ("blocks", "bytes")

Hash = Annotated[bytes, msgspec.Meta(max_length=MAX_HASH_BYTES)]


class PinRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="pin"):
    """Pin the leading run of these blocks of the holder's DRAM tier for ``lease_seconds``."""

    protocol: int
    tp_rank: int
    engine_id: Annotated[str, msgspec.Meta(max_length=256)]
    hashes: Annotated[list[Hash], msgspec.Meta(min_length=1, max_length=MAX_PIN_HASHES)]
    lease_seconds: Annotated[float, msgspec.Meta(gt=0, le=600)]
    #: the reader's engine id, as it names itself (a metrics label on the holder, nothing more)
    reader: Annotated[str, msgspec.Meta(max_length=256)] = ""


class ReleaseRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="release"):
    protocol: int
    tp_rank: int
    lease_id: Annotated[int, msgspec.Meta(ge=0)]


class PinReply(msgspec.Struct, frozen=True, tag="pinned"):
    lease_id: int
    #: chunk ids of the DRAM tier holding ``hashes[:len(chunks)]``
    chunks: list[int]


class ReleaseReply(msgspec.Struct, frozen=True, tag="released"):
    ok: bool


class Refusal(msgspec.Struct, frozen=True, tag="error"):
    """Same shape and tag as the side channel's ``HandshakeRefused``."""

    reason: str


_decoder = msgspec.msgpack.Decoder(PinRequest | ReleaseRequest)
_encoder = msgspec.msgpack.Encoder()
#: longest lease a reader may ask for
MAX_LEASE_SECONDS = 60.0


def lease_span(seconds: float) -> float:
    """How long a pin asked for ``seconds`` holds (the side channel keeps UCX progress awake as long)."""
    return min(max(seconds, 0.1), MAX_LEASE_SECONDS)


class PinRefused(RuntimeError):
    """The holder cannot pin what was asked (nothing held, too many leases, ...)."""


@dataclass
class _Lease:
    keys: list[Any]
    ctx: Any
    expires: float
    reader: str


class PeerHoldings:
    """Pins of one engine's DRAM tier for peers (scheduler process, called from the side channel).
    ``block_bytes``: one block's bytes in the tier (what a pinned block offers a reader)."""

    def __init__(self, manager: Any, group_idx: int = 0, block_bytes: int = 0) -> None:
        self.manager = manager  # an LLMDTieringManager (has .lock and .primary_tier)
        self.group_idx = group_idx
        self.block_bytes = block_bytes
        self._leases: dict[int, _Lease] = {}
        self._mu = threading.Lock()
        #: ``"<reader>|<what>"`` -> count since the last :meth:`take_counts` (SERVE_EVENTS, SERVE_AMOUNTS)
        self._counts: dict[str, float] = {}
        self._readers: set[str] = set()

    def reader_label(self, reader: str) -> str:
        """The metrics label of a reader's self-declared name: itself (well-formed, among the first
        :data:`MAX_READER_LABELS` seen), ``unknown`` (none given) or ``other``."""
        if not reader:
            return "unknown"
        if not _READER_NAME.fullmatch(reader):
            return "other"
        with self._mu:
            if reader in self._readers:
                return reader
            if len(self._readers) < MAX_READER_LABELS:
                self._readers.add(reader)
                return reader
        return "other"

    def pin(self, hashes: Sequence[bytes], seconds: float, reader: str = "") -> tuple[int, list[int]]:
        """Pin the leading run of ``hashes`` that is ready in the DRAM tier: ``(lease id, chunk ids)``
        (chunk ``i`` holds block ``hashes[i]``). :class:`PinRefused` when none is, or over bounds."""
        from vllm.v1.kv_offload.base import LookupResult, ReqContext, make_offload_key

        who = self.reader_label(reader)
        if not hashes or len(hashes) > MAX_PIN_HASHES:
            self._count(who, "refused")
            raise PinRefused(f"a pin asks for 1..{MAX_PIN_HASHES} blocks, not {len(hashes)}")
        seconds = lease_span(seconds)
        with self._mu:
            if len(self._leases) >= MAX_LEASES:
                self._count_locked(who, "refused")
                raise PinRefused(f"{MAX_LEASES} peer leases already held")
            # not guessable: only the reader that was answered can release early
            lease_id = secrets.randbits(62)
        ctx = ReqContext(req_id=f"llmd-peer-{lease_id}")
        primary = self.manager.primary_tier
        with self.manager.lock:
            keys = []
            for h in hashes:
                key = make_offload_key(bytes(h), self.group_idx)
                if primary.lookup(key, ctx) != LookupResult.HIT:
                    break
                keys.append(key)
            if not keys:
                self._count(who, "refused")
                raise PinRefused("none of the blocks is in the DRAM tier")
            spec = primary.prepare_read(keys, ctx)
        chunks = [int(c) for c in spec.block_ids]
        with self._mu:
            self._leases[lease_id] = _Lease(keys, ctx, time.monotonic() + seconds, who)
            self._count_locked(who, "granted")
            self._count_locked(who, "blocks", len(keys))
            self._count_locked(who, "bytes", len(keys) * self.block_bytes)
        return lease_id, chunks

    def release(self, lease_id: int) -> bool:
        with self._mu:
            lease = self._leases.pop(lease_id, None)
        if lease is None:
            return False
        self._unpin(lease)
        self._count(lease.reader, "released")
        return True

    def expire(self, now: float | None = None) -> int:
        """Unpin leases past their time; blocks unpinned."""
        now = time.monotonic() if now is None else now
        with self._mu:
            gone = [i for i, lease in self._leases.items() if lease.expires <= now]
            leases = [self._leases.pop(i) for i in gone]
        n = 0
        for lease in leases:
            self._unpin(lease)
            self._count(lease.reader, "expired")
            n += len(lease.keys)
        if n:
            logger.info("LLMDConnector: %d peer lease(s) expired; %d DRAM-tier blocks unpinned", len(leases), n)
        return n

    def release_all(self) -> None:
        with self._mu:
            leases, self._leases = list(self._leases.values()), {}
        for lease in leases:
            self._unpin(lease)

    @property
    def held(self) -> int:
        return len(self._leases)

    def take_counts(self) -> dict[str, float]:
        """What was served since the last call: ``"<reader label>|<what>"`` -> count (``what`` one of
        :data:`SERVE_EVENTS` or :data:`SERVE_AMOUNTS`)."""
        with self._mu:
            out, self._counts = {k: v for k, v in self._counts.items() if v}, {}
        return out

    def _count(self, who: str, what: str, n: float = 1) -> None:
        with self._mu:
            self._count_locked(who, what, n)

    def _count_locked(self, who: str, what: str, n: float = 1) -> None:
        key = f"{who}|{what}"
        self._counts[key] = self._counts.get(key, 0) + n

    def _unpin(self, lease: _Lease) -> None:
        try:
            with self.manager.lock:
                self.manager.primary_tier.complete_read(lease.keys, lease.ctx)
        except Exception as exc:  # the tier was reset or shut down under the lease
            logger.warning("LLMDConnector: unpinning peer-leased blocks failed: %s", exc)


def pin_endpoint(engine_id: str) -> str:
    """The scheduler's pin socket for ``engine_id``: an IPC path in a directory only this user opens."""
    base = os.path.join(tempfile.gettempdir(), f"llmd-peer-{os.getuid()}")
    os.makedirs(base, mode=0o700, exist_ok=True)
    if os.stat(base).st_uid != os.getuid():
        raise RuntimeError(f"{base} belongs to another user")
    return f"ipc://{base}/{hashlib.sha256(engine_id.encode()).hexdigest()[:24]}.sock"


class PinServer:
    """Answers pin / release requests forwarded by the engine's side channel (scheduler process)."""

    def __init__(self, engine_id: str, holdings: PeerHoldings) -> None:
        self.holdings = holdings
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, 8192)
        self.endpoint = pin_endpoint(engine_id)
        path = self.endpoint.removeprefix("ipc://")
        if os.path.exists(path):
            os.unlink(path)
        self._sock.bind(self.endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmd-peer-pins", daemon=True)
        self._thread.start()

    def answer(self, payload: bytes) -> bytes:
        try:
            req = _decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return _encoder.encode(Refusal(f"malformed pin request: {exc}"))
        if isinstance(req, ReleaseRequest):
            return _encoder.encode(ReleaseReply(self.holdings.release(req.lease_id)))
        try:
            lease_id, chunks = self.holdings.pin(req.hashes, req.lease_seconds, req.reader)
        except PinRefused as exc:
            return _encoder.encode(Refusal(str(exc)))
        return _encoder.encode(PinReply(lease_id, chunks))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.holdings.expire()
                if not self._sock.poll(100):
                    continue
                payload = self._sock.recv()
                self._sock.send(self.answer(payload))
            except zmq.ZMQError:
                if self._stop.is_set():
                    return
            except Exception:  # never let a bug of ours stop the pins (leases still expire)
                logger.exception("LLMDConnector: peer pin server")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close(linger=0)
        self._ctx.term()
        self.holdings.release_all()
        path = self.endpoint.removeprefix("ipc://")
        if os.path.exists(path):
            os.unlink(path)


def forward_to_scheduler(engine_id: str, payload: bytes, timeout_s: float = FORWARD_TIMEOUT_S) -> bytes:
    """The side channel's half: pass a checked pin / release request to this engine's scheduler
    and return its answer (a :class:`Refusal` when the scheduler does not answer)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, 64 * 1024)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
    try:
        endpoint = pin_endpoint(engine_id)
        if not os.path.exists(endpoint.removeprefix("ipc://")):
            return _encoder.encode(Refusal("this engine serves no DRAM tier to peers"))
        sock.connect(endpoint)
        sock.send(payload)
        return sock.recv()
    except (zmq.ZMQError, OSError, RuntimeError) as exc:
        return _encoder.encode(Refusal(f"the engine's DRAM tier did not answer: {exc}"))
    finally:
        sock.close(linger=0)
