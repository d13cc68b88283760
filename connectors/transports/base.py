"""The transport interface: what the connector needs from whatever moves KV bytes.

A transport owns one endpoint (a NIXL agent, later an RBLN host-staging agent) and knows nothing
of vLLM requests. The connector speaks to it in *regions* and *block ids*:

- a :class:`Region` is one contiguous, block-major slab of KV memory (one layer, or the K or V half
  of one layer): ``num_blocks`` blocks of ``block_len`` bytes each starting at ``base_addr``;
- a block is addressed by ``(region index, block id)``; both sides register their regions in the
  same order, so region ``r`` on one side corresponds to region ``r`` on the other.

The RBLN transport (device → page-aligned host staging → NIXL DRAM) fits the same shape: it
registers its *staging* regions here and adds two hooks the connector calls around a transfer
(``stage_out`` after prefill, ``stage_in`` after a read); they are optional methods on
:class:`KVTransport` that default to no-ops.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec


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
    def add_peer(self, metadata: bytes, regions: Sequence[Region]) -> Peer:
        """Connect to a remote endpoint described by its metadata and region table."""

    @abstractmethod
    def remove_peer(self, peer: Peer) -> None: ...

    # ---- data movement -------------------------------------------------------------------
    @abstractmethod
    def read_blocks(
        self,
        peer: Peer,
        local: Sequence[tuple[int, int]],
        remote: Sequence[tuple[int, int]],
        notif: bytes = b"",
    ) -> object:
        """Post a READ of remote ``(region, block)`` pairs into local ones; returns a handle.
        ``notif`` is delivered to the peer once the read completed."""

    @abstractmethod
    def write_blocks(
        self,
        peer: Peer,
        local: Sequence[tuple[int, int]],
        remote: Sequence[tuple[int, int]],
        notif: bytes = b"",
    ) -> object:
        """Post a WRITE of local ``(region, block)`` pairs into remote ones; returns a handle."""

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

    # ---- optional staging hooks (host-bounce transports such as RBLN) ---------------------
    def stage_out(self, block_ids: Sequence[int]) -> None:  # noqa: B027 - optional hook
        """Copy device blocks to registered host memory before a peer reads them."""

    def stage_in(self, block_ids: Sequence[int]) -> None:  # noqa: B027 - optional hook
        """Copy blocks just received into host memory onto the device."""
