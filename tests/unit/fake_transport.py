"""An in-process transport behind ``connectors/transports/base.py``'s interface, for the connector's
fast unit tests.

It follows :class:`vllm_llmd.connectors.transports.nixl.NixlTransport` (connectors/transports/nixl.py):
a peer is added from its metadata and region table (unknown metadata or a region table beyond the
memory the peer registered is a :class:`TransportError`); a READ names ``(region, block)`` pairs on
both sides and is checked against the registered regions (``block_indices``); ``poll`` reports ``DONE``
and only then sends the completion notification to the peer (``_Read``); ``release`` of a pending
transfer cancels it. Cross-layout reads (``read_runs`` of ``(addr, len)`` rows into our regions or
a scratch buffer registered with ``register_scratch``) are checked the same way against both sides'
registered memory (``locate_runs``), and a peer is read over the backends both sides agreed
(``backends``; the fake has the ones its test gives it, ``("UCX",)`` by default). Those checks are the
real transport's own (connectors/transports/descriptors.py, which imports no NIXL). Bytes really
move: a READ copies the peer's block memory into ours with ``ctypes.memmove`` (both "engines" live
in this process), as NIXL's UCX backend copies between processes.

What a test controls (on the shared :class:`Fabric`): ``hold`` keeps new transfers ``PENDING`` until
:meth:`Fabric.complete` (a slow network); :meth:`Fabric.fail` makes a pending transfer fail.
"""

from __future__ import annotations

import ctypes
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from vllm_llmd.connectors.transports import KVTransport, MemoryKind, Peer, Region, TransportError, XferState
from vllm_llmd.connectors.transports.base import check_runs
from vllm_llmd.connectors.transports.descriptors import block_descs, block_indices, block_offsets, locate_runs


@dataclass
class Xfer:
    id: int
    owner: FakeTransport
    peer: str
    copies: list[tuple[int, int, int]]  # (dst addr, src addr, nbytes)
    notif: bytes
    state: XferState = XferState.PENDING
    released: bool = False


@dataclass
class Fabric:
    """Every fake agent of a test, by name (the network between them)."""

    agents: dict[str, FakeTransport] = field(default_factory=dict)
    hold: bool = False
    xfers: list[Xfer] = field(default_factory=list)
    cancelled: int = 0

    def pending(self) -> list[Xfer]:
        return [x for x in self.xfers if x.state == XferState.PENDING and not x.released]

    def complete(self, xfer: Xfer | None = None) -> None:
        for x in [xfer] if xfer else self.pending():
            x.state = XferState.DONE

    def fail(self, xfer: Xfer | None = None) -> None:
        for x in [xfer] if xfer else self.pending():
            x.state = XferState.FAILED


class FakeTransport(KVTransport):
    name = "nixl"  # what the handshake compares; the fake stands in for NIXL
    _ids = itertools.count()

    def __init__(
        self, fabric: Fabric, memory: MemoryKind = MemoryKind.DRAM, backends: Sequence[str] = (), **_: object
    ) -> None:
        self.fabric = fabric
        self.memory = memory
        self._backends = tuple(backends) or ("UCX",)
        self._scratch: list[tuple[int, int]] = []
        self.agent_name = f"fake-{next(self._ids)}"
        self._regions: tuple[Region, ...] = ()
        self._peers: dict[str, Peer] = {}
        self._inbox: list[tuple[str, bytes]] = []
        self.closed = False
        fabric.agents[self.agent_name] = self

    # ---- memory and metadata
    def register(self, regions: Sequence[Region]) -> None:
        if self._regions:
            raise TransportError("memory is already registered")
        if not regions:
            raise TransportError("nothing to register")
        self._regions = tuple(regions)

    def register_scratch(self, base_addr: int, nbytes: int, memory: MemoryKind = MemoryKind.DRAM) -> None:
        self._scratch.append((base_addr, nbytes))

    @property
    def regions(self) -> tuple[Region, ...]:
        return self._regions

    @property
    def backends_available(self) -> tuple[str, ...]:
        return self._backends

    def local_metadata(self) -> bytes:
        return self.agent_name.encode()

    def add_peer(
        self, metadata: bytes, regions: Sequence[Region], memory: MemoryKind | None = None, backends: Sequence[str] = ()
    ) -> Peer:
        if not self._regions:
            raise TransportError("register memory before adding peers")
        agent = self.fabric.agents.get(metadata.decode(errors="replace"))
        if agent is None or agent.closed:
            raise TransportError("NIXL rejected the peer's agent metadata")
        if tuple(regions) != agent.regions:
            raise TransportError(f"peer {agent.agent_name}'s region table does not match the memory it registered")
        use = tuple(b for b in (backends or self._backends) if b in self._backends and b in agent._backends)
        if not use:
            raise TransportError(f"no backend in common with peer {agent.agent_name}")
        peer = Peer(name=agent.agent_name, regions=tuple(regions), memory=memory or self.memory, backends=use)
        self._peers[peer.name] = peer
        return peer

    def remove_peer(self, peer: Peer) -> None:
        self._peers.pop(peer.name, None)

    # ---- data movement
    @staticmethod
    def _addrs(regions: Sequence[Region], pairs: Sequence[tuple[int, int]]) -> list[int]:
        rows = block_descs(regions)[block_indices(regions, block_offsets(regions), pairs)]
        return [int(a) for a in rows[:, 0]]

    def _post(self, peer: Peer, local, remote, notif: bytes, read: bool) -> Xfer:  # type: ignore[no-untyped-def]
        if len(local) != len(remote):
            raise TransportError(f"{len(local)} local blocks but {len(remote)} remote blocks")
        if peer.name not in self._peers:
            raise TransportError(f"unknown peer {peer.name}")
        mine, theirs = self._addrs(self._regions, local), self._addrs(peer.regions, remote)
        lens = [self._regions[r].block_len for r, _ in local]
        pairs = zip(mine, theirs, lens, strict=True)
        copies = [(m, t, n) if read else (t, m, n) for m, t, n in pairs]
        x = Xfer(len(self.fabric.xfers), self, peer.name, copies, notif)
        self.fabric.xfers.append(x)
        if not self.fabric.hold:
            x.state = XferState.DONE
        return x

    @staticmethod
    def _inside(spans: Sequence[tuple[int, int]], rows: np.ndarray, whose: str) -> None:
        locate_runs([(base, size, 0, MemoryKind.DRAM) for base, size in spans], rows, whose)

    def read_runs(self, peer: Peer, local: np.ndarray, remote: np.ndarray, notif: bytes = b"") -> object:
        if peer.name not in self._peers:
            raise TransportError(f"unknown peer {peer.name}")
        check_runs(local, remote)
        self._inside([(r.base_addr, r.nbytes) for r in self._regions] + self._scratch, local, "our")
        self._inside([(r.base_addr, r.nbytes) for r in peer.regions], remote, f"peer {peer.name}'s")
        copies = [(int(m), int(t), int(n)) for (m, n), (t, _) in zip(local.tolist(), remote.tolist(), strict=True)]
        x = Xfer(len(self.fabric.xfers), self, peer.name, copies, notif)
        self.fabric.xfers.append(x)
        if not self.fabric.hold:
            x.state = XferState.DONE
        return x

    def read_blocks(self, peer, local, remote, notif: bytes = b"") -> object:  # type: ignore[override]
        return self._post(peer, local, remote, notif, read=True)

    def write_blocks(self, peer, local, remote, notif: bytes = b"") -> object:  # type: ignore[override]
        return self._post(peer, local, remote, notif, read=False)

    def poll(self, handle: object) -> XferState:
        assert isinstance(handle, Xfer)
        if handle.state == XferState.DONE and handle.copies:
            for dst, src, n in handle.copies:
                ctypes.memmove(dst, src, n)
            handle.copies = []
            if handle.notif:  # as NixlTransport: the notice goes out once the data is here
                self._send(handle.peer, handle.notif)
                handle.notif = b""
        return handle.state

    def release(self, handle: object) -> None:
        assert isinstance(handle, Xfer)
        if handle.state == XferState.PENDING and not handle.released:
            self.fabric.cancelled += 1
        handle.released = True

    def _send(self, peer: str, message: bytes) -> None:
        agent = self.fabric.agents.get(peer)
        if agent is None or agent.closed:
            raise TransportError(f"notification to {peer} failed: peer gone")
        agent._inbox.append((self.agent_name, message))

    def notify(self, peer: Peer, message: bytes) -> None:
        self._send(peer.name, message)

    def get_notifs(self) -> list[tuple[str, bytes]]:
        out, self._inbox = self._inbox, []
        return out

    def close(self) -> None:
        self.closed = True
