"""The transport interface: what the connector needs from whatever moves KV bytes.

A transport owns one endpoint (a NIXL agent, later an RBLN host-staging agent) and knows nothing
of vLLM requests. The connector speaks to it in *regions* and *block ids*:

- a :class:`Region` is one contiguous, block-major slab of KV memory (one layer, or the K or V half
  of one layer): ``num_blocks`` blocks of ``block_len`` bytes each starting at ``base_addr``;
- a block is addressed by ``(region index, block id)``; both sides register their regions in the
  same order, so region ``r`` on one side corresponds to region ``r`` on the other.

The RBLN transport (device → page-aligned host staging → NIXL DRAM, transports/rbln.py) fits the
same shape: it registers its *staging* regions here and adds two hooks the connector calls around a
transfer (``stage_out`` after prefill, ``stage_in`` after a read); they are optional methods on
:class:`KVTransport` that default to no-ops.

A cross-layout hand-off (connectors/layout.py: the peer's blocks have another size or byte order)
reads arbitrary runs of the peer's registered memory into a local receive buffer: the buffer is
registered with :meth:`KVTransport.register_scratch` and the runs are read with
:meth:`KVTransport.read_runs`, both checked against the registered memory on each side.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import numpy as np


class MemoryKind(enum.StrEnum):
    """Where registered memory lives, in NIXL's terms."""

    DRAM = "DRAM"
    VRAM = "VRAM"


class XferState(enum.StrEnum):
    DONE = "DONE"
    PENDING = "PROC"
    FAILED = "ERR"


class TransportError(RuntimeError):
    """A transport operation failed (registration, peer setup, posting a transfer)."""


class Region(msgspec.Struct, frozen=True):
    """One block-major slab of KV memory (sent to peers as part of the handshake)."""

    base_addr: int
    num_blocks: int
    block_len: int
    device_id: int = 0

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_len


@dataclass(frozen=True)
class Peer:
    """A remote endpoint this transport can read from / write to."""

    name: str
    regions: tuple[Region, ...]
    #: where the peer's registered memory lives (a GPU peer's VRAM read into our DRAM, ...)
    memory: MemoryKind = MemoryKind.DRAM
    #: NIXL backends both sides have, in our order of preference (empty: the transport's own)
    backends: tuple[str, ...] = ()
    #: more of the peer's registered memory that ``read_runs`` may read (its DRAM tier: peer loads)
    extra: tuple[Region, ...] = ()


def check_runs(local: np.ndarray, remote: np.ndarray) -> None:
    """What :meth:`KVTransport.read_runs` accepts: matching ``(addr, len)`` rows, equal lengths."""
    if local.shape != remote.shape or local.ndim != 2 or local.shape[1] != 2:
        raise TransportError("read_runs: local and remote must be matching (addr, len) rows")
    if not np.array_equal(local[:, 1], remote[:, 1]):
        raise TransportError("read_runs: local and remote run lengths differ")


#: ``(region index, block id)`` pairs, one a block (the connector's block address)
BlockPairs = Sequence[tuple[int, int]]


class KVTransport(ABC):
    """Register memory, exchange metadata, read/write blocks, poll, notify, release."""

    #: short name carried in the handshake ("nixl", "rbln", ...): both sides must agree
    name: str
    memory: MemoryKind

    # ---- memory and metadata -------------------------------------------------------------
    @abstractmethod
    def register(self, regions: Sequence[Region]) -> None:
        """Register local KV memory. Called once, before any peer is added."""

    @property
    @abstractmethod
    def regions(self) -> tuple[Region, ...]: ...

    @abstractmethod
    def local_metadata(self) -> bytes:
        """Opaque bytes a peer passes to :meth:`add_peer` (never pickled; see nixl.py)."""

    @abstractmethod
    def add_peer(
        self, metadata: bytes, regions: Sequence[Region], memory: MemoryKind | None = None, backends: Sequence[str] = ()
    ) -> Peer:
        """Connect to a remote endpoint described by its metadata and region table; ``memory`` is
        where that table lives (default: the same kind as ours), ``backends`` the backends to use
        with it (default: all of ours)."""

    @abstractmethod
    def remove_peer(self, peer: Peer) -> None: ...

    # ---- data movement -------------------------------------------------------------------
    @abstractmethod
    def read_blocks(self, peer: Peer, local: BlockPairs, remote: BlockPairs, notif: bytes = b"") -> object:
        """Post a READ of remote ``(region, block)`` pairs into local ones; returns a handle.
        ``notif`` is delivered to the peer once the read completed."""

    @abstractmethod
    def write_blocks(self, peer: Peer, local: BlockPairs, remote: BlockPairs, notif: bytes = b"") -> object:
        """Post a WRITE of local ``(region, block)`` pairs into remote ones; returns a handle."""

    def read_runs(
        self, peer: Peer, local: np.ndarray, remote: np.ndarray, notif: bytes = b""
    ) -> object:  # pragma: no cover - optional
        """Post a READ of ``remote`` ``(addr, len)`` rows of the peer's registered memory into
        ``local`` rows (inside our regions or a registered scratch buffer). Optional: a transport
        without it cannot serve cross-layout hand-offs (the handshake says so)."""
        raise TransportError(f"the {self.name} transport cannot read arbitrary runs")

    def register_scratch(self, base_addr: int, nbytes: int, memory: MemoryKind = MemoryKind.DRAM) -> None:
        """Register a local buffer ``read_runs`` may write into (a receive pool)."""
        raise TransportError(f"the {self.name} transport cannot register scratch memory")

    @property
    def backends_available(self) -> tuple[str, ...]:
        """NIXL backends this endpoint can move bytes with (what a peer must share)."""
        return ()

    @abstractmethod
    def poll(self, handle: object) -> XferState: ...

    @abstractmethod
    def release(self, handle: object) -> None:
        """Free a transfer handle (cancelling it if still in flight)."""

    @abstractmethod
    def notify(self, peer: Peer, message: bytes) -> None:
        """Send a small standalone message to a peer."""

    @abstractmethod
    def get_notifs(self) -> list[tuple[str, bytes]]:
        """Messages received since the last call, as ``(peer name, message)``."""

    @abstractmethod
    def close(self) -> None: ...

    # ---- optional: idle hint ----------------------------------------------------------------
    def set_active(self, active: bool) -> None:  # noqa: B027 - optional hook
        """Whether anything is in flight that needs this endpoint's background progress (a peer may
        read blocks we hold under a lease, or we wait on a read). A transport with a background
        progress thread parks it while inactive; others ignore this. Transports start active."""

    def hold_until(self, deadline: float) -> None:  # noqa: B027 - optional hook
        """Keep background progress running until ``deadline`` (``time.monotonic()``) even while
        inactive: a peer may read registered memory without a lease of ours (it handshook, or it
        pinned DRAM-tier blocks; connectors/read_windows.py). A later call replaces the deadline."""

    # ---- optional staging hooks (host-bounce transports such as RBLN) ---------------------
    def stage_out(self, block_ids: Sequence[int]) -> int:
        """Copy device blocks to registered host memory before a peer reads them; bytes copied."""
        return 0

    def stage_in(self, block_ids: Sequence[int]) -> int:
        """Copy blocks just received into host memory onto the device; bytes copied."""
        return 0

    @property
    def stages(self) -> bool:
        """Whether peers read staged copies (``stage_out`` must run before they read)."""
        return False
