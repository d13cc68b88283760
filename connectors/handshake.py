"""The side channel: a decode worker asks a prefill worker for its transport metadata.

ZMQ ROUTER (prefill worker) / REQ (decode worker), msgspec msgpack only, typed decoding (a
malformed frame is answered with an error, never unpickled). Bounded input: ``ZMQ_MAXMSGSIZE``
bounds each frame (the server's default, 4 KiB, is ~100 times a request); the server reads a
message frame by frame and keeps at most the three frames a REQ peer sends, so a message with
thousands of frames costs only what libzmq buffers of it (ZMQ delivers a multipart message whole,
so its frame count cannot be bounded below ZMQ: a 3,000-frame message of 60 KB frames took the
server from 20 to 353 MiB before this bound; now the first such frame disconnects the peer), and
logs about dropped messages are rate-limited. The client accepts one-frame answers only.

The decode side checks that it reached the engine named in the prefill response and agrees a plan
with it (connectors/negotiate.py): move blocks as they are (same model, dtype, block size and
layout), re-lay them out on receive (same model, dtype and head layout; block size or byte order
differ: the peer's canonical :class:`~.layout.KVLayout` says where its blocks are), over a NIXL
backend both have; anything else raises :class:`HandshakeMismatch` naming every field that stands
in the way.

The same channel serves **peer loads** (docs/peer-loading.md): a reader asks the holder to pin
blocks of its DRAM tier (:class:`PinRequest`, at most :data:`MAX_PIN_HASHES` block hashes per
message so a request stays within the 4 KiB frame bound; a longer prefix takes several) and gets
the slots' chunk ids under a lease (:class:`PinReply`), reads them with NIXL, then releases the
lease (:class:`ReleaseRequest`). This channel forwards pins and releases to the engine's scheduler process
(connectors/peer_serve.py), whose own thread answers them without the engine stepping.
"""

from __future__ import annotations

import logging
import threading
from typing import TypeVar

import msgspec
import zmq
from vllm_llmd.connectors.layout import KVLayout
from vllm_llmd.connectors.negotiate import ALWAYS, DIRECT, Plan, describe_problems, negotiate
from vllm_llmd.connectors.peer_serve import (
    MAX_PIN_HASHES,
    PinReply,
    PinRequest,
    ReleaseReply,
    ReleaseRequest,
    forward_to_scheduler,
    lease_span,
)
from vllm_llmd.connectors.read_windows import ReadWindows
from vllm_llmd.connectors.transports.base import Region

from vllm_llmd.wire.curve import CurveClient, CurveServer, stop_authenticator
from vllm_llmd.wire.logs import LogLimiter

logger = logging.getLogger("vllm.vllm_llmd.connectors")

_dropped_log = LogLimiter(logger)

T = TypeVar("T")

#: 2: backends, canonical KV layout, KV group count and platform in EngineInfo (cross-layout plans)
#: 3: the DRAM tier's region and page offsets in EngineInfo; pin / release requests (peer loads)
#: 4: the reader's engine id in pin requests (the holder's metrics per reader)
PROTOCOL_VERSION = 4
#: what a REQ peer's request is on a ROUTER: [identity, b"", payload]
REQUEST_FRAMES = 3
#: largest request frame the server accepts (a request is ~30 bytes)
MAX_REQUEST_BYTES = 4096
#: fields compared before any block moves (connectors/negotiate.py decides what a difference means)
COMPAT_FIELDS = (*ALWAYS, *DIRECT)


class HandshakeError(RuntimeError):
    """The side channel failed (unreachable, timed out, garbage)."""


class HandshakeMismatch(HandshakeError):
    """The remote engine is not compatible with this one (or is not the engine expected)."""


class EngineInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a worker tells peers about its KV cache and transport endpoint."""

    protocol: int
    engine_id: str
    tp_rank: int
    model: str
    kv_dtype: str
    block_size: int
    num_layers: int
    layout: str
    block_len: int
    transport: str
    memory: str
    agent_metadata: bytes
    regions: list[Region]
    #: NIXL backends this engine can move bytes with, in its order of preference
    backends: list[str] = msgspec.field(default_factory=lambda: ["UCX"])
    #: where its blocks are, canonically (None: blocks move only to engines laid out the same)
    kv_layout: KVLayout | None = None
    num_kv_groups: int = 1
    #: "cpu", "cuda", "rbln", ... (logs and errors only)
    platform: str = ""
    #: the DRAM tier peers may read (one row of ``block_len`` bytes per chunk; None: no tier served)
    tier_region: Region | None = None
    #: where region ``r``'s page of a block sits in a DRAM-tier row (byte offset), per region
    tier_pages: list[int] = msgspec.field(default_factory=list)

    def mismatches(self, other: EngineInfo) -> dict[str, tuple[object, object]]:
        pairs = {f: (getattr(self, f), getattr(other, f)) for f in COMPAT_FIELDS}
        return {f: v for f, v in pairs.items() if v[0] != v[1]}


class HandshakeRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="get"):
    protocol: int
    tp_rank: int


class HandshakeReply(msgspec.Struct, frozen=True, tag="info"):
    info: EngineInfo


class HandshakeRefused(msgspec.Struct, frozen=True, tag="error"):
    reason: str


_req_decoder = msgspec.msgpack.Decoder(HandshakeRequest | PinRequest | ReleaseRequest)
_reply_decoder = msgspec.msgpack.Decoder(HandshakeReply | HandshakeRefused)
_pin_decoder = msgspec.msgpack.Decoder(PinReply | HandshakeRefused)
_release_decoder = msgspec.msgpack.Decoder(ReleaseReply | HandshakeRefused)
_encoder = msgspec.msgpack.Encoder()


def check_compatible(
    local: EngineInfo, remote: EngineInfo, expected_engine_id: str | None, can_relayout: bool = False
) -> Plan:
    """The plan for pulling from ``remote`` (``HandshakeMismatch`` naming every field otherwise)."""
    plan, problems = negotiate(local, remote, can_relayout=can_relayout)
    if expected_engine_id is not None and remote.engine_id != expected_engine_id:
        plan, problems = None, {"engine_id": (expected_engine_id, remote.engine_id), **problems}
    if plan is None:
        raise HandshakeMismatch(
            f"LLMDConnector handshake with engine {remote.engine_id!r} refused: {describe_problems(problems)}"
        )
    return plan


class HandshakeServer:
    """Answers :class:`HandshakeRequest` with this worker's :class:`EngineInfo` (background thread)."""

    def __init__(
        self,
        info: EngineInfo,
        host: str,
        port: int,
        max_message_bytes: int = MAX_REQUEST_BYTES,
        curve: CurveServer | None = None,
        windows: ReadWindows | None = None,
        link_seconds: float = 30.0,
    ) -> None:
        """``windows``: opened before the answer leaves, for ``link_seconds`` when a peer handshakes
        and for a pin's lease when one is granted (closed at its release), so the transport's UCX
        progress is awake when the peer reads (connectors/read_windows.py)."""
        self.info = info
        self.windows = windows
        self.link_seconds = link_seconds
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        if curve is not None:  # only clients holding the key (and listed, with an allowlist) get in
            curve.apply(self._sock)
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(f"tcp://{host}:{port if port else '*'}")
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self._reply = _encoder.encode(HandshakeReply(info))
        self._thread = threading.Thread(target=self._run, name="llmd-handshake", daemon=True)
        self._thread.start()
        self.served = 0
        self.refused = 0
        self.dropped = 0  # misframed messages (no answer)

    def _answer(self, payload: bytes) -> bytes:
        try:
            req = _req_decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.refused += 1
            return _encoder.encode(HandshakeRefused(f"malformed handshake request: {exc}"))
        if req.protocol != PROTOCOL_VERSION:
            self.refused += 1
            return _encoder.encode(
                HandshakeRefused(f"protocol {req.protocol} not supported (this engine speaks {PROTOCOL_VERSION})")
            )
        if req.tp_rank != self.info.tp_rank:
            self.refused += 1
            return _encoder.encode(HandshakeRefused(f"this side channel serves TP rank {self.info.tp_rank}"))
        if isinstance(req, PinRequest | ReleaseRequest):
            # the DRAM tier's manager lives with the engine's scheduler (another process): forward
            why = None
            if isinstance(req, PinRequest) and req.engine_id != self.info.engine_id:
                why = f"this is engine {self.info.engine_id!r}, not {req.engine_id!r}"
            elif self.info.tier_region is None:
                why = "this engine serves no DRAM tier to peers"
            if why is not None:
                self.refused += 1
                return _encoder.encode(HandshakeRefused(why))
            reply = forward_to_scheduler(self.info.engine_id, payload)
            if self.windows is not None:
                self._track(req, reply)
            return reply
        self.served += 1
        if self.windows is not None:
            self.windows.open("link", self.link_seconds)
        return self._reply

    def _track(self, req: PinRequest | ReleaseRequest, reply: bytes) -> None:
        """A granted pin opens a read window for its lease; a release closes it."""
        assert self.windows is not None
        if isinstance(req, ReleaseRequest):
            self.windows.close(f"pin:{req.lease_id}")
            return
        try:
            granted = _pin_decoder.decode(reply)  # the scheduler process's answer, typed
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if isinstance(granted, PinReply):
            self.windows.open(f"pin:{granted.lease_id}", lease_span(req.lease_seconds))

    def _recv(self) -> list[bytes] | None:
        """One message, frame by frame: its frames if it has the shape of a request, else ``None``
        (the rest of it is read and dropped without being copied)."""
        frames: list[bytes] = []
        count = 0
        more = True
        while more:
            frame = self._sock.recv(zmq.NOBLOCK, copy=False)
            more = frame.more
            count += 1
            if count <= REQUEST_FRAMES:
                frames.append(frame.bytes)
        if count != REQUEST_FRAMES or frames[1] != b"":
            self.dropped += 1
            _dropped_log.warning("LLMDConnector side channel: dropped a malformed message (%d frames)", count)
            return None
        return frames

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                if not dict(poller.poll(100)):
                    continue
                frames = self._recv()
            except zmq.ZMQError:
                if self._stop.is_set():
                    return
                continue
            if frames is None:
                continue
            try:
                self._sock.send_multipart([frames[0], b"", self._answer(frames[2])])
            except zmq.ZMQError as exc:
                _dropped_log.warning("LLMDConnector side channel: reply failed: %s", exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close(linger=0)
        stop_authenticator(self._ctx)
        self._ctx.term()


def fetch_engine_info(
    host: str,
    port: int,
    tp_rank: int,
    timeout_s: float,
    max_message_bytes: int = 4 * 1024 * 1024,
    curve: CurveClient | None = None,
) -> EngineInfo:
    """Ask the worker behind ``host:port`` for its :class:`EngineInfo` (as a CURVE client of it when
    ``curve`` is given: a server without the expected key never answers)."""
    payload = _encoder.encode(HandshakeRequest(PROTOCOL_VERSION, tp_rank))
    reply = _exchange(host, port, payload, timeout_s, curve, "handshake", _reply_decoder, max_message_bytes)
    if isinstance(reply, HandshakeRefused):
        raise HandshakeError(f"{host}:{port} refused the handshake: {reply.reason}")
    return reply.info


def _exchange(
    host: str,
    port: int,
    payload: bytes,
    timeout_s: float,
    curve: CurveClient | None,
    what: str,
    decoder: msgspec.msgpack.Decoder[T],
    max_message_bytes: int = 64 * 1024,
) -> T:
    """One REQ/REP exchange on a peer's side channel: the one-frame answer, decoded by ``decoder``
    (:class:`HandshakeError` naming ``what`` -- "handshake", "pin", "release" -- when there is no
    answer within ``timeout_s``, or it is not one frame of the expected type)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    if curve is not None:
        curve.apply(sock)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
    try:
        sock.connect(f"tcp://{host}:{port}")
        sock.send(payload)
        try:
            out = sock.recv()
        except zmq.Again as exc:
            raise HandshakeError(f"no {what} answer from {host}:{port} within {timeout_s}s") from exc
        if sock.getsockopt(zmq.RCVMORE):
            raise HandshakeError(f"malformed {what} answer from {host}:{port}: more than one frame")
    finally:
        sock.close(linger=0)
    try:
        return decoder.decode(out)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise HandshakeError(f"malformed {what} answer from {host}:{port}: {exc}") from exc


def pin_blocks(
    host: str,
    port: int,
    tp_rank: int,
    engine_id: str,
    hashes: list[bytes],
    lease_seconds: float,
    timeout_s: float,
    curve: CurveClient | None = None,
    reader: str = "",
) -> list[tuple[int, list[int]]]:
    """Pin ``hashes`` in the DRAM tier of the engine behind ``host:port`` (``MAX_PIN_HASHES`` per
    message): ``[(lease id, chunk ids), ...]`` covering the leading run it holds (stops at the first
    message answered short). :class:`HandshakeError` if the first message is refused; leases already
    taken when a later message fails are released before raising. ``reader``: this engine's id (the
    holder counts what it serves per reader)."""
    leases: list[tuple[int, list[int]]] = []
    try:
        for i in range(0, len(hashes), MAX_PIN_HASHES):
            part = hashes[i : i + MAX_PIN_HASHES]
            payload = _encoder.encode(PinRequest(PROTOCOL_VERSION, tp_rank, engine_id, part, lease_seconds, reader))
            reply = _exchange(host, port, payload, timeout_s, curve, "pin", _pin_decoder)
            if isinstance(reply, HandshakeRefused):
                if leases:
                    break
                raise HandshakeError(f"{host}:{port} refused the pin: {reply.reason}")
            if len(reply.chunks) > len(part):
                raise HandshakeError(f"{host}:{port} answered {len(reply.chunks)} chunks for {len(part)} blocks")
            leases.append((reply.lease_id, list(reply.chunks)))
            if len(reply.chunks) < len(part):
                break
    except HandshakeError:
        release_blocks(host, port, tp_rank, [lid for lid, _ in leases], timeout_s, curve)
        raise
    return leases


def release_blocks(
    host: str, port: int, tp_rank: int, lease_ids: list[int], timeout_s: float, curve: CurveClient | None = None
) -> None:
    """Release peer leases (best effort: a lease not released expires on the holder)."""
    for lid in lease_ids:
        try:
            payload = _encoder.encode(ReleaseRequest(PROTOCOL_VERSION, tp_rank, lid))
            _exchange(host, port, payload, timeout_s, curve, "release", _release_decoder)
        except HandshakeError as exc:
            logger.info("LLMDConnector: peer lease %d at %s:%s not released (%s); it expires", lid, host, port, exc)
            return
